"""What a model and a workload are: the byte sizes, the model's shape read from its
config.json (`AttentionShape`, `ModelShape`), the precision, the workload and one AFD
layout."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.layout import MAX_TOKENS_PER_MICRO_BATCH
from afd_dispatch.model.spec import MAX_JSON_BYTES, MoESpec
from afd_dispatch.topology import MAX_RANKS_PER_ROLE
from afd_dispatch.untrusted_json import read_object

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
        config = read_object(path, "config.json", MAX_JSON_BYTES)
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

    num_attention_ranks: int
    num_ffn_ranks: int
    micro_batches: int
    tokens: int
    shared_dies: int = 0

    def __post_init__(self) -> None:
        check(
            1 <= self.num_attention_ranks <= MAX_RANKS_PER_ROLE,
            "num_attention_ranks (A)",
            f"in [1, {MAX_RANKS_PER_ROLE}]",
            self.num_attention_ranks,
        )
        check(
            1 <= self.num_ffn_ranks <= MAX_RANKS_PER_ROLE,
            "num_ffn_ranks (F)",
            f"in [1, {MAX_RANKS_PER_ROLE}]",
            self.num_ffn_ranks,
        )
        check(self.micro_batches >= 1, "micro-batches (M)", ">= 1", self.micro_batches)
        check(
            1 <= self.tokens <= MAX_TOKENS_PER_MICRO_BATCH,
            "tokens per micro-batch (BS)",
            f"in [1, {MAX_TOKENS_PER_MICRO_BATCH}]",
            self.tokens,
        )
        check(
            0 <= self.shared_dies < self.num_ffn_ranks,
            "shared_dies",
            f"in [0, F - 1 = {self.num_ffn_ranks - 1}]",
            self.shared_dies,
        )

    @property
    def routed_dies(self) -> int:
        """F_r: the FFN dies that host routed experts."""
        return self.num_ffn_ranks - self.shared_dies

    @property
    def dies(self) -> int:
        return self.num_attention_ranks + self.num_ffn_ranks


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
