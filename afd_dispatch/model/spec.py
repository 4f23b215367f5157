"""`MoESpec`: what AFD needs to know of an MoE model, read from its Hugging Face config.json.

config.json comes with a downloaded model and is untrusted input: an unknown architecture,
a missing key that fixes a tensor shape, or a value out of range raises `AFDInputError`
naming the key (`config['n_routed_experts']`), what is allowed and the value seen.

Keys that only change behaviour default as the architecture's transformers config class
defaults them (so a config transformers loads reads the same here); keys that fix tensor
shapes (sizes, expert counts) must be present, because a wrong default there would load
wrong-shaped weights or silently skip experts. Keys AFD does not use are ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from afd_dispatch.errors import check
from afd_dispatch.layout import MAX_TOPK
from afd_dispatch.model.routing import RouterSpec
from afd_dispatch.untrusted_json import is_int, is_number, read_object

ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3")
# Which tensor names hold the experts (see `afd_dispatch.runtime.checkpoint`). DeepSeek V2
# and V3 name their expert weights alike.
WEIGHT_SCHEMES = {
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen2_moe",
    "mixtral": "mixtral",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
}
# Shared slots each architecture can have: Qwen2-MoE always one (gated), DeepSeek one
# unless n_shared_experts is 0 or null, Qwen3-MoE and Mixtral none.
SHARED_SLOTS = {
    "qwen3_moe": (0,),
    "qwen2_moe": (1,),
    "mixtral": (0,),
    "deepseek_v2": (0, 1),
    "deepseek_v3": (0, 1),
}
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# Architectures whose router fixes norm_topk_prob: Mixtral always renormalises its top-k;
# transformers' DeepSeek-V2 router never does (it drops the key), while vLLM would honour a
# true one, so only false means the same routing in both.
_FIXED_NORM = {"mixtral": True, "deepseek_v2": False}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

MAX_HIDDEN_SIZE = 1 << 16
MAX_LAYERS = 1024
MAX_EXPERTS = 1 << 16
MAX_INTERMEDIATE_SIZE = 1 << 20
MAX_ROUTED_SCALING = 1000.0
MAX_JSON_BYTES = 1 << 20  # a config.json is a few KiB


@dataclass(frozen=True)
class MoESpec:
    """The MoE structure of a model, as the AFD runtime uses it. Checked at construction.

    Experts are SwiGLU MLPs: `down(silu(gate(x)) * up(x))`. `moe_layers` are the decoder
    layer indices (0-based, in `[0, num_layers)`; DeepSeek's multi-token-prediction layers
    are not decoder layers) whose MLP is an MoE block. A model has at most one shared
    *slot* in the AFD expert table: DeepSeek's `n_shared_experts` shared experts are
    stored and computed as one MLP of `moe_intermediate_size * n_shared_experts`, and
    Qwen2-MoE's one shared expert is scaled by `sigmoid(shared_expert_gate(x))`.

    Routing (done on the attention side, recorded here so both sides agree): scores are
    `scoring_func(router logits)`; `topk_method` "greedy" takes the top `topk` of all
    experts, "group_limited_greedy" (DeepSeek-V2) and "noaux_tc" (DeepSeek-V3) first keep
    the best `topk_group` of `n_group` equal expert groups; "noaux_tc" ranks by score plus
    the per-expert `e_score_correction_bias` but weighs by the score. Weights are then
    renormalised to sum to 1 if `norm_topk_prob` (at every K, K = 1 included), and
    multiplied by `routed_scaling_factor`. `n_group == topk_group == 1` when routing has no
    groups. `router_spec()` hands these fields to `afd_dispatch.model.routing.route`.

    `dtype` is the model's stated dtype (`dtype` / `torch_dtype` of config.json), None
    when the config states none.
    """

    architecture: str
    hidden_size: int
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    topk: int
    moe_intermediate_size: int
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        check(
            self.architecture in ARCHITECTURES,
            "architecture",
            f"one of {list(ARCHITECTURES)}",
            self.architecture,
        )
        _int_field(self, "hidden_size", 1, MAX_HIDDEN_SIZE)
        _int_field(self, "num_layers", 1, MAX_LAYERS)
        if isinstance(self.moe_layers, list):
            object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        layers = self.moe_layers
        check(
            isinstance(layers, tuple)
            and len(layers) >= 1
            and all(is_int(x) and 0 <= x < self.num_layers for x in layers)
            and list(layers) == sorted(set(layers)),
            "moe_layers",
            f"a non-empty ascending tuple of distinct layer indices in [0, {self.num_layers})",
            layers,
        )
        _int_field(self, "num_experts", 1, MAX_EXPERTS)
        _int_field(self, "topk", 1, min(MAX_TOPK, self.num_experts))
        _int_field(self, "moe_intermediate_size", 1, MAX_INTERMEDIATE_SIZE)
        check(
            self.num_shared_experts in SHARED_SLOTS[self.architecture]
            and is_int(self.num_shared_experts),
            "num_shared_experts",
            f"one of {list(SHARED_SLOTS[self.architecture])} for {self.architecture}",
            self.num_shared_experts,
        )
        if self.num_shared_experts:
            _int_field(self, "shared_intermediate_size", 1, MAX_INTERMEDIATE_SIZE)
        else:
            _int_field(self, "shared_intermediate_size", 0, 0)
        for name in ("shared_expert_gate", "norm_topk_prob"):
            check(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        gated = self.architecture == "qwen2_moe"
        check(
            self.shared_expert_gate == gated,
            "shared_expert_gate",
            f"{gated} for {self.architecture} (only Qwen2-MoE gates its shared expert)",
            self.shared_expert_gate,
        )
        value = self.routed_scaling_factor
        check(
            is_number(value) and math.isfinite(value) and 0 < value <= MAX_ROUTED_SCALING,
            "routed_scaling_factor",
            f"a number in (0, {MAX_ROUTED_SCALING:g}]",
            value,
        )
        check(
            self.scoring_func in SCORING_FUNCS,
            "scoring_func",
            f"one of {list(SCORING_FUNCS)}",
            self.scoring_func,
        )
        check(
            self.topk_method in TOPK_METHODS,
            "topk_method",
            f"one of {list(TOPK_METHODS)}",
            self.topk_method,
        )
        check_groups(self.num_experts, self.topk, self.topk_method, self.n_group, self.topk_group)
        fixed = _FIXED_NORM.get(self.architecture)
        check(
            fixed is None or self.norm_topk_prob == fixed,
            "norm_topk_prob",
            f"{fixed} for {self.architecture}",
            self.norm_topk_prob,
        )
        check(
            self.dtype is None or self.dtype in DTYPES.values(),
            "dtype",
            f"None or one of {list(DTYPES.values())}",
            self.dtype,
        )

    # -- derived ---------------------------------------------------------------------------
    @property
    def weight_scheme(self) -> str:
        """The tensor naming scheme of the checkpoint's expert weights (`WEIGHT_SCHEMES`)."""
        return WEIGHT_SCHEMES[self.architecture]

    @property
    def score_correction_bias(self) -> bool:
        """Whether the router has DeepSeek-V3's `e_score_correction_bias` (per expert)."""
        return self.topk_method == "noaux_tc"

    def router_spec(self) -> RouterSpec:
        """The routing fields as the `RouterSpec` that `route()` takes."""
        return RouterSpec(
            num_experts=self.num_experts,
            topk=self.topk,
            scoring_func=self.scoring_func,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            n_group=self.n_group,
            topk_group=self.topk_group,
            topk_method=self.topk_method,
        )

    # -- parsing ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> MoESpec:
        """Read `config.json` from a model directory (or the path of the file itself)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_hf_config(read_object(path, "config.json", MAX_JSON_BYTES))

    @classmethod
    def from_hf_config(cls, config: Any) -> MoESpec:
        """Build the spec from a parsed config.json (a dict); see the module docstring."""
        # The readers use this module's limits and checks: imported here, not at the top.
        from afd_dispatch.model.hf_config import (
            EXPERT_COUNT_KEYS,
            ConfigKeys,
            config_dtype,
            deepseek_fields,
            mixtral_fields,
            qwen_fields,
        )

        check(
            isinstance(config, Mapping),
            "config",
            "a JSON object (the parsed config.json)",
            type(config).__name__,
        )
        keys = ConfigKeys(config)
        arch = config.get("model_type")
        check(
            isinstance(arch, str) and arch in ARCHITECTURES,
            "config['model_type']",
            f"one of {list(ARCHITECTURES)}",
            arch,
        )
        hidden = keys.integer("hidden_size", 1, MAX_HIDDEN_SIZE)
        layers = keys.integer("num_hidden_layers", 1, MAX_LAYERS)
        # The FFN ranks compute SwiGLU experts; another activation would be silently wrong.
        keys.choice("hidden_act", ("silu",), default="silu")
        experts = keys.expert_count(EXPERT_COUNT_KEYS[arch])
        topk = keys.integer("num_experts_per_tok", 1, min(MAX_TOPK, experts))
        if arch == "mixtral":
            fields = mixtral_fields(keys, layers)
        elif arch in ("qwen3_moe", "qwen2_moe"):
            fields = qwen_fields(keys, arch, layers)
        else:
            fields = deepseek_fields(keys, arch, layers, experts, topk)
        return cls(
            architecture=arch,
            hidden_size=hidden,
            num_layers=layers,
            num_experts=experts,
            topk=topk,
            dtype=config_dtype(config),
            **fields,
        )


# -- routing groups ------------------------------------------------------------------------
def check_groups(experts: int, topk: int, method: str, n_group: Any, topk_group: Any) -> None:
    if method == "greedy":
        check(n_group == 1, "n_group", "1 (greedy routing has no expert groups)", n_group)
        check(topk_group == 1, "topk_group", "1 (greedy routing has no expert groups)", topk_group)
        return
    check(
        is_int(n_group) and 1 <= n_group <= experts and experts % n_group == 0,
        "n_group",
        f"a divisor of num_experts={experts}",
        n_group,
    )
    per_group = experts // n_group
    check(
        is_int(topk_group) and 1 <= topk_group <= n_group,
        "topk_group",
        f"an integer in [1, n_group={n_group}]",
        topk_group,
    )
    check(
        topk <= topk_group * per_group,
        "topk_group",
        f"enough groups for topk={topk}: topk_group * {per_group} experts per group >= topk",
        topk_group,
    )
    # noaux_tc scores a group by the sum of its two best experts
    check(
        method != "noaux_tc" or per_group >= 2,
        "n_group",
        f"at most num_experts / 2 = {experts // 2} (noaux_tc ranks groups by their top 2)",
        n_group,
    )


# -- small helpers -------------------------------------------------------------------------
def _int_field(spec: MoESpec, name: str, lo: int, hi: int) -> None:
    value = getattr(spec, name)
    check(is_int(value) and lo <= value <= hi, name, f"an integer in [{lo}, {hi}]", value)
