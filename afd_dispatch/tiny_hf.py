"""Tiny random-weight Hugging Face MoE checkpoints, built locally (nothing is downloaded).

`build_tiny_model(arch, out)` writes a directory that transformers and vLLM load like a
published model: `config.json`, `model.safetensors` (transformers' `save_pretrained`, with
the classic per-expert tensor names), `generation_config.json`, and a byte-level BPE
tokenizer trained here on synthetic sentences (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`). Two architectures:

- `qwen3_moe`: `Qwen3MoeForCausalLM` (q/k norms, top-k weights renormalised, as Qwen3).
- `qwen2_moe`: `Qwen2MoeForCausalLM`, with a shared expert scaled by
  `sigmoid(shared_expert_gate(x))` and qkv biases (as Qwen1.5-MoE: no renormalisation).

Both: hidden 128, 2 decoder layers (both MoE), 4 query heads of 32 (the smallest head size
vLLM's CPU attention takes) over 2 KV heads, 8 experts of 64, top-2, vocabulary 512, 1024
positions; under 1M parameters.

The weights are not transformers' default initialisation (std 0.02 everywhere, which makes
every layer a ~1% correction of the embedding and the logits nearly tied). They are drawn
from one `torch.Generator` seeded with `seed`, tensor by tensor in name order, so that:

- every linear map keeps the scale of its input (std 1/sqrt(fan_in)) and embeddings have
  std 1, so attention, routed experts and the shared expert each move the residual stream
  by about as much as the embedding: the experts decide the tokens;
- the lm_head has std `LOGIT_STD / sqrt(hidden)`, so the logits have std ~`LOGIT_STD` and
  the greedy top-1 usually leads the top-2 by a logit or more (`greedy_margins` measures it);
- the lm_head rows of the special tokens are zero (their logit is always 0, far below the
  top-1), so greedy decoding never emits EOS and always runs to `max_tokens`;
- norms, biases and the shared-expert gate are random too (not 1 / 0), so a loader that
  drops one of them gives different tokens.

The same seed gives byte-identical tensors; the tokenizer does not depend on the seed.
A `bfloat16` checkpoint holds the `float32` draw of the same seed, rounded.

Greedy margins (top-1 minus top-2 logit, float32, 1024 steps per model): median ~1.8,
5th percentile ~0.13, 1st percentile ~0.02, so a float32 difference of 1e-5 in the logits
flips about one greedy token in 10^5, while bfloat16 rounding (~0.05 in the logits) flips
a few percent: compare implementations in float32. vLLM on CPU downcasts a float32
checkpoint to bfloat16 unless started with `--dtype float32`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("qwen3_moe", "qwen2_moe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

VOCAB_SIZE = 512
LOGIT_STD = 8.0  # std of the logits (lm_head std LOGIT_STD / sqrt(hidden))
ROUTER_STD = 2.0  # std of the router logits: decisive but not one-hot routing
NORM_JITTER = 0.1  # norm weights are 1 + NORM_JITTER * N(0, 1)
BIAS_STD = 0.1

BOS, EOS, PAD, IM_START, IM_END = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
)
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)  # ids 0..4, in this order
# ChatML, as Qwen models use it; `message['content']` as a string (vLLM's "string" format).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS_SEED = 20240601
CORPUS_SENTENCES = 600


@dataclass(frozen=True)
class TinyShape:
    """The sizes of a tiny model (`SHAPE` is the one `build_tiny_model` uses)."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32  # qwen2_moe derives it: hidden_size / num_attention_heads
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 128  # qwen2_moe only
    intermediate_size: int = 256  # dense MLP size (unused: every layer is MoE)
    max_position_embeddings: int = 1024
    vocab_size: int = VOCAB_SIZE


SHAPE = TinyShape()


