"""The router, on the attention side: logits -> top-k expert ids and combine weights.

The weights returned are the ones combine multiplies by, so the model's routed scaling
factor is already folded in (DeepSeek multiplies the top-k weights by it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afd_dispatch.errors import check


@dataclass(frozen=True)
class RouterSpec:
    num_experts: int
    topk: int
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1

    def __post_init__(self) -> None:
        check(self.num_experts >= 1, "num_experts", ">= 1", self.num_experts)
        check(1 <= self.topk <= self.num_experts, "topk", f"in [1, {self.num_experts}]", self.topk)
        check(
            self.scoring_func in ("softmax", "sigmoid"),
            "scoring_func",
            "softmax or sigmoid",
            self.scoring_func,
        )
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
        # Group-limited choice is DeepSeek-V3's (sigmoid scores, groups ranked by their two
        # best experts); softmax routing would silently ignore the groups.
        check(
            self.n_group == 1 or self.scoring_func == "sigmoid",
            "n_group",
            '1 with scoring_func "softmax" (group-limited routing is sigmoid / noaux_tc only)',
            self.n_group,
        )


def route(
    logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32 (T, K), weights float32 (T, K)) for router logits (T, num_experts)."""
    check(
        logits.dim() == 2 and logits.shape[1] == spec.num_experts,
        "router_logits.shape",
        f"(T, {spec.num_experts})",
        tuple(logits.shape),
    )
    logits = logits.to(torch.float32)
    if spec.scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(scores, spec.topk, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        choice = scores if bias is None else scores + bias.to(torch.float32)
        if spec.n_group > 1:
            choice = _limit_to_groups(choice, spec)
        ids = torch.topk(choice, spec.topk, dim=-1).indices
        weights = scores.gather(1, ids)
    if spec.norm_topk_prob and spec.topk > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return ids.to(torch.int32), weights


def _limit_to_groups(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """DeepSeek-V3's group-limited routing: keep experts of the best `topk_group` groups."""
    t = choice.shape[0]
    grouped = choice.view(t, spec.n_group, -1)
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, -1)
