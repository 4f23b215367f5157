"""The vLLM general plugin: `vllm serve MODEL --afd-config '{...}'`.

Entry point (group `vllm.general_plugins`): `register`. vLLM calls it in every process
(API server, engine core, workers), possibly more than once, so each step is idempotent:

- `cli`: adds `--afd-config` to `vllm serve` and the engine arguments; the value is parsed
  and checked (`AFDConfig`, plus what the model and the server imply) before any worker
  starts, then travels to the workers in `additional_config["afd"]`.
- `moe`: in a worker with an AFD config, just before the model is built, the MoE method
  that is registered (vLLM's own, or an out-of-tree one such as vllm-ascend's) is
  replaced by a subclass that keeps the router here, allocates no expert weights and
  sends the experts' work to the FFN ranks.
- `server`: the worker's AFD side: windows, FFN Ray actors, the attention endpoint; it
  stops the actors when the worker exits.
- `metrics`: AFD counters on the server's `/metrics`.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from afd_dispatch.integrations.vllm import cli, metrics, moe

    cli.install()
    moe.install_model_hook()
    metrics.install()
