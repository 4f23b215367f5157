"""Per-die memory: the HBM terms an attention, FFN or colocated EP die fills (weights,
embedding, KV cache pool, windows), and how the weights are split between the roles."""

from __future__ import annotations

from dataclasses import dataclass

from afd_dispatch.errors import check
from afd_dispatch.planner.shape import HEAD_BYTES, ModelShape, Precision, Workload

# -- memory ------------------------------------------------------------------------------------
KV_BLOCK_TOKENS = 128
"""Tokens per KV cache block: vllm-ascend's default block size (``refresh_block_size`` in
``vllm_ascend/utils.py``, vllm-project/vllm-ascend v0.19.1rc1). A sequence holds whole
blocks, so it occupies at most one block more than its own tokens."""

WEIGHT_SPLITS = ("experts", "ffn")
"""How the weights are divided between attention and FFN dies (see `DieMemory`):

- ``"experts"``: only the experts leave the attention die. FFN dies hold their share of the
  routed experts (or, on dedicated shared-expert dies, the shared expert); the attention
  die keeps the attention layers, the router, the dense layers' MLPs, the shared expert
  when it runs it, the embedding and lm_head. This is this project's runtime (vLLM's model
  with its routed experts removed, README "Serving with vLLM") and the placement the phase
  times price.
- ``"ffn"``: the attention/FFN role split of vllm-project/afd-plugin (commit c123c75, the
  one the calibration recipe ran, ``afd_plugin/model_executor/models/deepseek_v2.py``):
  an attention rank builds only the attention layers (plus embedding, lm_head and norms)
  and skips every MLP weight; an FFN rank builds each MoE layer's router, its share of
  the routed experts and the shared expert, the dense layers' MLPs, and the embedding and
  lm_head as well.
"""


@dataclass(frozen=True)
class DieMemory:
    """The HBM one die fills, term by term, in bytes (``docs/planner.md``, "Memory").

    - ``weights``: the layer weights resident on the die, ``params * b_w``.
    - ``embedding``: embedding table and lm_head, ``V * H * 2`` each in bf16 (W8A8
      checkpoints keep them unquantized; `HEAD_BYTES`).
    - ``kv_cache``: the paged KV cache pool the die's running sequences need
      (`kv_cache_tokens` times `ModelShape.kv_elems_per_token` times b_kv); 0 on FFN dies.
    - ``windows``: the AFD window groups, ``M * HCCL_BUFFSIZE`` (one group per micro-batch,
      `WindowLayout.hccl_buffsize_mb`); 0 for colocated EP.

    Activations, workspaces and the serving framework's own communication buffers are not
    terms here: `HardwareProfile.reserved_gb` sets HBM aside for them.
    """

    weights: float
    embedding: float
    kv_cache: float
    windows: float

    @property
    def total(self) -> float:
        """Bytes the die fills: the sum of the four terms."""
        return self.weights + self.embedding + self.kv_cache + self.windows

    def terms_gb(self) -> dict[str, float]:
        """Each term and the total in GB (1e9 bytes)."""
        terms = {
            "weights": self.weights,
            "embedding": self.embedding,
            "kv_cache": self.kv_cache,
            "windows": self.windows,
            "total": self.total,
        }
        return {k: v / 1e9 for k, v in terms.items()}


def kv_cache_tokens(workload: Workload, sequences: int) -> float:
    """Tokens the paged KV cache of one die must hold for ``sequences`` running sequences.

    A paged cache (vLLM's) gives a sequence blocks as it grows and frees them when it ends,
    so the pool holds what the running sequences hold now, not ``sequences`` times the
    longest context. With the sequences at staggered points of their decode (the planner's
    mean-context assumption, `Workload`) that is ``C̄`` tokens each, plus at most one
    partly filled block (`KV_BLOCK_TOKENS`): ``sequences * (C̄ + block)``. It is never
    less than ``C``, one sequence of the whole context: vLLM refuses to start when its
    pool cannot hold one ``max_model_len`` request.
    """
    return max(sequences * (workload.mean_context + KV_BLOCK_TOKENS), float(workload.context))


def kv_cache_bytes(
    shape: ModelShape, precision: Precision, workload: Workload, sequences: int
) -> float:
    """Bytes of that pool: ``kv_cache_tokens * L * (kv_elems + index_elems) * b_kv``."""
    tokens = kv_cache_tokens(workload, sequences)
    return tokens * shape.kv_elems_per_token * precision.kv_bytes


