"""A tiny random-weight MoE decoder, for tests, demos and benchmarks: no download, ever.

Each layer: RMSNorm -> multi-head causal attention (KV cache) -> residual -> RMSNorm ->
router -> MoE (routed SwiGLU experts + an optional sigmoid-gated shared expert, as in
Qwen2-MoE) -> residual. `save_pretrained` writes a `config.json` and safetensors with
Qwen2-MoE (or, without a shared expert, Qwen3-MoE) tensor names, so FFN workers load their
experts from it exactly as from a real checkpoint.

The model runs the same decode through any `MoEEndpoint`: `ColocatedMoE` computes the
experts in place; an `AttentionEndpoint` sends them to FFN ranks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save_file

from afd_dispatch.runtime.checkpoint import ExpertWeights, SharedExpertWeights
from afd_dispatch.runtime.experts import ExpertBank
from afd_dispatch.runtime.model_spec import MoESpec
from afd_dispatch.runtime.pipeline import MoEEndpoint, run_pipelined
from afd_dispatch.runtime.routing import RouterSpec, route
from afd_dispatch.runtime.trace import Tracer


@dataclass(frozen=True)
class TinyMoEConfig:
    vocab_size: int = 96
    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    num_experts: int = 8
    topk: int = 2
    moe_intermediate_size: int = 32
    shared_intermediate_size: int = 48  # 0: no shared expert
    norm_topk_prob: bool = False
    max_positions: int = 128
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def hf_config(self) -> dict[str, object]:
        shared = self.shared_intermediate_size > 0
        arch = "qwen2_moe" if shared else "qwen3_moe"
        cfg: dict[str, object] = {
            "architectures": ["Qwen2MoeForCausalLM" if shared else "Qwen3MoeForCausalLM"],
            "model_type": arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.topk,
            "moe_intermediate_size": self.moe_intermediate_size,
            "intermediate_size": self.moe_intermediate_size * 2,
            "norm_topk_prob": self.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": 1e-6,
            "torch_dtype": str(self.dtype).removeprefix("torch."),
        }
        if shared:
            cfg["shared_expert_intermediate_size"] = self.shared_intermediate_size
        return cfg


@dataclass
class DecodeState:
    """One micro-batch of sequences that decode in lockstep."""

    tokens: torch.Tensor  # (n,) next input token per sequence
    position: int = 0
    hidden: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)


class TinyMoEModel:
    def __init__(self, config: TinyMoEConfig) -> None:
        self.config = c = config
        g = torch.Generator().manual_seed(c.seed)
        h = c.hidden_size

        def rand(*shape: int, scale: float | None = None) -> torch.Tensor:
            s = scale if scale is not None else 1 / math.sqrt(shape[-1])
            return (torch.randn(*shape, generator=g) * s).to(c.dtype)

        self.weights: dict[str, torch.Tensor] = {
            "model.embed_tokens.weight": rand(c.vocab_size, h, scale=1.0),
            "model.embed_positions.weight": rand(c.max_positions, h, scale=0.1),
            "model.norm.weight": (1 + 0.1 * torch.randn(h, generator=g)).to(c.dtype),
            "lm_head.weight": rand(c.vocab_size, h),
        }
        for layer in range(c.num_layers):
            p = f"model.layers.{layer}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self.weights[p + norm + ".weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(
                    c.dtype
                )
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                self.weights[f"{p}self_attn.{proj}.weight"] = rand(h, h)
            self.weights[p + "mlp.gate.weight"] = rand(c.num_experts, h)
            for e in range(c.num_experts):
                self._expert(f"{p}mlp.experts.{e}.", c.moe_intermediate_size, rand)
            if c.shared_intermediate_size:
                self._expert(p + "mlp.shared_expert.", c.shared_intermediate_size, rand)
                self.weights[p + "mlp.shared_expert_gate.weight"] = rand(1, h)
        self.spec = MoESpec.from_hf_config(c.hf_config())
        # routed as the config it writes says, through the same reader a real model takes
        self.router: RouterSpec = self.spec.router_spec()

    def _expert(self, prefix: str, inter: int, rand: object) -> None:
        h = self.config.hidden_size
        assert callable(rand)
        self.weights[prefix + "gate_proj.weight"] = rand(inter, h)
        self.weights[prefix + "up_proj.weight"] = rand(inter, h)
        self.weights[prefix + "down_proj.weight"] = rand(h, inter)

    # -- checkpoint ------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(self.config.hf_config(), fh, indent=2)
        save_file(
            {k: v.contiguous() for k, v in self.weights.items()},
            os.path.join(path, "model.safetensors"),
        )

    def expert_banks(self, batch_invariant: bool = True) -> dict[int, ExpertBank]:
        """Every layer's experts, all of them (what a colocated run uses)."""
        banks = {}
        for layer in self.moe_layers:
            p = f"model.layers.{layer}.mlp."
            routed = {
                e: self._weights(f"{p}experts.{e}.", ExpertWeights)
                for e in range(self.config.num_experts)
            }
            shared: dict[int, SharedExpertWeights] = {}
            if self.config.shared_intermediate_size:
                shared[0] = self._weights(
                    p + "shared_expert.",
                    SharedExpertWeights,
                    gate_weight=self.weights[p + "shared_expert_gate.weight"],
                )
            banks[layer] = ExpertBank(self.config.num_experts, routed, shared, batch_invariant)
        return banks

    def _weights(self, prefix: str, kind: type[Any], **extra: object) -> Any:
        w = self.weights
        return kind(
            gate=w[prefix + "gate_proj.weight"],
            up=w[prefix + "up_proj.weight"],
            down=w[prefix + "down_proj.weight"],
            **extra,
        )

    # -- the layered model (pipeline.LayeredModel) ------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return list(self.spec.moe_layers)

    def pre(
        self, layer: int, state: DecodeState
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w, c = self.weights, self.config
        if layer == 0:
            state.hidden = (
                w["model.embed_tokens.weight"][state.tokens]
                + w["model.embed_positions.weight"][state.position]
            )
        h = state.hidden
        assert h is not None
        p = f"model.layers.{layer}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"])
        n, heads = x.shape[0], c.num_heads
        d = c.hidden_size // heads
        q, k, v = (
            (x @ w[f"{p}self_attn.{name}.weight"].T).view(n, heads, d)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        keys = torch.cat([state.keys[layer], k[:, None]], 1) if layer in state.keys else k[:, None]
        values = (
            torch.cat([state.values[layer], v[:, None]], 1) if layer in state.values else v[:, None]
        )
        state.keys[layer], state.values[layer] = keys, values
        scores = torch.einsum("nhd,nthd->nht", q.float(), keys.float()) / math.sqrt(d)
        attn = torch.einsum("nht,nthd->nhd", scores.softmax(-1), values.float()).to(c.dtype)
        h = h + attn.reshape(n, heads * d) @ w[p + "self_attn.o_proj.weight"].T  # n may be 0
        state.residual = h
        y = _rms_norm(h, w[p + "post_attention_layernorm.weight"])
        ids, weights = route(y @ w[p + "mlp.gate.weight"].T, self.router)
        return y, ids, weights

    def post(self, layer: int, state: DecodeState, moe_out: torch.Tensor) -> None:
        assert state.residual is not None
        state.hidden = state.residual + moe_out

    def finish(self, state: DecodeState) -> torch.Tensor:
        """Final norm + greedy next token; returns the final hidden states (n, H)."""
        assert state.hidden is not None
        h = _rms_norm(state.hidden, self.weights["model.norm.weight"])
        state.tokens = (h @ self.weights["lm_head.weight"].T).argmax(-1)
        state.position += 1
        return h


def decode(
    model: TinyMoEModel,
    endpoint: MoEEndpoint,
    prompts: torch.Tensor,
    steps: int,
    micro_batches: int,
    tracer: Tracer | None = None,
) -> list[torch.Tensor]:
    """Greedy decode: prompt tokens one step each, then `steps` generated tokens.

    The sequences are split into `micro_batches` decode states run through `run_pipelined`.
    Returns the final hidden states (n, H) of every step.
    """
    chunks = torch.tensor_split(prompts, micro_batches, dim=0)
    states = [DecodeState(tokens=c[:, 0].clone()) for c in chunks]
    outputs = []
    for step in range(prompts.shape[1] + steps):
        run_pipelined(model, endpoint, states, tracer)
        hidden = [model.finish(s) for s in states]
        outputs.append(torch.cat(hidden))
        if step + 1 < prompts.shape[1]:
            for s, c in zip(states, chunks, strict=True):
                s.tokens = c[:, step + 1].clone()
    return outputs


class ColocatedMoE:
    """The MoE block computed in place, in exactly the order the AFD path uses.

    Expert rows are rounded to the activation dtype (as F2A carries them), then summed in
    float32: acc = 0; acc += d_k * w_k for k < K; acc += each shared row; one rounding.
    """

    def __init__(self, banks: dict[int, ExpertBank], num_shared: int, dtype: torch.dtype) -> None:
        self.banks = banks
        self.num_shared = num_shared
        self.dtype = dtype
        self._pending: dict[int, torch.Tensor] = {}

    def send(
        self,
        micro_batch: int,
        layer: int,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        self._pending[micro_batch] = self.moe(layer, hidden, ids, weights)

    def receive(self, micro_batch: int) -> torch.Tensor:
        return self._pending.pop(micro_batch)

    def moe(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        bank = self.banks[layer]
        n, k = ids.shape
        rows = torch.zeros(n, k, x.shape[1], dtype=self.dtype)
        flat = ids.reshape(-1).to(torch.int64)
        for expert in flat.unique().tolist():
            where = (flat == expert).nonzero().flatten()
            t, slot = where // k, where % k
            rows[t, slot] = bank.apply(expert, x[t].to(bank.dtype)).to(self.dtype)
        acc = torch.zeros(n, x.shape[1], dtype=torch.float32)
        for j in range(k):
            acc = acc + rows[:, j].float() * weights[:, j : j + 1].float()
        for s in range(self.num_shared):
            acc = acc + bank.apply(bank.num_experts + s, x.to(bank.dtype)).to(self.dtype).float()
        return acc.to(self.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


__all__ = ["ColocatedMoE", "DecodeState", "TinyMoEConfig", "TinyMoEModel", "decode"]
