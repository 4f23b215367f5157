"""How each architecture's Hugging Face config.json keys give `MoESpec`'s fields.

`ConfigKeys` reads a key typed and range-checked, and every error names the key; one reader
per architecture family maps its keys (and their defaults) to `MoESpec` fields.
`MoESpec.from_hf_config` (`afd_dispatch.model.spec`, whose docstring states the
rules) calls them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.model.spec import (
    DTYPES,
    MAX_EXPERTS,
    MAX_INTERMEDIATE_SIZE,
    MAX_LAYERS,
    MAX_ROUTED_SCALING,
    check_groups,
)
from afd_dispatch.untrusted_json import is_int, is_number

# The expert count's key, then the aliases transformers' `attribute_map` also accepts.
# transformers 5.19 itself writes Qwen3-MoE's count as `num_local_experts`, while the
# configs published with Qwen3 models say `num_experts`.
EXPERT_COUNT_KEYS = {
    "qwen3_moe": ("num_experts", "num_local_experts"),
    "qwen2_moe": ("num_experts",),
    "mixtral": ("num_local_experts", "num_experts"),
    "deepseek_v2": ("n_routed_experts", "num_experts"),
    "deepseek_v3": ("n_routed_experts", "num_local_experts"),
}


# -- per architecture ----------------------------------------------------------------------
def mixtral_fields(keys: ConfigKeys, layers: int) -> dict[str, Any]:
    # Every layer is sparse; the router always renormalises its top-k softmax weights.
    return {
        "moe_layers": tuple(range(layers)),
        "moe_intermediate_size": keys.integer("intermediate_size", 1, MAX_INTERMEDIATE_SIZE),
        "norm_topk_prob": True,
    }


def qwen_fields(keys: ConfigKeys, arch: str, layers: int) -> dict[str, Any]:
    step = keys.integer("decoder_sparse_step", 1, MAX_LAYERS, default=1)
    dense = set(keys.layer_list("mlp_only_layers", layers))
    # transformers and vLLM: layer l is sparse unless listed, and only every step-th layer
    moe_layers = tuple(x for x in range(layers) if x not in dense and (x + 1) % step == 0)
    check(
        len(moe_layers) > 0,
        "config['decoder_sparse_step'] / config['mlp_only_layers']",
        f"at least one MoE layer among num_hidden_layers={layers}",
        {"decoder_sparse_step": step, "mlp_only_layers": sorted(dense)},
    )
    fields: dict[str, Any] = {
        "moe_layers": moe_layers,
        "moe_intermediate_size": keys.integer("moe_intermediate_size", 1, MAX_INTERMEDIATE_SIZE),
        "norm_topk_prob": keys.boolean("norm_topk_prob", default=False),
    }
    if arch == "qwen2_moe":
        fields["num_shared_experts"] = 1
        fields["shared_intermediate_size"] = keys.integer(
            "shared_expert_intermediate_size", 1, MAX_INTERMEDIATE_SIZE
        )
        fields["shared_expert_gate"] = True
    return fields


def deepseek_fields(
    keys: ConfigKeys, arch: str, layers: int, experts: int, topk: int
) -> dict[str, Any]:
    v3 = arch == "deepseek_v3"
    inter = keys.integer("moe_intermediate_size", 1, MAX_INTERMEDIATE_SIZE)
    # null is how a config says "no shared experts" (vLLM builds none then)
    shared = keys.integer("n_shared_experts", 0, 64, allow_null=True)
    first_dense = keys.integer("first_k_dense_replace", 0, layers - 1, default=3 if v3 else 0)
    # DeepSeek's own modeling code and vLLM read it; transformers assumes 1
    freq = keys.integer("moe_layer_freq", 1, MAX_LAYERS, default=1)
    moe_layers = tuple(x for x in range(first_dense, layers) if x % freq == 0)
    check(
        len(moe_layers) > 0,
        "config['first_k_dense_replace'] / config['moe_layer_freq']",
        f"at least one MoE layer among num_hidden_layers={layers}",
        {"first_k_dense_replace": first_dense, "moe_layer_freq": freq},
    )
    # transformers implements V3 routing only as sigmoid scores with the correction bias and
    # group-limited selection, and V2 routing only as softmax scores.
    if v3:
        method = keys.choice("topk_method", ("noaux_tc",), default="noaux_tc")
        scoring = keys.choice("scoring_func", ("sigmoid",), default="sigmoid")
    else:
        methods = ("greedy", "group_limited_greedy")
        method = keys.choice("topk_method", methods, default="greedy")
        scoring = keys.choice("scoring_func", ("softmax",), default="softmax")
    if method == "greedy":
        # transformers' greedy router ignores the groups, but vLLM's DeepSeek MoE applies
        # n_group / topk_group whatever topk_method says: only "no groups" routes alike.
        for key in ("n_group", "topk_group"):
            value = keys.config.get(key)
            check(
                value is None or (is_int(value) and value == 1),
                f"config[{key!r}]",
                "1 or null with topk_method 'greedy'",
                value,
            )
        n_group = topk_group = 1
    else:
        n_group = keys.integer("n_group", 1, experts, default=8 if v3 else None)
        topk_group = keys.integer("topk_group", 1, n_group, default=4 if v3 else None)
        try:
            check_groups(experts, topk, method, n_group, topk_group)
        except AFDInputError as exc:
            raise AFDInputError(
                "config['n_group'] / config['topk_group']",
                exc.allowed,
                {"n_group": n_group, "topk_group": topk_group, "num_experts_per_tok": topk},
            ) from None
    norm = keys.boolean("norm_topk_prob", default=v3)
    if not v3:
        check(
            not norm,
            "config['norm_topk_prob']",
            "false for deepseek_v2 (transformers never renormalises V2's top-k weights, vLLM"
            " would: they agree only on false)",
            norm,
        )
    return {
        "moe_layers": moe_layers,
        "moe_intermediate_size": inter,
        "num_shared_experts": 1 if shared else 0,
        "shared_intermediate_size": inter * shared,
        "norm_topk_prob": norm,
        "routed_scaling_factor": keys.number(
            "routed_scaling_factor", MAX_ROUTED_SCALING, default=2.5 if v3 else 1.0
        ),
        "scoring_func": scoring,
        "topk_method": method,
        "n_group": n_group,
        "topk_group": topk_group,
    }


def config_dtype(config: Mapping[str, Any]) -> torch.dtype | None:
    # transformers 5 writes `dtype`, older versions `torch_dtype`; a config may carry both.
    seen = {k: config[k] for k in ("dtype", "torch_dtype") if config.get(k) is not None}
    for key, value in seen.items():
        check(
            isinstance(value, str) and value in DTYPES,
            f"config[{key!r}]",
            f"one of {list(DTYPES)}",
            value,
        )
    check(
        len(set(seen.values())) <= 1,
        "config['dtype'] / config['torch_dtype']",
        "the same dtype when both are given",
        seen,
    )
    return DTYPES[next(iter(seen.values()))] if seen else None


class ConfigKeys:
    """Typed reads of config.json keys; every error names the key."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    def _get(self, key: str, default: Any, allow_null: bool = False) -> Any:
        present = key in self.config and (allow_null or self.config[key] is not None)
        if present:
            return self.config[key]
        check(default is not None, f"config[{key!r}]", "present (a required key)", None)
        return default

    def integer(
        self, key: str, lo: int, hi: int, default: int | None = None, allow_null: bool = False
    ) -> int:
        value = self._get(key, default, allow_null)
        if value is None and allow_null:
            return 0
        check(
            is_int(value) and lo <= value <= hi,
            f"config[{key!r}]",
            f"an integer in [{lo}, {hi}]",
            value,
        )
        return int(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        check(isinstance(value, bool), f"config[{key!r}]", "true or false", value)
        return bool(value)

    def number(self, key: str, hi: float, default: float) -> float:
        value = self._get(key, default)
        check(
            is_number(value) and math.isfinite(value) and 0 < value <= hi,
            f"config[{key!r}]",
            f"a number in (0, {hi:g}]",
            value,
        )
        return float(value)

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self._get(key, default)
        check(
            isinstance(value, str) and value in allowed,
            f"config[{key!r}]",
            f"one of {list(allowed)}",
            value,
        )
        return str(value)

    def layer_list(self, key: str, layers: int) -> list[int]:
        value = self._get(key, [])
        check(
            isinstance(value, list)
            and len(value) <= layers
            and all(is_int(x) and 0 <= x < layers for x in value),
            f"config[{key!r}]",
            f"a list of layer indices in [0, {layers})",
            value,
        )
        return list(value)

    def expert_count(self, keys: tuple[str, ...]) -> int:
        given = [k for k in keys if self.config.get(k) is not None]
        check(
            len(given) > 0,
            f"config[{keys[0]!r}]",
            "present (a required key: the number of routed experts)",
            None,
        )
        counts = {k: self.integer(k, 1, MAX_EXPERTS) for k in given}
        check(
            len(set(counts.values())) == 1,
            " / ".join(f"config[{k!r}]" for k in given),
            "the same expert count under each name",
            counts,
        )
        return counts[given[0]]


# -- small helpers -------------------------------------------------------------------------