# -- config ---------------------------------------------------------------------------------
def build_config(arch: str, dtype: str = "float32", shape: TinyShape = SHAPE) -> Any:
    """The transformers config of the tiny `arch` model (a `Qwen3MoeConfig` / `Qwen2MoeConfig`).

    Token ids are those of `build_tokenizer`: BOS 0, EOS 1 (and `<|im_end|>` 4), PAD 2.
    """
    _check_choice("arch", arch, ARCHITECTURES)
    _check_choice("dtype", dtype, tuple(DTYPES))
    common: dict[str, Any] = {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "moe_intermediate_size": shape.moe_intermediate_size,
        "num_experts": shape.num_experts,
        "num_experts_per_tok": shape.num_experts_per_tok,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "tie_word_embeddings": False,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "dtype": dtype,
        "architectures": ["Qwen3MoeForCausalLM" if arch == "qwen3_moe" else "Qwen2MoeForCausalLM"],
    }
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        # head_dim is a keyword the config takes through **kwargs (untyped)
        qwen3: dict[str, Any] = {"head_dim": shape.head_dim, "norm_topk_prob": True}
        return Qwen3MoeConfig(**common, **qwen3)
    from transformers import Qwen2MoeConfig

    if shape.hidden_size != shape.head_dim * shape.num_attention_heads:
        raise ValueError(
            f"qwen2_moe needs hidden_size == head_dim * num_attention_heads, got {shape}"
        )
    return Qwen2MoeConfig(
        **common,
        shared_expert_intermediate_size=shape.shared_expert_intermediate_size,
        norm_topk_prob=False,
        qkv_bias=True,
    )


# -- weights --------------------------------------------------------------------------------
def build_model(arch: str, seed: int = 0, dtype: str = "float32", shape: TinyShape = SHAPE) -> Any:
    """The tiny `arch` model with this module's seeded weights (see the module docstring)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = build_config(arch, dtype, shape)
    torch.manual_seed(seed)  # transformers' own init, overwritten below
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(IM_END)],
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    return model.to(DTYPES[dtype]).eval()


def init_weights(model: Any, seed: int) -> None:
    """Redraw every parameter of `model` in place from `torch.Generator().manual_seed(seed)`.

    Parameters are visited in name order, so the draw depends only on names and shapes.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = int(model.config.hidden_size)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            param = params[name]
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            param.copy_(_scale(name, noise, hidden))


def _scale(name: str, noise: torch.Tensor, hidden: int) -> torch.Tensor:
    if name.endswith("embed_tokens.weight"):
        return noise
    if name.endswith("lm_head.weight"):
        out = noise * (LOGIT_STD / hidden**0.5)
        out[: len(SPECIAL_TOKENS)] = 0.0  # special tokens: logit 0, never the greedy choice
        return out
    if name.endswith("norm.weight"):  # input/post-attention/final norms, q_norm, k_norm
        return 1.0 + NORM_JITTER * noise
    if name.endswith(".bias"):
        return BIAS_STD * noise
    if name.endswith("mlp.gate.weight"):  # router
        return noise * (ROUTER_STD / hidden**0.5)
    # linear maps, fused experts ([E, out, in]) and the shared-expert gate: keep the scale
    return noise / noise.shape[-1] ** 0.5


# -- tokenizer ------------------------------------------------------------------------------
_WORDS = {
    "subject": (
        "the cat,the dog,a robot,my neighbour,the engineer,an old sailor,the teacher,a small "
        "bird,the kernel,every worker,the scheduler,a tiny model,the router,our expert,the "
        "attention layer,a student,the captain,the farmer,a musician,the compiler"
    ),
    "verb": (
        "reads,writes,finds,carries,watches,builds,paints,sends,receives,counts,sorts,"
        "measures,repairs,follows,opens,closes,computes,dispatches,combines,remembers"
    ),
    "adjective": (
        "red,green,blue,quiet,heavy,bright,ancient,modern,curious,gentle,rapid,narrow,"
        "wooden,golden,frozen,sparse,dense,random,hidden,shared"
    ),
    "object": (
        "book,letter,window,garden,river,mountain,tensor,token,message,lantern,bridge,"
        "basket,picture,machine,signal,harbour,kitchen,ladder,village,number"
    ),
    "place": (
        "in the morning,at night,near the station,under the bridge,on the table,in the "
        "forest,by the sea,after lunch,before the rain,on every step"
    ),
}


