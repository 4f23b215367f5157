"""`route()` against transformers' own routers, for every architecture the runtime claims.

Each case builds a tiny transformers config, reads it through `MoESpec.from_hf_config` (the
path a real model takes) into a `RouterSpec`, and runs transformers' router module of that
architecture on the same logits: its gate weight is the identity and its hidden size the
expert count, so the logits it routes are exactly the ones fed (checked). The routers are
transformers 5.19's `{Qwen3Moe,Qwen2Moe,Mixtral}TopKRouter` and
`DeepseekV{2,3}TopkRouter`; each returns (logits, top-k weights, top-k ids).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    PreTrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from afd_dispatch import AFDInputError
from afd_dispatch.model.routing import RouterSpec, route
from afd_dispatch.model.spec import MoESpec

EXPERTS = 16
TOKENS = 64
# 4 groups of 4, 2 kept: 8 candidate experts, enough for every K tested
GROUPS: dict[str, Any] = {"n_group": 4, "topk_group": 2}
COMMON: dict[str, Any] = {
    "hidden_size": EXPERTS,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 32,
}
DEEPSEEK: dict[str, Any] = {
    **COMMON,
    "n_routed_experts": EXPERTS,
    "moe_intermediate_size": 8,
    "first_k_dense_replace": 0,
}

ROUTERS: dict[str, type[torch.nn.Module]] = {
    "qwen3_moe": Qwen3MoeTopKRouter,
    "qwen2_moe": Qwen2MoeTopKRouter,
    "mixtral": MixtralTopKRouter,
    "deepseek_v2": DeepseekV2TopkRouter,
    "deepseek_v3": DeepseekV3TopkRouter,
}

# name -> config for K experts per token; every routing variant a config can select
VARIANTS: dict[str, Callable[[int], PreTrainedConfig]] = {
    "qwen3_moe norm": lambda k: Qwen3MoeConfig(
        **COMMON, num_experts=EXPERTS, num_experts_per_tok=k, norm_topk_prob=True
    ),
    "qwen3_moe default (no norm)": lambda k: Qwen3MoeConfig(
        **COMMON, num_experts=EXPERTS, num_experts_per_tok=k
    ),
    "qwen2_moe default (no norm)": lambda k: Qwen2MoeConfig(
        **COMMON, num_experts=EXPERTS, num_experts_per_tok=k
    ),
    "qwen2_moe norm": lambda k: Qwen2MoeConfig(
        **COMMON, num_experts=EXPERTS, num_experts_per_tok=k, norm_topk_prob=True
    ),
    "mixtral": lambda k: MixtralConfig(**COMMON, num_local_experts=EXPERTS, num_experts_per_tok=k),
    "deepseek_v2 greedy": lambda k: DeepseekV2Config(**DEEPSEEK, num_experts_per_tok=k),
    "deepseek_v2 greedy scaled": lambda k: DeepseekV2Config(
        **DEEPSEEK, num_experts_per_tok=k, routed_scaling_factor=16.0
    ),
    "deepseek_v2 group_limited_greedy": lambda k: DeepseekV2Config(
        **DEEPSEEK,
        **GROUPS,
        num_experts_per_tok=k,
        topk_method="group_limited_greedy",
        routed_scaling_factor=16.0,
    ),
    "deepseek_v3 default": lambda k: DeepseekV3Config(**DEEPSEEK, **GROUPS, num_experts_per_tok=k),
    "deepseek_v3 no norm": lambda k: DeepseekV3Config(
        **DEEPSEEK, **GROUPS, num_experts_per_tok=k, norm_topk_prob=False
    ),
    "deepseek_v3 one group": lambda k: DeepseekV3Config(
        **DEEPSEEK, n_group=1, topk_group=1, num_experts_per_tok=k, routed_scaling_factor=1.5
    ),
}


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits float32 (TOKENS, EXPERTS), decisive but not one-hot; a correction bias
    float32 (EXPERTS,) large enough next to sigmoid scores to change choices."""
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(TOKENS, EXPERTS, generator=g), 0.3 * torch.randn(EXPERTS, generator=g)


