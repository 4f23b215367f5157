"""The AFD decode model: roofline formulas for one MoE layer, the micro-batch pipeline, search.

Every formula here is written out, with its symbols, in `docs/planner.md`; the names below
follow it. Times are seconds, sizes bytes, rates per second. One *step* is one decode
iteration: every sequence on every attention die gets one new token.

The model, in one paragraph: an attention die holds M micro-batches of BS sequences each.
For each MoE layer and micro-batch it reads the layer's attention weights and the KV cache
of its BS sequences (time `t_attn`), sends every token's E = K + S expert rows to the FFN
dies (A2F, `t_a2f`), the FFN dies run their experts (`t_ffn`), send the rows back (F2A,
`t_f2a`) and the attention die sums them (`t_comb`). With M micro-batches in flight the
attention and FFN dies work on different micro-batches at once, so a layer takes

    T_layer = max(M * (t_attn + t_comb), M * t_ffn, t_attn + t_a2f + t_ffn + t_f2a + t_comb)

(each die's busy time, or one micro-batch's round trip, whichever is longer; with M = 1
the round trip is the sum of the phases). TPOT is the step time; throughput per die is
A * M * BS tokens per step over all A + F dies. A layout fits when every die's weights,
embedding, KV cache pool and windows (`DieMemory`) fit in its usable HBM
(`HardwareProfile.usable_hbm_bytes`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.layout import (
    MAX_TOKENS_PER_MICRO_BATCH,
    WindowLayout,
    a3_attn_to_ffn_token_size,
)
from afd_dispatch.planner.hardware import HardwareProfile
from afd_dispatch.runtime.model_spec import MAX_JSON_BYTES, MoESpec, read_json_object
from afd_dispatch.topology import MAX_RANKS_PER_ROLE

BYTES = {"bf16": 2, "int8": 1}
HEAD_BYTES = 2  # embedding and lm_head stay in bf16 (W8A8 checkpoints keep them so)
RESULT_BYTES = 2  # F2A rows and the combined output: bf16, as the A3 ops require
# DeepSeek-V3.2 (DSA) shares V3's MoE; MoESpec reads it under V3's name.
_MOE_ALIASES = {"deepseek_v32": "deepseek_v3"}
_MLA = ("deepseek_v2", "deepseek_v3", "deepseek_v32")


# -- the model's shape ------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionShape:
    """What one attention layer stores and reads per token.

    ``kind`` is "mla" (DeepSeek: a compressed latent of ``kv_lora_rank`` plus a shared
    ``qk_rope_head_dim`` key per token) or "gqa" (``num_kv_heads`` keys and values of
    ``head_dim`` per token). ``index_topk`` > 0 marks DeepSeek sparse attention (V3.2):
    a small indexer key of ``index_head_dim`` is stored per token and scanned over the whole
    context, and the MLA attention then reads only ``index_topk`` selected tokens.
    """

    kind: str
    num_heads: int
    num_kv_heads: int = 0
    head_dim: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    index_topk: int = 0
    index_n_heads: int = 0
    index_head_dim: int = 0

    def __post_init__(self) -> None:
        check(self.kind in ("mla", "gqa"), "attention kind", "'mla' or 'gqa'", self.kind)
        check(self.num_heads >= 1, "num_attention_heads", ">= 1", self.num_heads)
        if self.kind == "gqa":
            check(self.num_kv_heads >= 1, "num_key_value_heads", ">= 1", self.num_kv_heads)
            check(self.head_dim >= 1, "head_dim", ">= 1", self.head_dim)
        else:
            check(self.kv_lora_rank >= 1, "kv_lora_rank", ">= 1", self.kv_lora_rank)
            check(self.v_head_dim >= 1, "v_head_dim", ">= 1", self.v_head_dim)

    @property
    def kv_elems_per_token(self) -> int:
        """Elements of KV cache one token adds to one layer (indexer key excluded)."""
        if self.kind == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def index_elems_per_token(self) -> int:
        """Elements of the DSA indexer key one token adds to one layer (0 without DSA)."""
        return self.index_head_dim if self.index_topk else 0

    def attended(self, context: float) -> float:
        """Tokens whose KV one decode query reads: all of them, or DSA's top-k."""
        return min(context, self.index_topk) if self.index_topk else context

    def kv_bytes_read(self, context: float, elem: int) -> float:
        """Bytes of cache one sequence's decode query reads in one layer.

        ``attended(C) * kv_elems * b_kv + C * index_elems * b_kv``: the attended tokens'
        KV, plus (DSA only) every token's indexer key.
        """
        return (
            self.attended(context) * self.kv_elems_per_token + context * self.index_elems_per_token
        ) * elem

    def params(self, hidden: int) -> int:
        """Weights of one attention layer (projections, and the DSA indexer)."""
        h, n = hidden, self.num_heads
        if self.kind == "gqa":
            return 2 * h * n * self.head_dim + 2 * h * self.num_kv_heads * self.head_dim
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = h * self.q_lora_rank + self.q_lora_rank * n * qk if self.q_lora_rank else h * n * qk
        kv = h * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv += self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
        out = n * self.v_head_dim * h
        index = 0
        if self.index_topk:
            q_in = self.q_lora_rank or h
            index = q_in * self.index_n_heads * self.index_head_dim
            index += h * self.index_head_dim + h * self.index_n_heads
        return q + kv + out + index

    def core_flops(self, context: float) -> float:
        """FLOPs of one decode query's score and value products in one layer.

        GQA: ``4 * heads * head_dim * attended``. MLA in its absorbed decode form: scores
        over the ``kv_lora + rope`` latent and values over the ``kv_lora`` latent, so
        ``2 * heads * attended * (2 * kv_lora + rope)``; DSA adds the indexer's
        ``2 * index_heads * index_head_dim * C``.
        """
        attended = self.attended(context)
        if self.kind == "gqa":
            return 4.0 * self.num_heads * self.head_dim * attended
        flops = 2.0 * self.num_heads * attended * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        if self.index_topk:
            flops += 2.0 * self.index_n_heads * self.index_head_dim * context
        return flops

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> AttentionShape:
        """Read the attention keys of a Hugging Face config.json (already a dict)."""
        arch = config.get("model_type")
        heads = _key(config, "num_attention_heads", 1, 1 << 12)
        if arch in _MLA:
            dsa = arch == "deepseek_v32" or config.get("index_topk") is not None
            return cls(
                kind="mla",
                num_heads=heads,
                q_lora_rank=_key(config, "q_lora_rank", 0, 1 << 16, default=0),
                kv_lora_rank=_key(config, "kv_lora_rank", 1, 1 << 16),
                qk_nope_head_dim=_key(config, "qk_nope_head_dim", 0, 1 << 12),
                qk_rope_head_dim=_key(config, "qk_rope_head_dim", 0, 1 << 12),
                v_head_dim=_key(config, "v_head_dim", 1, 1 << 12),
                index_topk=_key(config, "index_topk", 1, 1 << 24) if dsa else 0,
                index_n_heads=_key(config, "index_n_heads", 1, 1 << 12) if dsa else 0,
                index_head_dim=_key(config, "index_head_dim", 1, 1 << 12) if dsa else 0,
            )
        hidden = _key(config, "hidden_size", 1, 1 << 16)
        return cls(
            kind="gqa",
            num_heads=heads,
            num_kv_heads=_key(config, "num_key_value_heads", 1, heads, default=heads),
            head_dim=_key(config, "head_dim", 1, 1 << 12, default=hidden // heads),
        )


@dataclass(frozen=True)
class ModelShape:
    """The sizes the planner needs: `MoESpec` (experts, routing) plus attention and vocab."""

    name: str
    moe: MoESpec
    attention: AttentionShape
    vocab_size: int
    dense_intermediate_size: int = 0
    tie_word_embeddings: bool = False

    @property
    def hidden(self) -> int:
        return self.moe.hidden_size

    @property
    def num_layers(self) -> int:
        return self.moe.num_layers

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe.moe_layers)

    @property
    def num_dense_layers(self) -> int:
        return self.moe.num_layers - len(self.moe.moe_layers)

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert in one layer: gate, up, down = 3 * H * I."""
        return 3 * self.hidden * self.moe.moe_intermediate_size

    @property
    def shared_params(self) -> int:
        """Weights of the shared slot in one layer: 3 * H * I_s (0 without one)."""
        return 3 * self.hidden * self.moe.shared_intermediate_size

    @property
    def router_params(self) -> int:
        """The router: one logit per routed expert, N * H."""
        return self.moe.num_experts * self.hidden

    @property
    def dense_mlp_params(self) -> int:
        """Weights of one dense layer's MLP (DeepSeek's first layers): 3 * H * I_d."""
        return 3 * self.hidden * self.dense_intermediate_size

    @property
    def embedding_params(self) -> int:
        """Embedding table plus lm_head, V * H each (one table when they are tied)."""
        copies = 1 if self.tie_word_embeddings else 2
        return copies * self.vocab_size * self.hidden

    @property
    def kv_elems_per_token(self) -> int:
        """KV cache elements one token stores over all layers, the DSA indexer key
        included: ``L * (kv_elems + index_elems)`` (times b_kv gives bytes)."""
        a = self.attention
        return self.num_layers * (a.kv_elems_per_token + a.index_elems_per_token)

    @classmethod
    def from_hf_config(cls, config: Any, name: str | None = None) -> ModelShape:
        """Build from a parsed config.json; unknown architectures raise `AFDInputError`."""
        check(isinstance(config, Mapping), "config", "a JSON object", type(config).__name__)
        arch = config.get("model_type")
        moe_config = dict(config)
        if arch in _MOE_ALIASES:
            moe_config["model_type"] = _MOE_ALIASES[str(arch)]
        moe = MoESpec.from_hf_config(moe_config)
        dense = 0
        if len(moe.moe_layers) < moe.num_layers:
            dense = _key(config, "intermediate_size", 1, 1 << 20)
        tie = config.get("tie_word_embeddings", False)
        check(isinstance(tie, bool), "config['tie_word_embeddings']", "true or false", tie)
        return cls(
            name=name or str(arch),
            moe=moe,
            attention=AttentionShape.from_hf_config(config),
            vocab_size=_key(config, "vocab_size", 1, 1 << 22),
            dense_intermediate_size=dense,
            tie_word_embeddings=tie,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ModelShape:
        """Read `config.json` from a model directory (or the path of the file itself)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        config = read_json_object(path, "config.json", MAX_JSON_BYTES)
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or None
        return cls.from_hf_config(config, name)


