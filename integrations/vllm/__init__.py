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
- `owner`: the deployment's shared half (windows, FFN Ray actors), made once per server
  by the process that launches the engine cores (`compat` hooks that launch); every
  data-parallel rank attaches to it.
- `server`: a worker's AFD side: attention session = its data-parallel rank.
- `metrics`: AFD counters on the server's `/metrics`, labelled by session and FFN rank.
- `compat`: every place it reaches into vLLM's internals (the flag, model creation and
  the MoE method, engine launch, MoE layout, exit status, and on a host the FFN ranks
  share, vLLM's spinning queue waits), each refused on a vLLM outside `SUPPORTED_VLLM`.
- `health`: `/health` says 503 while the deployment cannot serve, and requests that ran
  into an AFD fault fail with the reason (the engine itself never dies of one).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from afd_dispatch.integrations.vllm import compat, metrics
    from afd_dispatch.integrations.vllm.owner import Attachment

    compat.install_cli_flag()
    compat.install_model_hook()
    metrics.install()
    compat.install_engine_launch_hook()
    compat.install_exit_status_hook()
    attachment = Attachment.from_env()
    if attachment is not None and attachment.windows:  # FFN ranks on this host's cores
        compat.install_idle_wait_hook()
