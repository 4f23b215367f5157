"""Loading the experts one FFN rank hosts from safetensors checkpoints.

Checkpoints are written here with `safetensors.torch.save_file` in every naming scheme and
layout (per-expert and fused; one file, shards with an index, shards without one), with
the tensor names below written out independently of the loader. `safe_open` is wrapped (a
call-through recorder, the real reader underneath) to see which files are opened and which
parts of fused tensors are read. The last tests rebuild, from recorded names and shapes,
the exact files transformers 5.19 wrote for tiny models (tests/data).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from afd_dispatch import AFDInputError
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime import checkpoint
from afd_dispatch.runtime.checkpoint import (
    ExpertWeights,
    SharedExpertWeights,
    load_routed_experts,
    load_shared_expert,
)

RECORD = json.loads((Path(__file__).parent / "data" / "hf_tiny_moe_checkpoints.json").read_text())
H, INTER, E = 8, 4, 6  # hidden, expert intermediate, routed experts

CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "hidden_size": H,
        "num_hidden_layers": 2,
        "num_experts": E,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": INTER,
        "dtype": "bfloat16",
    },
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        "hidden_size": H,
        "num_hidden_layers": 2,
        "num_experts": E,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": INTER,
        "shared_expert_intermediate_size": 6,
    },
    "mixtral": {
        "model_type": "mixtral",
        "hidden_size": H,
        "num_hidden_layers": 2,
        "num_local_experts": E,
        "num_experts_per_tok": 2,
        "intermediate_size": INTER,
    },
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        "hidden_size": H,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "n_routed_experts": E,
        "n_shared_experts": 2,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": INTER,
        "n_group": 3,
        "topk_group": 2,
    },
}
# per-expert names: template (l, e, p) and the p of gate, up, down
EXPERT_NAMES = {
    "qwen3_moe": (
        "model.layers.{l}.mlp.experts.{e}.{p}.weight",
        ("gate_proj", "up_proj", "down_proj"),
    ),
    "qwen2_moe": (
        "model.layers.{l}.mlp.experts.{e}.{p}.weight",
        ("gate_proj", "up_proj", "down_proj"),
    ),
    "deepseek_v3": (
        "model.layers.{l}.mlp.experts.{e}.{p}.weight",
        ("gate_proj", "up_proj", "down_proj"),
    ),
    "mixtral": ("model.layers.{l}.block_sparse_moe.experts.{e}.{p}.weight", ("w1", "w3", "w2")),
}
SHARED_NAMES = {
    "qwen2_moe": "model.layers.{l}.mlp.shared_expert.{p}_proj.weight",
    "deepseek_v3": "model.layers.{l}.mlp.shared_experts.{p}_proj.weight",
}
SHARD_A, SHARD_B, SHARD_C = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))


def spec_of(arch: str) -> MoESpec:
    return MoESpec.from_hf_config(CONFIGS[arch])


class Truth:
    """Random weights of every MoE layer of `spec`, and the tensors that store them."""

    def __init__(self, spec: MoESpec, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(dtype)

        self.spec = spec
        self.routed = {
            (layer, e): (rand(INTER, H), rand(INTER, H), rand(H, INTER))
            for layer in spec.moe_layers
            for e in range(E)
        }
        s = spec.shared_intermediate_size
        self.shared = {
            layer: (
                rand(s, H),
                rand(s, H),
                rand(H, s),
                rand(1, H) if spec.shared_expert_gate else None,
            )
            for layer in spec.moe_layers
            if spec.num_shared_experts
        }
        self.other = {"model.embed_tokens.weight": rand(16, H), "lm_head.weight": rand(16, H)}
        for layer in spec.moe_layers:  # the router, which the loader must leave alone
            self.other[f"model.layers.{layer}.mlp.gate.weight"] = rand(E, H)

    def tensors(self, arch: str, fused: bool) -> dict[str, torch.Tensor]:
        out = dict(self.other)
        template, projs = EXPERT_NAMES[arch]
        for layer in self.spec.moe_layers:
            if fused:
                gates, ups, downs = zip(*(self.routed[layer, e] for e in range(E)), strict=True)
                out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
                    [torch.cat([g, u]) for g, u in zip(gates, ups, strict=True)]
                )
                out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(downs)
            else:
                for e in range(E):
                    for p, t in zip(projs, self.routed[layer, e], strict=True):
                        out[template.format(l=layer, e=e, p=p)] = t
            if layer in self.shared:
                gate, up, down, gate_weight = self.shared[layer]
                for p, t in zip(("gate", "up", "down"), (gate, up, down), strict=True):
                    out[SHARED_NAMES[arch].format(l=layer, p=p)] = t
                if gate_weight is not None:
                    out[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] = gate_weight
        return out


def shard_of(name: str) -> str:
    """Experts 0..2 in shard A, 3..5 in B, all else (shared, fused, router) in C."""
    m = re.search(r"\.experts\.(\d+)\.", name)
    if m is None:
        return SHARD_C
    return SHARD_A if int(m.group(1)) < E // 2 else SHARD_B


def write(
    root: Path,
    tensors: dict[str, torch.Tensor],
    storage: str = "single",
    shard: Callable[[str], str] = shard_of,
) -> Path:
    """storage: "single" (model.safetensors), "index" (shards + index), "noindex" (shards)."""
    root.mkdir(parents=True, exist_ok=True)
    if storage == "single":
        save_file(tensors, str(root / "model.safetensors"))
        return root
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        files.setdefault(shard(name), {})[name] = t
    for file, part in files.items():
        save_file(part, str(root / file))
    if storage == "index":
        weight_map = {name: shard(name) for name in tensors}
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
        )
    return root


class Recorder:
    """Wraps the real `safe_open`: records opened files and the parts of tensors read."""

    def __init__(self) -> None:
        self.real = safetensors.safe_open
        self.opened: list[str] = []
        self.reads: list[tuple[str, Any]] = []

    def __call__(self, filename: str, framework: str, device: str = "cpu") -> Any:
        self.opened.append(os.path.basename(filename))
        return _Handle(self.real(filename, framework=framework, device=device), self)


class _Handle:
    def __init__(self, handle: Any, rec: Recorder) -> None:
        self.handle, self.rec = handle, rec

    def __enter__(self) -> _Handle:
        self.handle.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def get_slice(self, name: str) -> _Slice:
        return _Slice(name, self.handle.get_slice(name), self.rec)

    def get_tensor(self, name: str) -> torch.Tensor:
        self.rec.reads.append((name, "all"))
        return self.handle.get_tensor(name)  # type: ignore[no-any-return]


class _Slice:
    def __init__(self, name: str, sl: Any, rec: Recorder) -> None:
        self.name, self.sl, self.rec = name, sl, rec

    def get_dtype(self) -> str:
        return self.sl.get_dtype()  # type: ignore[no-any-return]

    def get_shape(self) -> list[int]:
        return self.sl.get_shape()  # type: ignore[no-any-return]

    def __getitem__(self, index: Any) -> torch.Tensor:
        self.rec.reads.append((self.name, index))
        return self.sl[index]  # type: ignore[no-any-return]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(checkpoint, "safe_open", rec)
    return rec


def assert_expert(got: ExpertWeights, want: tuple[torch.Tensor, ...]) -> None:
    for t, w in zip((got.gate, got.up, got.down), want, strict=True):
        assert t.dtype == w.dtype and t.shape == w.shape
        assert torch.equal(t, w)


# -- every scheme, layout and storage ------------------------------------------------------
@pytest.mark.parametrize("storage", ["single", "index", "noindex"])
@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_loads_hosted_experts_exactly(tmp_path: Path, arch: str, fused: bool, storage: str) -> None:
    spec = spec_of(arch)
    truth = Truth(spec)
    root = write(tmp_path / "m", truth.tensors(arch, fused), storage)
    hosted = [4, 1, 4]  # out of order, repeated: read once each, ascending
    for layer in spec.moe_layers:
        got = load_routed_experts(root, spec, layer, hosted)
        assert list(got) == [1, 4]
        for e, w in got.items():
            assert_expert(w, truth.routed[layer, e])
        shared = load_shared_expert(root, spec, layer)
        if not spec.num_shared_experts:
            assert shared is None
            continue
        assert isinstance(shared, SharedExpertWeights)
        gate, up, down, gate_weight = truth.shared[layer]
        assert_expert(shared, (gate, up, down))
        assert shared.intermediate_size == spec.shared_intermediate_size
        if gate_weight is None:
            assert shared.gate_weight is None
        else:
            assert shared.gate_weight is not None and torch.equal(shared.gate_weight, gate_weight)


def test_dtype_conversion(tmp_path: Path) -> None:
    spec = spec_of("qwen2_moe")
    truth = Truth(spec, dtype=torch.float32)
    root = write(tmp_path, truth.tensors("qwen2_moe", fused=True))
    got = load_routed_experts(root, spec, 0, [2], dtype=torch.bfloat16)[2]
    assert got.gate.dtype == got.up.dtype == got.down.dtype == torch.bfloat16
    assert torch.equal(got.down, truth.routed[0, 2][2].to(torch.bfloat16))
    shared = load_shared_expert(root, spec, 1, dtype=torch.float16)
    assert shared is not None and shared.gate_weight is not None
    assert shared.gate_weight.dtype == torch.float16


# -- reading only what the rank hosts ------------------------------------------------------
def test_never_opens_shards_of_other_experts(tmp_path: Path, recorder: Recorder) -> None:
    spec = spec_of("deepseek_v3")
    truth = Truth(spec)
    root = write(tmp_path, truth.tensors("deepseek_v3", fused=False), "index")
    (root / SHARD_B).write_bytes(b"\xff" * 64)  # experts 3..5: unreadable if ever opened
    got = load_routed_experts(root, spec, 2, [0, 2])
    assert_expert(got[2], truth.routed[2, 2])
    assert recorder.opened == [SHARD_A]
    recorder.opened.clear()
    assert load_shared_expert(root, spec, 2) is not None
    assert recorder.opened == [SHARD_C]
    # the corrupt shard is really there: asking for its experts fails, naming it
    with pytest.raises(AFDInputError, match=SHARD_B):
        load_routed_experts(root, spec, 2, [3])


def test_deleted_shard_of_other_experts_is_not_needed(tmp_path: Path) -> None:
    spec = spec_of("mixtral")
    truth = Truth(spec)
    root = write(tmp_path, truth.tensors("mixtral", fused=False), "index")
    (root / SHARD_A).unlink()
    (root / SHARD_C).unlink()
    got = load_routed_experts(root, spec, 1, [3, 5])
    assert_expert(got[5], truth.routed[1, 5])
    with pytest.raises(AFDInputError, match=f"{SHARD_A}.*a readable safetensors file"):
        load_routed_experts(root, spec, 1, [0])


def test_fused_reads_only_hosted_rows(tmp_path: Path, recorder: Recorder) -> None:
    spec = spec_of("qwen3_moe")
    truth = Truth(spec)
    root = write(tmp_path, truth.tensors("qwen3_moe", fused=True))
    got = load_routed_experts(root, spec, 1, [5, 0])
    assert_expert(got[0], truth.routed[1, 0])
    assert_expert(got[5], truth.routed[1, 5])
    assert recorder.reads, "the recorder saw no read"
    rows = set()
    for name, index in recorder.reads:
        assert name.startswith("model.layers.1.mlp.experts."), name
        assert index != "all" and isinstance(index, tuple), (name, index)
        first = index[0]
        assert first.stop - first.start == 1, f"{name}[{index}] reads more than one expert"
        rows.add(first.start)
    assert rows == {0, 5}


def test_no_experts_and_no_shared_open_nothing(tmp_path: Path, recorder: Recorder) -> None:
    assert load_routed_experts(tmp_path, spec_of("qwen3_moe"), 0, []) == {}
    assert load_shared_expert(tmp_path, spec_of("mixtral"), 0) is None
    assert recorder.opened == []


# -- bad checkpoints -----------------------------------------------------------------------
def test_wrong_shape_names_tensor_and_shapes(tmp_path: Path) -> None:
    spec = spec_of("qwen3_moe")
    tensors = Truth(spec).tensors("qwen3_moe", fused=False)
    tensors["model.layers.0.mlp.experts.1.up_proj.weight"] = torch.zeros(INTER + 1, H)
    write(tmp_path, tensors)
    load_routed_experts(tmp_path, spec, 0, [0, 2])  # other experts are fine
    with pytest.raises(AFDInputError) as info:
        load_routed_experts(tmp_path, spec, 0, [1])
    msg = str(info.value)
    assert "model.layers.0.mlp.experts.1.up_proj.weight" in msg
    assert f"shape ({INTER}, {H})" in msg and f"({INTER + 1}, {H})" in msg


def test_fused_wrong_expert_count(tmp_path: Path) -> None:
    spec = spec_of("mixtral")
    tensors = Truth(spec).tensors("mixtral", fused=True)
    tensors["model.layers.0.mlp.experts.down_proj"] = torch.zeros(E - 1, H, INTER)
    write(tmp_path, tensors)
    with pytest.raises(
        AFDInputError, match=r"experts\.down_proj.*shape \(6, 8, 4\), got \(5, 8, 4\)"
    ):
        load_routed_experts(tmp_path, spec, 0, [0])


@pytest.mark.parametrize("bad", [torch.int8, torch.float8_e4m3fn])
def test_wrong_dtype_refused(tmp_path: Path, bad: torch.dtype) -> None:
    spec = spec_of("deepseek_v3")
    tensors = Truth(spec).tensors("deepseek_v3", fused=False)
    tensors["model.layers.1.mlp.shared_experts.down_proj.weight"] = torch.zeros(H, 8).to(bad)
    write(tmp_path, tensors)
    with pytest.raises(AFDInputError, match="quantized checkpoints are not supported") as info:
        load_shared_expert(tmp_path, spec, 1)
    assert "shared_experts.down_proj.weight" in str(info.value)


def test_mixed_dtypes_in_one_expert(tmp_path: Path) -> None:
    spec = spec_of("qwen3_moe")
    tensors = Truth(spec).tensors("qwen3_moe", fused=False)
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    tensors[name] = tensors[name].float()
    write(tmp_path, tensors)
    with pytest.raises(AFDInputError, match=r"experts\.3\.gate_proj\.weight.*one dtype"):
        load_routed_experts(tmp_path, spec, 0, [3])
    # with a dtype to convert to, the expert is usable
    got = load_routed_experts(tmp_path, spec, 0, [3], dtype=torch.float32)[3]
    assert got.down.dtype == got.gate.dtype == torch.float32


def test_missing_tensor_names_itself_and_where_searched(tmp_path: Path) -> None:
    spec = spec_of("qwen2_moe")
    tensors = Truth(spec).tensors("qwen2_moe", fused=False)
    del tensors["model.layers.1.mlp.experts.4.gate_proj.weight"]
    del tensors["model.layers.0.mlp.shared_expert_gate.weight"]
    write(tmp_path / "single", tensors)
    with pytest.raises(AFDInputError) as info:
        load_routed_experts(tmp_path / "single", spec, 1, [4])
    msg = str(info.value)
    assert "'model.layers.1.mlp.experts.4.gate_proj.weight'" in msg
    assert str(tmp_path / "single" / "model.safetensors") in msg and "missing" in msg
    with pytest.raises(AFDInputError, match=r"shared_expert_gate\.weight"):
        load_shared_expert(tmp_path / "single", spec, 0)

    write(tmp_path / "sharded", tensors, "index")
    with pytest.raises(AFDInputError, match=r"model\.safetensors\.index\.json \(weight_map\)"):
        load_routed_experts(tmp_path / "sharded", spec, 1, [4])


def test_index_points_to_file_without_the_tensor(tmp_path: Path) -> None:
    spec = spec_of("qwen3_moe")
    root = write(tmp_path, Truth(spec).tensors("qwen3_moe", fused=False), "index")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.experts.0.up_proj.weight"] = SHARD_B
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(AFDInputError) as info:
        load_routed_experts(root, spec, 0, [0])
    assert "experts.0.up_proj.weight" in str(info.value)
    assert f"{root / SHARD_B} (where model.safetensors.index.json places it)" in str(info.value)


@pytest.mark.parametrize(
    "target",
    [
        "../outside.safetensors",
        "sub/../../outside.safetensors",
        "{outside}",  # absolute path of a real, valid file outside the model directory
        "config.json",
        "..\\outside.safetensors",
    ],
)
def test_index_cannot_escape_model_dir(tmp_path: Path, target: str) -> None:
    spec = spec_of("qwen3_moe")
    tensors = Truth(spec).tensors("qwen3_moe", fused=False)
    save_file(tensors, str(tmp_path / "outside.safetensors"))  # would load if followed
    root = write(tmp_path / "model", tensors, "index")
    target = target.format(outside=tmp_path / "outside.safetensors")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.experts.0.up_proj.weight"] = target
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(AFDInputError, match="inside the model directory") as info:
        load_routed_experts(root, spec, 1, [0])  # even a layer the entry is not about
    assert repr(target) in str(info.value)


@pytest.mark.parametrize(
    ("index_text", "shown"),
    [
        ("{not json", "valid JSON"),
        ('{"weight_map": []}', "weight_map"),
        ('{"weight_map": {"a": 1}}', "a file name"),
        ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "each key at most once"),
    ],
)
def test_bad_index(tmp_path: Path, index_text: str, shown: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(AFDInputError, match=shown):
        load_routed_experts(tmp_path, spec_of("qwen3_moe"), 0, [0])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_file_named(tmp_path: Path, damage: str) -> None:
    spec = spec_of("mixtral")
    write(tmp_path, Truth(spec).tensors("mixtral", fused=False))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"\x10" * 200, "truncated": data[: len(data) - 100], "empty": b""}[damage]
    )
    with pytest.raises(AFDInputError, match="a readable safetensors file") as info:
        load_routed_experts(tmp_path, spec, 0, [0])
    assert str(path) in str(info.value)


def test_both_layouts_in_one_layer_refused(tmp_path: Path) -> None:
    spec = spec_of("qwen3_moe")
    truth = Truth(spec)
    tensors = {**truth.tensors("qwen3_moe", fused=True), **truth.tensors("qwen3_moe", fused=False)}
    write(tmp_path, tensors)
    with pytest.raises(AFDInputError, match="one layout"):
        load_routed_experts(tmp_path, spec, 0, [1])


def test_same_tensor_in_two_files_without_index(tmp_path: Path) -> None:
    spec = spec_of("qwen3_moe")
    tensors = Truth(spec).tensors("qwen3_moe", fused=False)
    write(tmp_path, tensors, "noindex")
    save_file(
        {"model.embed_tokens.weight": tensors["model.embed_tokens.weight"]},
        str(tmp_path / "extra.safetensors"),
    )
    with pytest.raises(AFDInputError, match="stored in one file only"):
        load_routed_experts(tmp_path, spec, 0, [0])


def test_bad_paths(tmp_path: Path) -> None:
    spec = spec_of("qwen3_moe")
    with pytest.raises(AFDInputError, match="a directory"):
        load_routed_experts(tmp_path / "nope", spec, 0, [0])
    with pytest.raises(AFDInputError, match=r"\*\.safetensors files"):
        load_routed_experts(tmp_path, spec, 0, [0])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"layer": 2}, "layer"),  # qwen3_moe spec here has layers 0, 1
        ({"layer": True}, "layer"),
        ({"experts": [6]}, "experts"),  # routed ids are 0..5; row 6 would be the shared one
        ({"experts": [-1]}, "experts"),
        ({"experts": [True]}, "experts"),
        ({"experts": ["1"]}, "experts"),
        ({"experts": 3}, "experts"),
        ({"dtype": torch.int32}, "dtype"),
        ({"spec": CONFIGS["qwen3_moe"]}, "spec"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], argument: str) -> None:
    args: dict[str, Any] = {
        "path": tmp_path,
        "spec": spec_of("qwen3_moe"),
        "layer": 0,
        "experts": [0],
    }
    with pytest.raises(AFDInputError) as info:
        load_routed_experts(**{**args, **kwargs})
    assert info.value.argument == argument


def test_dense_layer_refused_for_shared(tmp_path: Path) -> None:
    with pytest.raises(
        AFDInputError, match=r"layer: expected an MoE layer of the model, one of \[1, 2\]"
    ):
        load_shared_expert(tmp_path, spec_of("deepseek_v3"), 0)


def test_expert_weights_check_shapes() -> None:
    with pytest.raises(AFDInputError, match=r"down\.shape"):
        ExpertWeights(torch.zeros(INTER, H), torch.zeros(INTER, H), torch.zeros(INTER, H))
    with pytest.raises(AFDInputError, match=r"gate_weight\.shape"):
        gate, up, down = torch.zeros(INTER, H), torch.zeros(INTER, H), torch.zeros(H, INTER)
        SharedExpertWeights(gate, up, down, torch.zeros(H))
    w = SharedExpertWeights(torch.zeros(INTER, H), torch.zeros(INTER, H), torch.zeros(H, INTER))
    assert (w.hidden_size, w.intermediate_size, w.gate_weight) == (H, INTER, None)


# -- what transformers 5.19 really writes --------------------------------------------------
_ROUTED = re.compile(
    r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
    r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight"
)
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_SHARED = re.compile(r"model\.layers\.(\d+)\.mlp\.shared_experts?\.(gate|up|down)_proj\.weight")
_SHARED_GATE = re.compile(r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight")
_EXPERTISH = re.compile(r"\.(experts|shared_expert|shared_experts|shared_expert_gate)\.")
_ROLE = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}
_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}


def test_record_is_from_transformers_5_19() -> None:
    assert RECORD["transformers_version"] == "5.19.0"
    assert sorted(RECORD["models"]) == [
        "deepseek_v2",
        "deepseek_v3",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
    ]


@pytest.mark.parametrize("layout", ["original", "fused", "sharded"])
@pytest.mark.parametrize("arch", sorted(RECORD["models"]))
def test_finds_every_expert_tensor_transformers_wrote(
    tmp_path: Path, arch: str, layout: str
) -> None:
    model = RECORD["models"][arch]
    names = model["fused" if layout == "fused" else "original"]
    gen = torch.Generator().manual_seed(1)
    tensors = {
        name: torch.randn(*shape, generator=gen).to(_DTYPES[dtype])
        for name, (shape, dtype) in names.items()
    }
    if layout == "sharded":
        shards = model["sharded_weight_map"]
        root = write(tmp_path, tensors, "index", shard=shards.__getitem__)
        assert len(set(shards.values())) > 2
    else:
        root = write(tmp_path, tensors)
    spec = MoESpec.from_hf_config(model["config"])
    loaded = {
        layer: load_routed_experts(root, spec, layer, range(spec.num_experts))
        for layer in spec.moe_layers
    }
    shared = {layer: load_shared_expert(root, spec, layer) for layer in spec.moe_layers}

    compared = set()
    for name, t in tensors.items():
        if not _EXPERTISH.search(name):
            continue
        if m := _ROUTED.fullmatch(name):
            layer, e = int(m.group(1)), int(m.group(2))
            got = loaded[layer][e]
            assert torch.equal((got.gate, got.up, got.down)[_ROLE[m.group(3)]], t), name
        elif m := _FUSED.fullmatch(name):
            layer = int(m.group(1))
            inter = spec.moe_intermediate_size
            for e, got in loaded[layer].items():
                if m.group(2) == "down_proj":
                    assert torch.equal(got.down, t[e]), (name, e)
                else:  # gate rows first, then up rows
                    assert torch.equal(got.gate, t[e, :inter]), (name, e)
                    assert torch.equal(got.up, t[e, inter:]), (name, e)
        elif m := _SHARED.fullmatch(name):
            sw = shared[int(m.group(1))]
            assert sw is not None
            assert torch.equal(getattr(sw, m.group(2)), t), name
        elif m := _SHARED_GATE.fullmatch(name):
            sw = shared[int(m.group(1))]
            assert sw is not None and sw.gate_weight is not None
            assert torch.equal(sw.gate_weight, t), name
        else:
            pytest.fail(f"expert tensor {name!r} of the record matches no known layout")
        compared.add(name)
    expected_count = {
        "original": 3 * spec.num_experts,
        "fused": 2,
        "sharded": 3 * spec.num_experts,
    }[layout]
    expected_count += 3 * spec.num_shared_experts + int(spec.shared_expert_gate)
    assert len(compared) == expected_count * len(spec.moe_layers)
    # the layers holding experts in the files are exactly the spec's MoE layers
    layers = {int(re.match(r"model\.layers\.(\d+)\.", n).group(1)) for n in compared}  # type: ignore[union-attr]
    assert sorted(layers) == list(spec.moe_layers)