# -- what is being planned ------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """Element sizes: ``weights`` (int8 = W8A8 GEMMs at int8 rate), ``a2f`` (int8 = the
    A2F op's quant_mode 2: H int8 values + 128 bytes per row), ``kv`` (the KV cache)."""

    weights: str = "bf16"
    a2f: str = "bf16"
    kv: str = "bf16"

    def __post_init__(self) -> None:
        for name in ("weights", "a2f", "kv"):
            value = getattr(self, name)
            check(value in BYTES, name, f"one of {list(BYTES)}", value)

    @property
    def weight_bytes(self) -> int:
        return BYTES[self.weights]

    @property
    def kv_bytes(self) -> int:
        return BYTES[self.kv]


@dataclass(frozen=True)
class Workload:
    """``context``: input + output tokens of the longest sequence (the KV cache pool holds
    at least one such sequence); ``mean_context``: the KV length an average decode step
    reads, and what each running sequence holds in the KV cache pool (`kv_cache_tokens`)."""

    context: int
    mean_context: float

    def __post_init__(self) -> None:
        check(self.context >= 1, "context", ">= 1", self.context)
        check(
            1 <= self.mean_context <= self.context,
            "mean_context",
            f"in [1, context={self.context}]",
            self.mean_context,
        )

    @classmethod
    def decode(cls, context: int, output_len: int = 0) -> Workload:
        """A sequence grows from ``context - output_len`` to ``context`` while it decodes,
        so the mean KV length is ``context - output_len / 2``."""
        check(0 <= output_len < context, "output_len", f"in [0, context={context})", output_len)
        return cls(context, context - output_len / 2)


