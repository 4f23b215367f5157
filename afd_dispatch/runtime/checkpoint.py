"""Load only the expert weights one FFN rank hosts, straight from a model's safetensors files.

An FFN rank hosts a few experts of each MoE layer; reading the whole model (hundreds of GB
for DeepSeek-V3) to keep 1/F of it would dominate start-up. So the loader finds each wanted
tensor through `model.safetensors.index.json` and opens only the files that hold one, and
from a fused expert tensor (all experts of a layer in one [E, ...] tensor) it reads only
the wanted experts' rows (`safe_open(...).get_slice`, memory-mapped).

Layouts read, per `MoESpec.weight_scheme` (l: layer, e: expert):

==============  ====================================================================
qwen3_moe,      `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`
qwen2_moe,      (what published checkpoints hold, and what transformers 5.19
deepseek        `save_pretrained` writes by default)
mixtral         `model.layers.{l}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`
                (w1 gate, w3 up, w2 down)
all (fused)     `model.layers.{l}.mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first)
                and `model.layers.{l}.mlp.experts.down_proj` [E, H, I]: transformers 5
                `save_pretrained(save_original_format=False)`, Mixtral included
qwen2_moe       shared `model.layers.{l}.mlp.shared_expert.{gate,up,down}_proj.weight`,
                gate `model.layers.{l}.mlp.shared_expert_gate.weight` [1, H]
deepseek        shared `model.layers.{l}.mlp.shared_experts.{gate,up,down}_proj.weight`
                (the n_shared_experts shared experts as one MLP)
==============  ====================================================================

Files and the index are untrusted: a tensor of the wrong shape or dtype, an index entry
that leaves the model directory, a missing tensor or a corrupt file raise `AFDInputError`
naming the tensor or file. Quantized checkpoints (e.g. DeepSeek-V3's FP8 release) are
refused by dtype; dequantize them first.
"""

from __future__ import annotations

import glob
import operator
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.untrusted_json import read_object

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_INDEX_BYTES = 64 << 20  # DeepSeek-V3's index, ~91k tensors, is under 10 MiB
# safetensors dtype names of the float formats experts are computed in
FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
OUT_DTYPES = tuple(FILE_DTYPES.values())

FUSED_GATE_UP = "model.layers.{layer}.mlp.experts.gate_up_proj"
FUSED_DOWN = "model.layers.{layer}.mlp.experts.down_proj"


@dataclass(frozen=True)
class _Names:
    """Tensor names of one weight scheme (`str.format` templates)."""

    expert: str  # fields: layer, expert, proj
    projs: tuple[str, str, str]  # the `proj` of gate, up, down
    shared: str | None = None  # fields: layer, proj (gate_proj / up_proj / down_proj)
    shared_gate: str | None = None  # field: layer