def _check_split(weight_split: str) -> None:
    check(weight_split in WEIGHT_SPLITS, "weight_split", f"one of {WEIGHT_SPLITS}", weight_split)


def non_routed_mlp_params(shape: ModelShape, *, shared: bool) -> int:
    """Every MLP weight that is not a routed expert: ``L_moe * N * H`` of router,
    ``L_dense * 3 * H * I_d`` of dense MLPs and, with ``shared``, ``L_moe * 3 * H * I_s``
    of shared expert."""
    params = shape.num_moe_layers * shape.router_params
    params += shape.num_dense_layers * shape.dense_mlp_params
    if shared:
        params += shape.num_moe_layers * shape.shared_params
    return params


def attention_die_memory(
    shape: ModelShape,
    precision: Precision,
    workload: Workload,
    *,
    sequences: int,
    shared_here: bool,
    windows: float,
    weight_split: str = "experts",
) -> DieMemory:
    """What one attention die holds with ``sequences`` = M * BS running sequences.

    Weights: ``L * W_att`` always; with the ``"experts"`` split also the router, the dense
    layers' MLPs and (``shared_here``) the shared expert, `non_routed_mlp_params`; all at
    b_w. Plus embedding and lm_head in bf16, the KV cache pool (`kv_cache_bytes`) and
    ``windows`` bytes.
    """
    _check_split(weight_split)
    params = shape.num_layers * shape.attention.params(shape.hidden)
    if weight_split == "experts":
        params += non_routed_mlp_params(shape, shared=shared_here)
    return DieMemory(
        weights=float(params * precision.weight_bytes),
        embedding=float(shape.embedding_params * HEAD_BYTES),
        kv_cache=kv_cache_bytes(shape, precision, workload, sequences),
        windows=windows,
    )


def ffn_die_memory(
    shape: ModelShape,
    precision: Precision,
    *,
    local_experts: int,
    shared_dies: int,
    windows: float,
    weight_split: str = "experts",
) -> DieMemory:
    """What the fullest FFN die holds: ``local_experts`` routed experts of every MoE layer
    (``n * L_moe * 3 * H * I * b_w``) and ``windows`` bytes, no KV cache.

    ``"experts"`` split: a dedicated shared-expert die (``shared_dies`` > 0) holds
    ``L_moe * 3 * H * I_s`` instead; the larger of the two kinds counts. ``"ffn"`` split
    (no dedicated dies): every FFN die adds the router, the dense layers' MLPs and the
    shared expert (`non_routed_mlp_params`) and the embedding and lm_head.
    """
    _check_split(weight_split)
    layers = shape.num_moe_layers
    params = local_experts * shape.expert_params * layers
    embedding = 0.0
    if weight_split == "ffn":
        check(shared_dies == 0, "shared_dies", "0 with weight_split 'ffn'", shared_dies)
        params += non_routed_mlp_params(shape, shared=shape.moe.num_shared_experts > 0)
        embedding = float(shape.embedding_params * HEAD_BYTES)
    elif shared_dies:
        params = max(params, shape.shared_params * layers)
    return DieMemory(
        weights=float(params * precision.weight_bytes),
        embedding=embedding,
        kv_cache=0.0,
        windows=windows,
    )


def ep_die_memory(
    shape: ModelShape,
    precision: Precision,
    workload: Workload,
    *,
    local_experts: int,
    sequences: int,
) -> DieMemory:
    """What one die of colocated EP holds: the whole model but the routed experts
    (attention, router, dense MLPs, shared expert), ``local_experts`` routed experts of
    every MoE layer, embedding and lm_head, and its sequences' KV cache pool."""
    params = shape.num_layers * shape.attention.params(shape.hidden)
    params += non_routed_mlp_params(shape, shared=shape.moe.num_shared_experts > 0)
    params += local_experts * shape.expert_params * shape.num_moe_layers
    return DieMemory(
        weights=float(params * precision.weight_bytes),
        embedding=float(shape.embedding_params * HEAD_BYTES),
        kv_cache=kv_cache_bytes(shape, precision, workload, sequences),
        windows=0.0,
    )