@dataclass(frozen=True)
class AFDLayout:
    """One deployment: A attention dies, F FFN dies (``shared_dies`` of them host only the
    shared expert; 0: the attention dies run it), M micro-batches of BS tokens."""

    attention_dies: int
    ffn_dies: int
    micro_batches: int
    tokens: int
    shared_dies: int = 0

    def __post_init__(self) -> None:
        check(
            1 <= self.attention_dies <= MAX_RANKS_PER_ROLE,
            "attention dies (A)",
            f"in [1, {MAX_RANKS_PER_ROLE}]",
            self.attention_dies,
        )
        check(
            1 <= self.ffn_dies <= MAX_RANKS_PER_ROLE,
            "FFN dies (F)",
            f"in [1, {MAX_RANKS_PER_ROLE}]",
            self.ffn_dies,
        )
        check(self.micro_batches >= 1, "micro-batches (M)", ">= 1", self.micro_batches)
        check(
            1 <= self.tokens <= MAX_TOKENS_PER_MICRO_BATCH,
            "tokens per micro-batch (BS)",
            f"in [1, {MAX_TOKENS_PER_MICRO_BATCH}]",
            self.tokens,
        )
        check(
            0 <= self.shared_dies < self.ffn_dies,
            "shared_dies",
            f"in [0, F - 1 = {self.ffn_dies - 1}]",
            self.shared_dies,
        )

    @property
    def routed_dies(self) -> int:
        """F_r: the FFN dies that host routed experts."""
        return self.ffn_dies - self.shared_dies

    @property
    def dies(self) -> int:
        return self.attention_dies + self.ffn_dies


# -- the budget of one layer ----------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """One phase of one micro-batch in one MoE layer: its time, what bounds it, the inputs."""

    name: str
    seconds: float
    bound: str
    detail: str


@dataclass(frozen=True)
class LayerBudget:
    """The five phases of one micro-batch in one MoE layer, and the pipelined period."""

    attention: Phase
    a2f: Phase
    ffn: Phase
    f2a: Phase
    combine: Phase
    micro_batches: int

    @property
    def phases(self) -> tuple[Phase, ...]:
        return (self.attention, self.a2f, self.ffn, self.f2a, self.combine)

    @property
    def attention_busy(self) -> float:
        """M * (t_attn + t_comb): the attention die's work per layer."""
        return self.micro_batches * (self.attention.seconds + self.combine.seconds)

    @property
    def ffn_busy(self) -> float:
        """M * t_ffn: the FFN die's work per layer."""
        return self.micro_batches * self.ffn.seconds

    @property
    def round_trip(self) -> float:
        """t_attn + t_a2f + t_ffn + t_f2a + t_comb: one micro-batch through the layer."""
        return sum(p.seconds for p in self.phases)

    @property
    def period(self) -> float:
        """T_layer = max(attention busy, FFN busy, round trip)."""
        return max(self.attention_busy, self.ffn_busy, self.round_trip)

    @property
    def limiter(self) -> str:
        """Which term sets the period."""
        terms = {
            "attention": self.attention_busy,
            "ffn": self.ffn_busy,
            "round trip": self.round_trip,
        }
        return max(terms, key=lambda k: terms[k])