_QWEN_EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
_PROJS = ("gate_proj", "up_proj", "down_proj")
SCHEMES = {
    "qwen3_moe": _Names(_QWEN_EXPERT, _PROJS),
    "qwen2_moe": _Names(
        _QWEN_EXPERT,
        _PROJS,
        shared="model.layers.{layer}.mlp.shared_expert.{proj}.weight",
        shared_gate="model.layers.{layer}.mlp.shared_expert_gate.weight",
    ),
    "deepseek": _Names(
        _QWEN_EXPERT, _PROJS, shared="model.layers.{layer}.mlp.shared_experts.{proj}.weight"
    ),
    "mixtral": _Names(
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight", ("w1", "w3", "w2")
    ),
}


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """One SwiGLU expert: `down(silu(gate x) * up x)`, i.e. `(silu(x gate^T) * x up^T) down^T`.

    `gate` and `up` are (I, H), `down` is (H, I), all of one float dtype (checked).
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("gate", "up", "down"):
            t = getattr(self, name)
            check(isinstance(t, torch.Tensor), name, "a tensor", type(t).__name__)
            check(t.dim() == 2, f"{name}.dim()", "2", t.dim())
            check(t.dtype in OUT_DTYPES, f"{name}.dtype", f"one of {list(OUT_DTYPES)}", t.dtype)
        inter, hidden = self.gate.shape
        check(
            self.up.shape == (inter, hidden),
            "up.shape",
            f"gate's ({inter}, {hidden})",
            tuple(self.up.shape),
        )
        check(
            self.down.shape == (hidden, inter),
            "down.shape",
            f"({hidden}, {inter})",
            tuple(self.down.shape),
        )
        dtypes = {self.gate.dtype, self.up.dtype, self.down.dtype}
        check(len(dtypes) == 1, "gate/up/down dtype", "one dtype", sorted(map(str, dtypes)))

    @property
    def hidden_size(self) -> int:
        return int(self.gate.shape[1])

    @property
    def intermediate_size(self) -> int:
        return int(self.gate.shape[0])


@dataclass(frozen=True, eq=False)
class SharedExpertWeights(ExpertWeights):
    """A shared expert; Qwen2-MoE's output is scaled by `sigmoid(x gate_weight^T)`.

    `gate_weight` is (1, H) in the expert's dtype, or None (DeepSeek: no gate).
    """

    gate_weight: torch.Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        g = self.gate_weight
        if g is None:
            return
        check(isinstance(g, torch.Tensor), "gate_weight", "a tensor or None", type(g).__name__)
        check(
            g.shape == (1, self.hidden_size),
            "gate_weight.shape",
            f"(1, {self.hidden_size})",
            tuple(g.shape),
        )
        check(g.dtype == self.gate.dtype, "gate_weight.dtype", str(self.gate.dtype), g.dtype)


def load_routed_experts(
    path: str | os.PathLike[str],
    spec: MoESpec,
    layer: int,
    experts: Iterable[int],
    dtype: torch.dtype | None = None,
) -> dict[int, ExpertWeights]:
    """Read routed experts `experts` (global ids) of MoE layer `layer` from the model at `path`.

    Returns {expert id: weights} in ascending id order (duplicate ids read once), in the
    file's dtype or in `dtype` if given. Only the files holding those experts are opened
    (all files' headers when the model has neither an index nor a single model.safetensors);
    from fused tensors only the wanted experts' rows are read. Experts missing from the
    files, wrong shapes or dtypes, and a layer whose experts appear both fused and one by
    one raise `AFDInputError`.
    """
    _check_spec_layer(spec, layer)
    wanted = _expert_ids(experts, spec.num_experts)
    _check_dtype(dtype)
    if not wanted:
        return {}
    names = SCHEMES[spec.weight_scheme]
    inter, hidden = spec.moe_intermediate_size, spec.hidden_size
    with _Checkpoint(path) as ckpt:
        fused = FUSED_GATE_UP.format(layer=layer)

        def expert_name(e: int, i: int) -> str:
            return names.expert.format(layer=layer, expert=e, proj=names.projs[i])

        if not ckpt.has(fused):
            out: dict[int, ExpertWeights] = {}
            for e in wanted:
                gate, up, down = (
                    ckpt.read(expert_name(e, i), shape)
                    for i, shape in enumerate(((inter, hidden), (inter, hidden), (hidden, inter)))
                )
                out[e] = _weights(ExpertWeights, expert_name(e, 0), dtype, gate, up, down)
            return out
        both = [expert_name(e, i) for e in wanted for i in range(3) if ckpt.has(expert_name(e, i))]
        check(
            not both,
            f"layer {layer} experts",
            "one layout: fused experts.gate_up_proj / down_proj or per-expert tensors",
            f"both {fused!r} and {both[0]!r}" if both else None,
        )
        down_name = FUSED_DOWN.format(layer=layer)
        experts_all = spec.num_experts
        out = {}
        for e in wanted:
            rows = slice(e, e + 1)
            gate = ckpt.read(fused, (experts_all, 2 * inter, hidden), (rows, slice(0, inter)))[0]
            up = ckpt.read(fused, (experts_all, 2 * inter, hidden), (rows, slice(inter, None)))[0]
            down = ckpt.read(down_name, (experts_all, hidden, inter), (rows,))[0]
            out[e] = _weights(ExpertWeights, f"{fused}[{e}]", dtype, gate, up, down)
        return out


def load_shared_expert(
    path: str | os.PathLike[str],
    spec: MoESpec,
    layer: int,
    dtype: torch.dtype | None = None,
) -> SharedExpertWeights | None:
    """Read the shared expert of MoE layer `layer`; None (no file opened) if the model has none.

    Shapes are (Is, H), (Is, H), (H, Is) with Is = `spec.shared_intermediate_size`, plus
    Qwen2-MoE's (1, H) `gate_weight`; in the file's dtype or in `dtype` if given.
    """
    _check_spec_layer(spec, layer)
    _check_dtype(dtype)
    if spec.num_shared_experts == 0:
        return None
    names = SCHEMES[spec.weight_scheme]
    # MoESpec allows a shared slot (and its gate) only where the scheme names them
    assert names.shared is not None
    inter, hidden = spec.shared_intermediate_size, spec.hidden_size
    with _Checkpoint(path) as ckpt:
        gate, up, down = (
            ckpt.read(names.shared.format(layer=layer, proj=proj), shape)
            for proj, shape in zip(
                _PROJS, ((inter, hidden), (inter, hidden), (hidden, inter)), strict=True
            )
        )
        gate_weight = None
        if spec.shared_expert_gate:
            assert names.shared_gate is not None
            gate_weight = ckpt.read(names.shared_gate.format(layer=layer), (1, hidden))
        first = names.shared.format(layer=layer, proj=_PROJS[0])
        return _weights(SharedExpertWeights, first, dtype, gate, up, down, gate_weight)


# -- where tensors live --------------------------------------------------------------------
class _Checkpoint:
    """The tensor -> file map of one model directory, and the files opened so far.

    With an index, files are opened only when a tensor in them is read. Without one, the
    single `model.safetensors` (else every `*.safetensors`) is opened to list its tensors.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = os.fspath(path)
        check(
            os.path.isdir(self.root),
            "model path",
            "a directory holding the model's safetensors files",
            self.root,
        )
        self._open: dict[str, Any] = {}
        self._keys: dict[str, frozenset[str]] = {}
        index = os.path.join(self.root, INDEX_FILE)
        if os.path.exists(index):
            self.where = index + " (weight_map)"
            self.weight_map = _read_index(index)
            return
        if os.path.exists(os.path.join(self.root, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            files = sorted(
                os.path.basename(p) for p in glob.glob(os.path.join(self.root, "*.safetensors"))
            )
        check(
            len(files) > 0,
            "model path",
            f"a directory with {INDEX_FILE}, {SINGLE_FILE} or *.safetensors files",
            self.root,
        )
        self.where = ", ".join(os.path.join(self.root, f) for f in files)
        self.weight_map = {}
        for f in files:
            for name in self._file_keys(f):
                check(
                    name not in self.weight_map,
                    f"tensor {name!r}",
                    "stored in one file only",
                    f"in both {self.weight_map.get(name)} and {f}",
                )
                self.weight_map[name] = f

    def __enter__(self) -> _Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, file: str) -> Any:
        if file not in self._open:
            full = os.path.join(self.root, file)
            try:
                handle = safe_open(full, framework="pt")
                handle.__enter__()
                keys = frozenset(handle.keys())
            except (SafetensorError, OSError) as exc:
                raise AFDInputError(
                    f"checkpoint file {full!r}", "a readable safetensors file", str(exc)[:300]
                ) from None
            self._open[file] = handle
            self._keys[file] = keys
        return self._open[file]

    def _file_keys(self, file: str) -> frozenset[str]:
        self._handle(file)
        return self._keys[file]

    def _slice(self, name: str) -> tuple[str, Any]:
        file = self.weight_map.get(name)
        if file is None:
            raise AFDInputError(
                f"checkpoint tensor {name!r}", f"present in {self.where}", "missing"
            )
        full = os.path.join(self.root, file)
        if name not in self._file_keys(file):
            raise AFDInputError(
                f"checkpoint tensor {name!r}",
                f"present in {full} (where {INDEX_FILE} places it)",
                "missing",
            )
        return full, self._handle(file).get_slice(name)

    def check_meta(self, name: str, shape: tuple[int, ...]) -> None:
        """Refuse `name` unless it is a float tensor of exactly `shape` (no data read)."""
        full, sl = self._slice(name)
        dtype, got = sl.get_dtype(), tuple(sl.get_shape())
        check(
            dtype in FILE_DTYPES,
            f"checkpoint tensor {name!r} in {full}",
            f"dtype one of {list(FILE_DTYPES)} (quantized checkpoints are not supported)",
            dtype,
        )
        check(got == shape, f"checkpoint tensor {name!r} in {full}", f"shape {shape}", got)

    def read(
        self, name: str, shape: tuple[int, ...], index: tuple[slice, ...] | None = None
    ) -> torch.Tensor:
        """Tensor `name`, or its part `index`, after checking its dtype and full shape."""
        self.check_meta(name, shape)
        _, sl = self._slice(name)
        return sl[index] if index is not None else sl[:]  # type: ignore[no-any-return]


def _read_index(index: str) -> dict[str, str]:
    data = read_object(index, INDEX_FILE, MAX_INDEX_BYTES)
    weight_map = data.get("weight_map")
    check(
        isinstance(weight_map, dict),
        f"{index} weight_map",
        "an object {tensor name: file name}",
        type(weight_map).__name__,
    )
    assert isinstance(weight_map, dict)  # for mypy
    files: set[str] = set()
    for name, file in weight_map.items():
        check(isinstance(file, str), f"{index} weight_map[{name!r}]", "a file name", file)
        files.add(file)
    for file in files:
        check(
            _inside(file),
            f"{index} weight_map file",
            "a relative *.safetensors path inside the model directory",
            file,
        )
    return weight_map


def _inside(file: str) -> bool:
    # Lexical check only: symlinks are the directory owner's choice, and the Hugging Face
    # cache links every snapshot file to ../../blobs, so resolving them would refuse it.
    if not file.endswith(".safetensors") or "\\" in file or "\x00" in file:
        return False
    if posixpath.isabs(file) or os.path.isabs(file) or os.path.splitdrive(file)[0]:
        return False
    return ".." not in posixpath.normpath(file).split("/")


# -- argument checks -----------------------------------------------------------------------
def _check_spec_layer(spec: MoESpec, layer: int) -> None:
    check(isinstance(spec, MoESpec), "spec", "a MoESpec", type(spec).__name__)
    check(
        isinstance(layer, int) and not isinstance(layer, bool) and layer in spec.moe_layers,
        "layer",
        f"an MoE layer of the model, one of {list(spec.moe_layers)}",
        layer,
    )


def _expert_ids(experts: Iterable[int], num_experts: int) -> list[int]:
    check(
        isinstance(experts, Iterable) and not isinstance(experts, (str, bytes)),
        "experts",
        "an iterable of expert ids",
        type(experts).__name__,
    )
    ids: set[int] = set()
    for e in experts:
        try:
            value = operator.index(e) if not isinstance(e, bool) else None
        except TypeError:
            value = None
        check(
            value is not None and 0 <= value < num_experts,
            "experts",
            f"routed expert ids in [0, {num_experts}) (shared rows: load_shared_expert)",
            e,
        )
        assert value is not None  # for mypy
        ids.add(value)
    return sorted(ids)


def _check_dtype(dtype: torch.dtype | None) -> None:
    check(
        dtype is None or dtype in OUT_DTYPES, "dtype", f"None or one of {list(OUT_DTYPES)}", dtype
    )


def _weights(
    cls: type[Any], name: str, dtype: torch.dtype | None, *tensors: torch.Tensor | None
) -> Any:
    converted = [t if t is None or dtype is None else t.to(dtype) for t in tensors]
    try:
        return cls(*converted)
    except AFDInputError as exc:  # e.g. gate BF16 but down F32 in the file, no dtype given
        raise AFDInputError(
            f"checkpoint tensors of {name!r}: {exc.argument}", exc.allowed, exc.value
        ) from None