def synthetic_corpus(sentences: int = CORPUS_SENTENCES, seed: int = CORPUS_SEED) -> Iterator[str]:
    """Deterministic English-like sentences (plus a few numbers and chat-like lines)."""
    rng = random.Random(seed)
    words = {key: value.split(",") for key, value in _WORDS.items()}
    for i in range(sentences):
        subject = rng.choice(words["subject"])
        sentence = (
            f"{subject} {rng.choice(words['verb'])} the {rng.choice(words['adjective'])} "
            f"{rng.choice(words['object'])} {rng.choice(words['place'])}"
        )
        if i % 5 == 0:
            sentence += f", {rng.randint(0, 9999)} times"
        if i % 7 == 0:
            sentence = f"Question: does {subject} know why? Answer: yes"
        yield sentence[0].upper() + sentence[1:] + rng.choice((".", "!", "?", "."))


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` of exactly `vocab_size` tokens.

    Trained offline on `synthetic_corpus()`; byte-level, so any text round-trips. Special
    tokens (ids 0-4): BOS, EOS, PAD, `<|im_start|>`, `<|im_end|>`; no token is added to
    encoded text automatically. Chat template: ChatML (`CHAT_TEMPLATE`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"the tokenizer trained to {tok.get_vocab_size()} tokens, not {vocab_size}: "
            "the synthetic corpus has too few distinct words for that vocabulary"
        )
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise RuntimeError(f"special token {token} has id {tok.token_to_id(token)}, not {i}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=SHAPE.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# -- the checkpoint -------------------------------------------------------------------------
def build_tiny_model(
    arch: str,
    out: str | os.PathLike[str],
    seed: int = 0,
    dtype: str = "float32",
    shape: TinyShape = SHAPE,
) -> Path:
    """Write the tiny `arch` checkpoint and tokenizer into `out` (created; must be empty).
    `shape`: its sizes (e.g. a hidden size A3's op limits accept, 1024 <= H <= 8192).

    Nothing is downloaded. Returns `out` as a `Path`.
    """
    _check_choice("arch", arch, ARCHITECTURES)
    _check_choice("dtype", dtype, tuple(DTYPES))
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory")
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(arch, seed, dtype, shape)
    model.save_pretrained(path)  # default: the per-expert tensor names of published models
    tokenizer.save_pretrained(path)
    return path


def greedy_margins(
    model: Any, input_ids: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy-decode `steps` tokens (no KV cache: full forward each step); for each step the
    chosen tokens [B, steps] and the top-1 minus top-2 logit margins [B, steps] (float32).
    """
    ids = input_ids
    margins = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids).logits[:, -1].float()
            top = logits.topk(2, dim=-1)
            margins.append(top.values[:, 0] - top.values[:, 1])
            ids = torch.cat([ids, top.indices[:, :1]], dim=1)
    return ids[:, input_ids.shape[1] :], torch.stack(margins, dim=1)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


# -- command line ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`afd-dispatch tiny-model --arch ARCH --out DIR [--seed N] [--dtype DTYPE]`."""
    parser = argparse.ArgumentParser(
        prog="afd-dispatch tiny-model",
        description="Build a tiny random-weight Hugging Face MoE checkpoint (offline).",
    )
    parser.add_argument("--arch", required=True, choices=ARCHITECTURES)
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    args = parser.parse_args(argv)
    try:
        path = build_tiny_model(args.arch, args.out, args.seed, args.dtype)
    except FileExistsError as exc:
        print(f"afd-dispatch tiny-model: {exc}", file=sys.stderr)
        return 1
    files = sorted(p.name for p in path.iterdir())
    print(f"wrote {args.arch} (seed {args.seed}, {args.dtype}) to {path}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