@dataclass(frozen=True)
class Plan:
    """The model's answer for one layout: the layer budget, step time, memory, windows."""

    model: str
    hardware: str
    precision: Precision
    workload: Workload
    layout: AFDLayout
    budget: LayerBudget
    dense_layer_s: float
    head_s: float
    step_overhead_s: float
    moe_layers: int
    dense_layers: int
    topk: int
    shared_slots: int
    hccl_buffsize_mb: int
    attention_memory: DieMemory
    ffn_memory: DieMemory
    usable_memory_gb: float
    experts_per_ffn_die: int
    active_experts_per_ffn_die: float
    weight_split: str = "experts"

    @property
    def step_s(self) -> float:
        """T_step = L_moe * T_layer + L_dense * M * t_dense + M * t_head + t_step."""
        m = self.layout.micro_batches
        return (
            self.moe_layers * self.budget.period
            + self.dense_layers * m * self.dense_layer_s
            + m * self.head_s
            + self.step_overhead_s
        )

    @property
    def tpot_s(self) -> float:
        """Time per output token: every sequence gets one token per step."""
        return self.step_s

    @property
    def sequences_per_attention_die(self) -> int:
        return self.layout.micro_batches * self.layout.tokens

    @property
    def throughput_per_die(self) -> float:
        """A * M * BS / T_step / (A + F): decode tokens per second per deployed die."""
        lay = self.layout
        return lay.attention_dies * self.sequences_per_attention_die / self.step_s / lay.dies

    @property
    def ffn_tokens_per_step(self) -> float:
        """A * M * BS / F: tokens per FFN die per step (the afd-plugin recipe's "FFN BS")."""
        lay = self.layout
        return lay.attention_dies * self.sequences_per_attention_die / lay.ffn_dies

    @property
    def ffn_rows_per_micro_batch(self) -> float:
        """A * BS * K / F_r: routed rows one FFN die's grouped GEMM gets per micro-batch."""
        lay = self.layout
        return lay.attention_dies * lay.tokens * self.topk / lay.routed_dies

    @property
    def attention_memory_gb(self) -> float:
        """HBM an attention die fills, GB (1e9 bytes): `DieMemory.total` of its terms."""
        return self.attention_memory.total / 1e9

    @property
    def ffn_memory_gb(self) -> float:
        """HBM the fullest FFN die fills, GB (1e9 bytes)."""
        return self.ffn_memory.total / 1e9

    @property
    def fits(self) -> bool:
        """Whether every die's memory terms fit in its usable HBM
        (`HardwareProfile.usable_hbm_bytes`)."""
        return max(self.attention_memory_gb, self.ffn_memory_gb) <= self.usable_memory_gb

    def afd_config(self) -> dict[str, Any]:
        """The `--afd-config` object for this plan (one window group per micro-batch, as the
        A3 F2A op needs M = 1 per group; shared expert on the last ``shared_dies`` FFN
        ranks, or on the attention side)."""
        lay = self.layout
        config: dict[str, Any] = {
            "num_attention_workers": lay.attention_dies,
            "num_ffn_workers": lay.ffn_dies,
            "micro_batch_num": lay.micro_batches,
            "max_tokens_per_micro_batch": lay.tokens,
            "quant_mode": "int8" if self.precision.a2f == "int8" else "none",
            "window_groups": "per_micro_batch",
            "hccl_buffsize_mb": self.hccl_buffsize_mb,
            "backend": "npu",
            "transport": "hccl",
        }
        if lay.shared_dies:
            config["shared_expert_ranks"] = list(range(lay.routed_dies, lay.ffn_dies))
        elif self.shared_slots:
            config["shared_experts_on"] = "attention"
        return config

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form (times in ms, memory in GB)."""
        lay = self.layout
        return {
            "model": self.model,
            "hardware": self.hardware,
            "precision": vars(self.precision).copy(),
            "context": self.workload.context,
            "mean_context": self.workload.mean_context,
            "attention_dies": lay.attention_dies,
            "ffn_dies": lay.ffn_dies,
            "shared_expert_dies": lay.shared_dies,
            "micro_batches": lay.micro_batches,
            "bs_per_micro_batch": lay.tokens,
            "sequences_per_attention_die": self.sequences_per_attention_die,
            "ffn_tokens_per_step": self.ffn_tokens_per_step,
            "ffn_rows_per_micro_batch": self.ffn_rows_per_micro_batch,
            "experts_per_ffn_die": self.experts_per_ffn_die,
            "active_experts_per_ffn_die": self.active_experts_per_ffn_die,
            "hccl_buffsize_mb": self.hccl_buffsize_mb,
            "tpot_ms": self.tpot_s * 1e3,
            "throughput_per_die": self.throughput_per_die,
            "step_ms": self.step_s * 1e3,
            "layer": {
                **{p.name: p.seconds * 1e3 for p in self.budget.phases},
                "period": self.budget.period * 1e3,
                "limiter": self.budget.limiter,
            },
            "layer_bounds": {p.name: p.bound for p in self.budget.phases},
            "dense_layer_ms": self.dense_layer_s * 1e3,
            "head_ms": self.head_s * 1e3,
            "moe_layers": self.moe_layers,
            "dense_layers": self.dense_layers,
            "memory_gb": {
                "attention_die": self.attention_memory_gb,
                "ffn_die": self.ffn_memory_gb,
                "usable": self.usable_memory_gb,
                "weight_split": self.weight_split,
                "attention_die_terms": self.attention_memory.terms_gb(),
                "ffn_die_terms": self.ffn_memory.terms_gb(),
            },
            "afd_config": self.afd_config(),
        }


# -- the formulas ------------------------------------------------------------------------------
def _roofline(name: str, nbytes: float, flops: float, hw: HardwareProfile, rate: float) -> Phase:
    """max(bytes / B_hbm, flops / P): a kernel streams its bytes while it computes."""
    t_mem, t_cmp = nbytes / hw.hbm_bytes_per_s, flops / rate
    bound = "HBM" if t_mem >= t_cmp else "compute"
    detail = f"{nbytes / 1e6:.1f} MB, {flops / 1e9:.1f} GFLOP"
    return Phase(name, max(t_mem, t_cmp), bound, detail)


def _link(name: str, nbytes: float, hw: HardwareProfile) -> Phase:
    """lambda + bytes / B_ic, bytes = the larger of what one die sends and one receives."""
    t = hw.message_latency_us * 1e-6 + nbytes / hw.link_bytes_per_s
    bound = "latency" if hw.message_latency_us * 1e-6 >= nbytes / hw.link_bytes_per_s else "link"
    return Phase(name, t, bound, f"{nbytes / 1e6:.2f} MB per die")


def _with_overhead(phase: Phase, hw: HardwareProfile) -> Phase:
    return replace(phase, seconds=phase.seconds + hw.layer_overhead_us * 1e-6)


def _weight_rate(hw: HardwareProfile, precision: Precision) -> float:
    return hw.int8_ops if precision.weights == "int8" else hw.bf16_flops


def active_experts(local: int, num_experts: int, topk: int, tokens: float) -> float:
    """Expected experts of one die that at least one of ``tokens`` tokens picks.

    Each token picks ``topk`` of ``num_experts``, so one expert stays idle with probability
    ``(1 - K/N) ** tokens``; a die hosting ``local`` experts reads the weights of
    ``local * (1 - (1 - K/N) ** tokens)`` of them (uniform routing assumed).
    """
    idle = (1.0 - topk / num_experts) ** tokens
    return local * (1.0 - idle)


def attention_phase(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    context: float,
    tokens: int,
    *,
    shared_here: bool,
    dense_mlp: bool = False,
) -> Phase:
    """t_attn for one micro-batch of ``tokens`` sequences in one layer.

    Bytes: the layer's attention weights (plus the router, plus the shared expert when the
    attention die runs it, plus the dense MLP on a dense layer) once, and every sequence's
    KV reads. Compute: 2 FLOPs per weight per token at the weight rate, plus the attention
    products at the bf16 rate. ``t_attn = max(bytes / B_hbm, compute) + BS * o_seq + o_layer``.
    """
    a = shape.attention
    params = a.params(shape.hidden)
    if dense_mlp:
        params += shape.dense_mlp_params
    else:
        params += shape.router_params + (shape.shared_params if shared_here else 0)
    kv = tokens * a.kv_bytes_read(context, precision.kv_bytes)
    nbytes = params * precision.weight_bytes + kv
    t_mem = nbytes / hw.hbm_bytes_per_s
    t_cmp = 2.0 * tokens * params / _weight_rate(hw, precision)
    t_cmp += tokens * a.core_flops(context) / hw.bf16_flops
    detail = f"KV {kv / 1e6:.1f} MB + weights {params * precision.weight_bytes / 1e6:.0f} MB"
    seconds = max(t_mem, t_cmp) + tokens * hw.sequence_overhead_us * 1e-6
    phase = Phase("attention", seconds, "HBM" if t_mem >= t_cmp else "compute", detail)
    return _with_overhead(phase, hw)


def expert_phase(
    name: str,
    hw: HardwareProfile,
    precision: Precision,
    *,
    rows: float,
    weights: float,
    params_per_row: int,
    row_bytes: int,
    hidden: int,
) -> Phase:
    """t_ffn of one FFN die: max(weights read, GEMM) plus the rows' own traffic.

    ``weights`` are the parameters the die reads (its active experts), each row costs
    ``2 * params_per_row`` FLOPs, and each row is read once as it arrived (``row_bytes``)
    and written back once in bf16.
    """
    nbytes = weights * precision.weight_bytes + rows * (row_bytes + hidden * RESULT_BYTES)
    flops = 2.0 * rows * params_per_row
    return _with_overhead(_roofline(name, nbytes, flops, hw, _weight_rate(hw, precision)), hw)


def window_layout(
    shape: ModelShape, precision: Precision, layout: AFDLayout, shared_slots: int
) -> WindowLayout:
    """The layout of one window group, exactly as the runtime's `Deployment` builds it for
    A3 (backend "npu", ``window_groups = "per_micro_batch"``: one group of M = 1 per
    micro-batch, slots of A3 callers' 512-aligned stride)."""
    quant = precision.a2f == "int8"
    return WindowLayout(
        sessions=layout.attention_dies,
        micro_batches=1,
        tokens=layout.tokens,
        topk=shape.moe.topk,
        shared=shared_slots,
        hidden=shape.hidden,
        dtype=torch.bfloat16,
        quant=quant,
        attn_to_ffn_token_size=a3_attn_to_ffn_token_size(shape.hidden, torch.bfloat16, quant),
    )


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


def evaluate(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    workload: Workload,
    layout: AFDLayout,
    *,
    active_experts_override: float | None = None,
    weight_split: str = "experts",
) -> Plan:
    """Price one AFD layout: the layer budget, the step, memory and HCCL_BUFFSIZE.

    ``weight_split`` (`WEIGHT_SPLITS`) says which dies hold the router, the dense layers'
    MLPs and the shared expert; it changes the memory check only. The phase times always
    price them where this project's runtime runs them (``"experts"``): on the attention
    die, or the shared expert on dedicated FFN dies.
    """
    moe = shape.moe
    h, k, n = shape.hidden, moe.topk, moe.num_experts
    a, bs, m = layout.attention_dies, layout.tokens, layout.micro_batches
    f_r, f_s = layout.routed_dies, layout.shared_dies
    s = moe.num_shared_experts if f_s else 0  # shared slots sent over A2F
    shared_on_attention = moe.num_shared_experts > 0 and not f_s
    ctx = workload.mean_context
    # A3's combine needs one shared slot: without one on the FFN side a null slot travels
    # (as the runtime's NPU link sends it), so the windows always have K + 1 slots.
    win = window_layout(shape, precision, layout, max(s, 1))
    e = win.slots

    attn = attention_phase(shape, hw, precision, ctx, bs, shared_here=shared_on_attention)
    combine = _roofline(
        "combine", bs * e * h * RESULT_BYTES + bs * h * RESULT_BYTES, 0.0, hw, hw.bf16_flops
    )

    routed_rows = a * bs * k / f_r
    shared_rows = a * bs * s / f_s if f_s else 0.0
    a2f_in = max(routed_rows, shared_rows) * win.attn_to_ffn_token_size
    a2f = _link("a2f", max(bs * e * win.attn_to_ffn_token_size, a2f_in), hw)
    f2a_out = max(routed_rows, shared_rows) * win.ffn_to_attn_token_size
    f2a = _link("f2a", max(f2a_out, bs * e * win.ffn_to_attn_token_size), hw)

    local = max(1, math.ceil(n / f_r))
    copies = max(1, f_r // n)  # replicas of an expert when F_r > N: sessions split over them
    if active_experts_override is not None:
        active = float(active_experts_override)
    else:
        active = active_experts(local, n, k, a * bs / copies)
    common = {"row_bytes": win.attn_to_ffn_token_size, "hidden": h}
    ffn = expert_phase(
        "ffn",
        hw,
        precision,
        rows=routed_rows,
        weights=active * shape.expert_params,
        params_per_row=shape.expert_params,
        **common,
    )
    if f_s:
        shared = expert_phase(
            "ffn",
            hw,
            precision,
            rows=shared_rows,
            weights=float(shape.shared_params),
            params_per_row=shape.shared_params,
            **common,
        )
        if shared.seconds > ffn.seconds:
            ffn = replace(shared, detail=shared.detail + " (shared-expert die)")

    dense = attention_phase(shape, hw, precision, ctx, bs, shared_here=False, dense_mlp=True)
    head = _roofline(
        "head",
        shape.vocab_size * h * HEAD_BYTES,
        2.0 * bs * shape.vocab_size * h,
        hw,
        hw.bf16_flops,
    )

    buffsize = win.hccl_buffsize_mb
    windows = float(m * buffsize * 2**20)  # each micro-batch's group reserves HCCL_BUFFSIZE
    attn_mem = attention_die_memory(
        shape,
        precision,
        workload,
        sequences=m * bs,
        shared_here=shared_on_attention,
        windows=windows,
        weight_split=weight_split,
    )
    ffn_mem = ffn_die_memory(
        shape,
        precision,
        local_experts=local,
        shared_dies=f_s,
        windows=windows,
        weight_split=weight_split,
    )

    return Plan(
        model=shape.name,
        hardware=hw.name,
        precision=precision,
        workload=workload,
        layout=layout,
        budget=LayerBudget(attn, a2f, ffn, f2a, combine, m),
        dense_layer_s=dense.seconds,
        head_s=head.seconds,
        step_overhead_s=hw.step_overhead_ms * 1e-3,
        moe_layers=shape.num_moe_layers,
        dense_layers=shape.num_dense_layers,
        topk=k,
        shared_slots=s,
        hccl_buffsize_mb=buffsize,
        attention_memory=attn_mem,
        ffn_memory=ffn_mem,
        usable_memory_gb=hw.usable_hbm_bytes / 1e9,
        experts_per_ffn_die=local,
        active_experts_per_ffn_die=active,
        weight_split=weight_split,
    )


# -- the colocated baseline ---------------------------------------------------------------------
@dataclass(frozen=True)
class EPPlan:
    """Expert parallelism without AFD: D dies, each runs attention and N / D experts."""

    dies: int
    micro_batches: int
    tokens: int
    budget: LayerBudget
    dense_layer_s: float
    head_s: float
    step_overhead_s: float
    moe_layers: int
    dense_layers: int
    memory: DieMemory
    usable_memory_gb: float

    @property
    def memory_gb(self) -> float:
        """HBM one die fills, GB (1e9 bytes): `DieMemory.total` of `ep_die_memory`."""
        return self.memory.total / 1e9

    @property
    def step_s(self) -> float:
        """Same sum as `Plan.step_s`; the layer period's busy terms share one die."""
        m = self.micro_batches
        return (
            self.moe_layers * self.period
            + self.dense_layers * m * self.dense_layer_s
            + m * self.head_s
            + self.step_overhead_s
        )

    @property
    def period(self) -> float:
        """max(M * (t_attn + t_ffn + t_comb), round trip): attention and experts share a die."""
        b = self.budget
        busy = self.micro_batches * (b.attention.seconds + b.ffn.seconds + b.combine.seconds)
        return max(busy, b.round_trip)

    @property
    def throughput_per_die(self) -> float:
        return self.micro_batches * self.tokens / self.step_s

    @property
    def fits(self) -> bool:
        return self.memory_gb <= self.usable_memory_gb


def evaluate_ep(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    workload: Workload,
    *,
    dies: int,
    tokens: int,
    micro_batches: int = 1,
    active_experts_override: float | None = None,
) -> EPPlan:
    """Price the colocated EP deployment with the same formulas: the dispatch carries K
    rows per token (the shared expert runs locally), each die's experts get ``BS * K``
    rows when routing is balanced."""
    moe = shape.moe
    h, k, n = shape.hidden, moe.topk, moe.num_experts
    ctx = workload.mean_context
    shared = moe.num_shared_experts > 0
    attn = attention_phase(shape, hw, precision, ctx, tokens, shared_here=shared)
    row_in = h + 128 if precision.a2f == "int8" else h * BYTES[precision.a2f]
    dispatch = _link("a2f", tokens * k * row_in, hw)
    back = _link("f2a", tokens * k * h * RESULT_BYTES, hw)
    local = max(1, math.ceil(n / dies))
    active = (
        float(active_experts_override)
        if active_experts_override is not None
        else active_experts(local, n, k, dies * tokens)
    )
    ffn = expert_phase(
        "ffn",
        hw,
        precision,
        rows=float(tokens * k),
        weights=active * shape.expert_params,
        params_per_row=shape.expert_params,
        row_bytes=row_in,
        hidden=h,
    )
    combine = _roofline("combine", tokens * (k + 2) * h * RESULT_BYTES, 0.0, hw, hw.bf16_flops)
    dense = attention_phase(shape, hw, precision, ctx, tokens, shared_here=False, dense_mlp=True)
    head = _roofline(
        "head",
        shape.vocab_size * h * HEAD_BYTES,
        2.0 * tokens * shape.vocab_size * h,
        hw,
        hw.bf16_flops,
    )
    mem = ep_die_memory(
        shape, precision, workload, local_experts=local, sequences=micro_batches * tokens
    )
    return EPPlan(
        dies=dies,
        micro_batches=micro_batches,
        tokens=tokens,
        budget=LayerBudget(attn, dispatch, ffn, back, combine, micro_batches),
        dense_layer_s=dense.seconds,
        head_s=head.seconds,
        step_overhead_s=hw.step_overhead_ms * 1e-3,
        moe_layers=shape.num_moe_layers,
        dense_layers=shape.num_dense_layers,
        memory=mem,
        usable_memory_gb=hw.usable_hbm_bytes / 1e9,
    )


# -- the search ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What to optimise: with ``tpot_s``, the most tokens/s/die with TPOT <= tpot_s; with
    ``throughput_per_die``, the lowest TPOT reaching it; with neither, the most tokens/s/die."""

    tpot_s: float | None = None
    throughput_per_die: float | None = None

    def __post_init__(self) -> None:
        check(
            self.tpot_s is None or self.throughput_per_die is None,
            "target",
            "at most one of a TPOT and a throughput target",
            (self.tpot_s, self.throughput_per_die),
        )
        for name in ("tpot_s", "throughput_per_die"):
            value = getattr(self, name)
            check(value is None or value > 0, name, "> 0", value)


@dataclass(frozen=True)
class SearchResult:
    """The best plan (None when no layout meets the target) and every feasible candidate,
    best first. ``fastest`` is the lowest-TPOT layout that fits, target or not."""

    best: Plan | None
    candidates: tuple[Plan, ...]
    fastest: Plan | None
    searched: int = 0
    notes: tuple[str, ...] = field(default=())


# Plans within TIE of the best tokens/s/die count as equal and the smaller deployment wins:
# the calibration spread is about that wide, and a bigger EP domain always gains a little.
TIE = 0.05
MAX_DIES = 768  # one Atlas 900 A3 SuperPoD: 384 Ascend 910C, two dies each
RATIOS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
MICRO_BATCHES = (1, 2, 3)


def shared_dies_for(shape: ModelShape, routed_dies: int) -> int:
    """F_s: FFN dies for the shared expert so that its FLOPs per die match the routed ones'.

    A token costs ``K * I`` routed and ``S * I_s`` shared intermediate columns; F_r dies
    share the routed ones, so ``F_s = max(1, round(F_r * S * I_s / (K * I)))`` (0 when the
    model has no shared expert).
    """
    moe = shape.moe
    if not moe.num_shared_experts:
        return 0
    shared = moe.num_shared_experts * moe.shared_intermediate_size
    return max(1, round(routed_dies * shared / (moe.topk * moe.moe_intermediate_size)))


def split_ffn_dies(shape: ModelShape, ffn_dies: int) -> int:
    """F_s out of a fixed F: the same balance, ``F * S * I_s / (K * I + S * I_s)``, kept
    in [1, F - 1] (0 when the model has no shared expert or F = 1)."""
    moe = shape.moe
    if not moe.num_shared_experts or ffn_dies < 2:
        return 0
    shared = moe.num_shared_experts * moe.shared_intermediate_size
    share = shared / (moe.topk * moe.moe_intermediate_size + shared)
    return min(ffn_dies - 1, max(1, round(ffn_dies * share)))


def min_routed_dies(shape: ModelShape, hw: HardwareProfile, precision: Precision) -> int:
    """The fewest FFN dies whose HBM holds every routed expert of every MoE layer."""
    per_expert = shape.expert_params * shape.num_moe_layers * precision.weight_bytes
    fit = int(hw.usable_hbm_bytes // per_expert)  # experts one die holds
    check(fit >= 1, "hardware", "room for at least one expert of every layer per die", fit)
    return math.ceil(shape.moe.num_experts / fit)


def _routed_candidates(shape: ModelShape, lowest: int, limit: int) -> list[int]:
    """F_r values worth trying: divisors of N (even expert split) from ``lowest`` up."""
    n = shape.moe.num_experts
    out = [d for d in range(lowest, min(n, limit) + 1) if n % d == 0]
    return out[:4] or [lowest]


class _Priced:
    """`evaluate` for one (A, F, F_s, M) as a function of BS, remembering what it priced."""

    def __init__(
        self,
        shape: ModelShape,
        hw: HardwareProfile,
        precision: Precision,
        workload: Workload,
        a: int,
        f: int,
        f_s: int,
        m: int,
    ) -> None:
        self.args = (shape, hw, precision, workload)
        self.dims = (a, f, m, f_s)
        self.cache: dict[int, Plan] = {}

    def __call__(self, bs: int) -> Plan:
        if bs not in self.cache:
            a, f, m, f_s = self.dims
            self.cache[bs] = evaluate(*self.args, AFDLayout(a, f, m, bs, f_s))
        return self.cache[bs]

    def fits(self, bs: int) -> bool:
        return self(bs).fits

    def within(self, tpot_s: float, bs: int) -> bool:
        return self(bs).tpot_s <= tpot_s

    def reaches(self, throughput: float, bs: int) -> bool:
        return self(bs).throughput_per_die >= throughput


def _largest(ok: Callable[[int], bool], hi: int) -> int:
    """The largest BS in [1, hi] with ok(BS) true, for ok true-then-false (0 if none)."""
    lo, top = 0, hi
    while lo < top:
        mid = (lo + top + 1) // 2
        if ok(mid):
            lo = mid
        else:
            top = mid - 1
    return lo


def _smallest(ok: Callable[[int], bool], hi: int) -> int:
    """The smallest BS in [1, hi] with ok(BS) true, for ok false-then-true (0 if none)."""
    if hi < 1 or not ok(hi):
        return 0
    lo, top = 1, hi
    while lo < top:
        mid = (lo + top) // 2
        if ok(mid):
            top = mid
        else:
            lo = mid + 1
    return lo


def layouts(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    *,
    fixed: tuple[int, int] | None = None,
    dies: int | None = None,
    shared_experts: str = "ffn",
    max_dies: int = MAX_DIES,
) -> list[tuple[int, int, int]]:
    """(A, F, F_s) triples the search tries.

    ``fixed``: exactly that (A, F), F_s by `split_ffn_dies`. Otherwise F_r runs over the
    first divisors of N that hold every expert (`min_routed_dies`), F_s by
    `shared_dies_for`, F = F_r + F_s; then A = dies - F with ``dies``, or A = round(r * F)
    for every r in `RATIOS` while A + F <= ``max_dies`` (default: one A3 SuperPoD).
    """
    check(
        shared_experts in ("ffn", "attention"),
        "shared_experts",
        "'ffn' or 'attention'",
        shared_experts,
    )
    on_ffn = shared_experts == "ffn"
    if fixed is not None:
        a, f = fixed
        return [(a, f, split_ffn_dies(shape, f) if on_ffn else 0)]
    lowest = min_routed_dies(shape, hw, precision)
    out: list[tuple[int, int, int]] = []
    for f_r in _routed_candidates(shape, lowest, MAX_RANKS_PER_ROLE):
        f_s = shared_dies_for(shape, f_r) if on_ffn else 0
        f = f_r + f_s
        if f > MAX_RANKS_PER_ROLE:
            continue
        if dies is not None:
            if f < dies and dies - f <= MAX_RANKS_PER_ROLE:
                out.append((dies - f, f, f_s))
            continue
        for r in RATIOS:
            a = max(1, round(r * f))
            if a + f <= max_dies and a <= MAX_RANKS_PER_ROLE and (a, f, f_s) not in out:
                out.append((a, f, f_s))
    return out


def search(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    workload: Workload,
    target: Target,
    *,
    fixed: tuple[int, int] | None = None,
    dies: int | None = None,
    micro_batches: Iterable[int] = MICRO_BATCHES,
    max_tokens: int = MAX_TOKENS_PER_MICRO_BATCH,
    shared_experts: str = "ffn",
    max_dies: int = MAX_DIES,
) -> SearchResult:
    """Try every layout of `layouts` with each M and pick BS, then the best plan.

    For each (A, F, M): BS_mem = the largest BS whose memory fits; then, with a TPOT
    target, the largest BS <= BS_mem meeting it (TPOT grows with BS); with a throughput
    target, the smallest BS reaching it (throughput per die grows with BS); with no target,
    BS_mem. Best: most tokens/s/die (TPOT or no target; plans within `TIE` of the best
    count as equal and the one with fewer dies, then fewer micro-batches, wins) or lowest
    TPOT (throughput target; ties to fewer dies, then fewer micro-batches).
    """
    check(
        1 <= max_tokens <= MAX_TOKENS_PER_MICRO_BATCH,
        "max BS",
        f"in [1, {MAX_TOKENS_PER_MICRO_BATCH}]",
        max_tokens,
    )
    plans: list[Plan] = []
    fastest: Plan | None = None
    searched = 0
    triples = layouts(
        shape,
        hw,
        precision,
        fixed=fixed,
        dies=dies,
        shared_experts=shared_experts,
        max_dies=max_dies,
    )
    for a, f, f_s in triples:
        for m in micro_batches:
            priced = _Priced(shape, hw, precision, workload, a, f, f_s, m)
            bs_mem = _largest(priced.fits, max_tokens)
            if bs_mem:
                if fastest is None or priced(1).tpot_s < fastest.tpot_s:
                    fastest = priced(1)
                bs = bs_mem
                if target.tpot_s is not None:
                    bs = _largest(partial(priced.within, target.tpot_s), bs_mem)
                elif target.throughput_per_die is not None:
                    bs = _smallest(partial(priced.reaches, target.throughput_per_die), bs_mem)
                if bs:
                    plans.append(priced(bs))
            searched += len(priced.cache)
    if target.throughput_per_die is not None:
        plans.sort(key=lambda p: (p.tpot_s, p.layout.dies, p.layout.micro_batches))
    else:
        plans.sort(key=lambda p: (-p.throughput_per_die, p.layout.dies, p.layout.micro_batches))
        if plans:
            floor = plans[0].throughput_per_die * (1 - TIE)
            near = [p for p in plans if p.throughput_per_die >= floor]
            near.sort(key=lambda p: (p.layout.dies, p.layout.micro_batches, -p.throughput_per_die))
            plans = near + [p for p in plans if p.throughput_per_die < floor]
    notes: tuple[str, ...] = ()
    if not plans:
        notes = ("no layout meets the target",)
    return SearchResult(plans[0] if plans else None, tuple(plans), fastest, searched, notes)


# -- small helpers ------------------------------------------------------------------------------
def _key(config: Mapping[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        check(default is not None, f"config[{key!r}]", "present (a required key)", None)
        return int(default)  # type: ignore[arg-type]
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    if not ok:
        raise AFDInputError(f"config[{key!r}]", f"an integer in [{lo}, {hi}]", value)
    return int(value)


def search_ep(
    shape: ModelShape,
    hw: HardwareProfile,
    precision: Precision,
    workload: Workload,
    target: Target,
    *,
    dies: int,
    max_tokens: int = MAX_TOKENS_PER_MICRO_BATCH,
) -> EPPlan | None:
    """The colocated EP baseline on ``dies`` dies (M = 1), BS picked as `search` picks it."""
    cache: dict[int, EPPlan] = {}

    def priced(bs: int) -> EPPlan:
        if bs not in cache:
            cache[bs] = evaluate_ep(shape, hw, precision, workload, dies=dies, tokens=bs)
        return cache[bs]

    def fits(bs: int) -> bool:
        return priced(bs).fits

    def within(bs: int) -> bool:
        return target.tpot_s is None or priced(bs).step_s <= target.tpot_s

    def reaches(bs: int) -> bool:
        goal = target.throughput_per_die
        return goal is None or priced(bs).throughput_per_die >= goal

    bs = _largest(fits, max_tokens)
    if bs and target.tpot_s is not None:
        bs = _largest(within, bs)
    elif bs and target.throughput_per_die is not None:
        bs = _smallest(reaches, bs)
    return priced(bs) if bs else None