def hf_route(
    config: PreTrainedConfig, logits: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' router of `config.model_type` run on `logits`: (ids (T, K), weights)."""
    router = ROUTERS[config.model_type](config)
    with torch.no_grad():
        router.get_parameter("weight").copy_(torch.eye(EXPERTS))
        if isinstance(router, DeepseekV3TopkRouter):
            router.get_buffer("e_score_correction_bias").copy_(bias)
        seen, weights, ids = router(logits)
    assert torch.equal(seen, logits)  # the identity gate routes exactly these logits
    return ids, weights


def ours(
    config: PreTrainedConfig, logits: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = MoESpec.from_hf_config(config.to_dict())
    ids, weights = route(logits, spec.router_spec(), bias if spec.score_correction_bias else None)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (logits.shape[0], spec.topk)
    return ids, weights


def by_expert(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert id, so the comparison ignores the order top-k returned."""
    order = ids.long().argsort(dim=-1)
    return ids.long().gather(1, order), weights.float().gather(1, order)


def assert_same_routing(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    got_ids, got_weights = by_expert(*got)
    want_ids, want_weights = by_expert(*want)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_weights, want_weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("variant", VARIANTS)
def test_route_matches_transformers(variant: str, k: int) -> None:
    config = VARIANTS[variant](k)
    logits, bias = inputs(seed=k)
    assert_same_routing(ours(config, logits, bias), hf_route(config, logits, bias))


@pytest.mark.parametrize(
    ("variant", "renormalised"),
    [
        ("qwen3_moe norm", True),
        ("qwen3_moe default (no norm)", False),
        ("qwen2_moe default (no norm)", False),
        ("mixtral", True),
        ("deepseek_v2 greedy scaled", False),
        ("deepseek_v3 default", True),
        ("deepseek_v3 no norm", False),
    ],
)
def test_top1_weight(variant: str, renormalised: bool) -> None:
    """At K = 1 a renormalised router gives its one expert exactly the scaling factor."""
    config = VARIANTS[variant](1)
    logits, bias = inputs(seed=11)
    ids, weights = ours(config, logits, bias)
    scale = getattr(config, "routed_scaling_factor", 1.0)
    if renormalised:
        torch.testing.assert_close(weights, torch.full((TOKENS, 1), scale), rtol=1e-6, atol=0)
    else:
        # the chosen score times the factor: below it, often well below
        assert bool((weights < scale).all()) and bool((weights < 0.9 * scale).any())
    assert_same_routing((ids, weights), hf_route(config, logits, bias))


def test_reported_softmax_top1_is_renormalised() -> None:
    """Filed: RouterSpec(8, topk=1, norm_topk_prob=True) weighed 0.32, not 1.0."""
    logits = 2.0 * torch.randn(TOKENS, 8, generator=torch.Generator().manual_seed(5))
    ids, weights = route(logits, RouterSpec(num_experts=8, topk=1, norm_topk_prob=True))
    torch.testing.assert_close(weights, torch.ones(TOKENS, 1), rtol=1e-6, atol=0)
    assert torch.equal(ids.long().squeeze(1), logits.argmax(dim=-1))
    qwen = Qwen3MoeConfig(
        **{**COMMON, "hidden_size": 8}, num_experts=8, num_experts_per_tok=1, norm_topk_prob=True
    )
    router = Qwen3MoeTopKRouter(qwen)
    with torch.no_grad():
        router.get_parameter("weight").copy_(torch.eye(8))
        _, want_weights, want_ids = router(logits)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=0)


def test_reported_sigmoid_grouped_top1_is_scaled_by_the_factor() -> None:
    """Filed: sigmoid + groups + routed_scaling_factor 2.5 at K = 1 weighed 1.75, not 2.5."""
    logits, bias = inputs(seed=6)
    spec = RouterSpec(EXPERTS, 1, "sigmoid", True, 2.5, **GROUPS)
    ids, weights = route(logits, spec, bias)
    torch.testing.assert_close(weights, torch.full((TOKENS, 1), 2.5), rtol=1e-6, atol=0)
    v3 = DeepseekV3Config(**DEEPSEEK, **GROUPS, num_experts_per_tok=1, routed_scaling_factor=2.5)
    assert MoESpec.from_hf_config(v3.to_dict()).router_spec() == spec
    assert_same_routing((ids, weights), hf_route(v3, logits, bias))


def test_inputs_exercise_groups_and_bias() -> None:
    """The random inputs above are ones where groups and the bias change some choice, so
    the comparisons would catch a router that ignored them."""
    logits, bias = inputs(seed=8)
    v2 = RouterSpec(
        EXPERTS, 8, "softmax", False, 16.0, topk_method="group_limited_greedy", **GROUPS
    )
    v2_flat = RouterSpec(EXPERTS, 8, "softmax", False, 16.0)
    assert not torch.equal(route(logits, v2)[0], route(logits, v2_flat)[0])
    v3 = RouterSpec(EXPERTS, 8, "sigmoid", True, 2.5, **GROUPS)
    v3_flat = RouterSpec(EXPERTS, 8, "sigmoid", True, 2.5)
    assert not torch.equal(route(logits, v3, bias)[0], route(logits, v3_flat, bias)[0])
    assert not torch.equal(route(logits, v3, bias)[0], route(logits, v3)[0])
    # V2 ranks a group by its best expert, V3 by its best two: the two rules differ here
    v3_like_v2 = RouterSpec(EXPERTS, 8, "sigmoid", False, 16.0, **GROUPS)
    v2_scores = torch.log(torch.sigmoid(logits))  # softmax of these = sigmoid / its row sum
    assert not torch.equal(route(v2_scores, v2)[0], route(logits, v3_like_v2)[0])


# -- what the reader refuses: configs transformers and vLLM would route differently ------
def test_deepseek_v2_norm_topk_prob_true_is_refused() -> None:
    config = DeepseekV2Config(**DEEPSEEK, num_experts_per_tok=4, norm_topk_prob=True)
    # transformers' V2 router ignores the flag (vLLM's honours it) ...
    logits, bias = inputs(seed=9)
    plain = DeepseekV2Config(**DEEPSEEK, num_experts_per_tok=4)
    assert_same_routing(hf_route(config, logits, bias), hf_route(plain, logits, bias))
    # ... so the reader refuses it rather than pick one of the two
    with pytest.raises(AFDInputError) as info:
        MoESpec.from_hf_config(config.to_dict())
    assert info.value.argument == "config['norm_topk_prob']"
    assert info.value.value is True
    assert "false for deepseek_v2" in str(info.value)


@pytest.mark.parametrize("key", ["n_group", "topk_group"])
def test_deepseek_v2_greedy_with_groups_is_refused(key: str) -> None:
    """transformers' greedy V2 router ignores groups; vLLM's DeepSeek MoE applies them."""
    groups: dict[str, Any] = {"n_group": 1, "topk_group": 1, key: 2}
    config = DeepseekV2Config(**DEEPSEEK, **groups, num_experts_per_tok=2)
    with pytest.raises(AFDInputError) as info:
        MoESpec.from_hf_config(config.to_dict())
    assert info.value.argument == f"config[{key!r}]"
    assert info.value.value == 2
    assert "1 or null with topk_method 'greedy'" in str(info.value)


def test_router_spec_refusals() -> None:
    logits, bias = inputs(seed=10)
    # softmax groups must name DeepSeek-V2's method; never silently dropped
    with pytest.raises(AFDInputError, match="n_group"):
        RouterSpec(EXPERTS, 4, "softmax", n_group=4, topk_group=2)
    with pytest.raises(AFDInputError, match="scoring_func"):
        RouterSpec(EXPERTS, 4, "sigmoid", topk_method="group_limited_greedy", **GROUPS)
    with pytest.raises(AFDInputError, match="topk_group"):
        RouterSpec(EXPERTS, 9, "sigmoid", **GROUPS)  # only 8 experts in the 2 kept groups
    # a correction bias only steers noaux_tc routing; elsewhere it is refused, not ignored
    with pytest.raises(AFDInputError) as info:
        route(logits, RouterSpec(EXPERTS, 2), bias)
    assert info.value.argument == "score_bias"
    with pytest.raises(AFDInputError) as info:
        route(logits, RouterSpec(EXPERTS, 2, "sigmoid"), bias[:4])
    assert info.value.argument == "score_bias.shape"
    # MoESpec keeps each architecture's fixed renormalisation
    mixtral = MoESpec.from_hf_config(VARIANTS["mixtral"](2).to_dict())
    with pytest.raises(AFDInputError, match="norm_topk_prob"):
        MoESpec(**{**vars(mixtral), "norm_topk_prob": False})
