"""The MoE hook: whatever unquantized MoE method is registered, AFD takes its experts.

vLLM builds each MoE layer's `RoutedExperts` with `UnquantizedFusedMoEMethod`, a
CustomOp that platforms may replace out of tree (vllm-ascend does on A3). Just before a
model with an AFD config is built, the registered class is replaced by a subclass of it
whose weights are empty placeholders (the checkpoint's expert tensors are skipped, not
copied) and whose `apply` sends the routed tokens to the FFN ranks. The router and the
shared experts stay with vLLM's MoE runner on the attention side. This module is that
subclass's half, `AFDMoEMethodMixin`; the hook and the registration are in `compat`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from afd_dispatch.integrations.vllm import server

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class AFDMoEMethodMixin:
    """Mixed in front of the registered unquantized MoE method."""

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        from vllm.model_executor.utils import set_weight_attrs

        for name in ("w13_weight", "w2_weight"):
            param = torch.nn.Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, {**extra_weight_attrs, "weight_loader": skip_expert_weight})

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        return None  # no expert kernels to prepare: the experts live on the FFN ranks

    @property
    def is_monolithic(self) -> bool:
        return False  # vLLM's router runs here and hands us top-k ids and weights

    @property
    def supports_internal_mk(self) -> bool:
        # AFD is the dispatch and the combine: vLLM's runner must never all-gather every
        # data-parallel rank's tokens first (its naive DP path); each rank is a session of
        # its own (`compat.moe_layers_local` gives the layers no DP layout to begin with).
        return True

    @property
    def topk_indices_dtype(self) -> torch.dtype | None:
        return None

    @property
    def mk_can_overlap_shared_experts(self) -> bool:
        return False  # the runner computes shared experts before calling apply

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> None:
        return None

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any = None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return torch.ops.afd.vllm_moe(x, topk_ids, topk_weights, _layer_index(layer))


@torch.library.custom_op("afd::vllm_moe", mutates_args=())
def vllm_moe(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: int
) -> torch.Tensor:
    """One MoE layer's routed experts through AFD, as one opaque op.

    vLLM compiles the model with torch.compile; as a custom op the exchange (window writes,
    flag waits) is one node of the graph that runs eagerly, never traced into.
    """
    return server.current().moe(layer, x, topk_ids, topk_weights, _dp_max_tokens())


@vllm_moe.register_fake
def _(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: int
) -> torch.Tensor:
    return torch.empty_like(x)


def _dp_max_tokens() -> int | None:
    """The most tokens any data-parallel rank runs in this forward (None without DP).

    Every DP rank must send the same number of exchange rounds per MoE layer; vLLM's DP
    metadata carries each rank's token count (all-reduced once per forward).
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().dp_metadata
    if metadata is None:
        return None
    return int(metadata.num_tokens_across_dp_cpu.max())


def _layer_index(layer: torch.nn.Module) -> int:
    name = str(getattr(layer, "layer_name", ""))
    match = _LAYER.search(name)
    if match is None:
        raise RuntimeError(f"AFD: cannot tell the decoder layer of MoE layer {name!r}")
    return int(match.group(1))


def skip_expert_weight(*args: Any, return_success: bool = False, **kwargs: Any) -> bool | None:
    """Weight loader of the placeholders: the FFN ranks load experts themselves."""
    return True if return_success else None


def check_every_moe_layer_uses(model: torch.nn.Module, method: type) -> None:
    """Refuse a model whose MoE layers did not get the AFD method (e.g. quantized ones)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    layers = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    others = [
        f"{m.layer_name}: {type(m.quant_method).__name__}"
        for m in layers
        if not isinstance(m.quant_method, method)
    ]
    if not layers or others:
        raise RuntimeError(
            "AFD serves unquantized MoE checkpoints; these MoE layers use another method: "
            + (", ".join(others) if others else "no MoE layer found")
        )
