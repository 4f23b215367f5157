"""The router, on the attention side: logits -> top-k expert ids and combine weights.

The weights returned are the ones combine multiplies by, so the model's routed scaling
factor is already folded in (DeepSeek multiplies the top-k weights by it too).

What each architecture the runtime claims does, for every K including K = 1 (facts from
transformers 5.19 `modeling_{qwen3_moe,qwen2_moe,mixtral,deepseek_v2,deepseek_v3}.py` and
vLLM 0.32 `fused_moe/router/{fused_topk_router,grouped_topk_router}.py`):

- Qwen3-MoE, Qwen2-MoE: softmax, top-k, renormalised iff `norm_topk_prob` (Qwen2-MoE's
  config defaults it to false, Qwen3-MoE's too; published Qwen3 configs say true).
- Mixtral: softmax, top-k, always renormalised (the config has no switch).
- DeepSeek-V2: softmax; "greedy" top-k, or "group_limited_greedy": keep the `topk_group`
  groups whose best expert scores highest, then top-k among them. Never renormalised in
  transformers (its V2 router drops `norm_topk_prob`); times `routed_scaling_factor`.
- DeepSeek-V3 ("noaux_tc"): sigmoid; experts are chosen on score + e_score_correction_bias,
  groups ranked by the sum of their two best biased scores, but weighed by the unbiased
  score; renormalised (sum + 1e-20) iff `norm_topk_prob`, then times the scaling factor.

DeepSeek's own remote modeling code skips the renormalisation at K = 1; transformers and
vLLM do not (a lone expert gets weight 1 before scaling), and this module follows them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afd_dispatch.errors import check

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# The scoring function each grouped method is defined with (DeepSeek-V2 / V3).
_GROUP_SCORING = {"group_limited_greedy": "softmax", "noaux_tc": "sigmoid"}
# Keeps a sigmoid renormalisation finite when every chosen score underflows to 0; below
# float32 resolution for any sum it is added to otherwise (transformers' V3 router adds it).
_NORM_EPS = 1e-20


@dataclass(frozen=True)
class RouterSpec:
    """How router logits become top-k ids and weights; see the module docstring.

    `topk_method` None picks the method the scoring function implies for the claimed
    architectures: "noaux_tc" for sigmoid (DeepSeek-V3), "greedy" for softmax. Softmax with
    expert groups must say "group_limited_greedy" (DeepSeek-V2), so that groups are never
    silently ignored. `n_group == topk_group == 1` means no groups.
    """

    num_experts: int
    topk: int
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str | None = None

    def __post_init__(self) -> None:
        check(self.num_experts >= 1, "num_experts", ">= 1", self.num_experts)
        check(1 <= self.topk <= self.num_experts, "topk", f"in [1, {self.num_experts}]", self.topk)
        check(
            self.scoring_func in ("softmax", "sigmoid"),
            "scoring_func",
            "softmax or sigmoid",
            self.scoring_func,
        )
        if self.topk_method is None:
            implied = "noaux_tc" if self.scoring_func == "sigmoid" else "greedy"
            object.__setattr__(self, "topk_method", implied)
        method = self.topk_method
        check(method in TOPK_METHODS, "topk_method", f"one of {list(TOPK_METHODS)}", method)
        check(
            self.n_group >= 1 and self.num_experts % self.n_group == 0,
            "n_group",
            f"a divisor of num_experts={self.num_experts}",
            self.n_group,
        )
        check(
            1 <= self.topk_group <= self.n_group,
            "topk_group",
            f"in [1, {self.n_group}]",
            self.topk_group,
        )
        if method == "greedy":
            check(
                self.n_group == 1,
                "n_group",
                "1 with topk_method 'greedy' (groups need 'group_limited_greedy' with softmax"
                " or 'noaux_tc' with sigmoid)",
                self.n_group,
            )
            return
        want = _GROUP_SCORING[str(method)]
        check(
            self.scoring_func == want,
            "scoring_func",
            f"{want!r} with topk_method {method!r}",
            self.scoring_func,
        )
        per_group = self.num_experts // self.n_group
        check(
            self.topk <= self.topk_group * per_group,
            "topk_group",
            f"enough groups for topk={self.topk}: topk_group * {per_group} >= topk",
            self.topk_group,
        )
        check(
            method != "noaux_tc" or self.n_group == 1 or per_group >= 2,
            "n_group",
            f"at most num_experts / 2 = {self.num_experts // 2} (noaux_tc ranks groups by"
            " their top 2)",
            self.n_group,
        )


def route(
    logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32 (T, K), weights float32 (T, K)) for router logits (T, num_experts).

    `bias` is DeepSeek-V3's `e_score_correction_bias`, float (num_experts,): it changes
    which experts are chosen, never their weights. Only "noaux_tc" routing takes one.
    Ids within a row are in descending order of the choice score.
    """
    check(
        logits.dim() == 2 and logits.shape[1] == spec.num_experts,
        "router_logits.shape",
        f"(T, {spec.num_experts})",
        tuple(logits.shape),
    )
    check(
        bias is None or spec.topk_method == "noaux_tc",
        "score_bias",
        f"None (topk_method {spec.topk_method!r} has no score correction bias)",
        None if bias is None else tuple(bias.shape),
    )
    check(
        bias is None or tuple(bias.shape) == (spec.num_experts,),
        "score_bias.shape",
        f"({spec.num_experts},)",
        None if bias is None else tuple(bias.shape),
    )
    logits = logits.to(torch.float32)
    if spec.scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
    choice = scores if bias is None else scores + bias.to(torch.float32)
    if spec.n_group > 1:
        choice = _limit_to_groups(choice, spec)
    ids = torch.topk(choice, spec.topk, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:  # at every K: one chosen expert gets weight 1
        weights = weights / (weights.sum(dim=-1, keepdim=True) + _NORM_EPS)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return ids.to(torch.int32), weights


def _limit_to_groups(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """`choice` (T, E) float32 with experts outside the best `topk_group` groups at -inf.

    A group's rank is its best expert's score for "group_limited_greedy" (DeepSeek-V2) and
    the sum of its best two for "noaux_tc" (DeepSeek-V3).
    """
    t = choice.shape[0]
    grouped = choice.view(t, spec.n_group, -1)
    if spec.topk_method == "group_limited_greedy":
        group_scores = grouped.amax(dim=-1)
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, -1)
