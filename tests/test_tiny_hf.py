"""`afd_dispatch.fixtures.tiny_hf`: tiny random Qwen3-MoE / Qwen2-MoE checkpoints built offline.

Every test here runs with HF_HUB_OFFLINE=1 and with sockets refused, so building, loading
and generating provably touch no hub.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from afd_dispatch import cli
from afd_dispatch.fixtures.tiny_hf import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build_tiny_model,
    greedy_margins,
)
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.checkpoint import load_routed_experts, load_shared_expert

ARCHS = ("qwen3_moe", "qwen2_moe")
FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1, and any attempt to open a network connection fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both architectures, seed 0, float32."""
    root = tmp_path_factory.mktemp("tiny-hf")
    return {arch: build_tiny_model(arch, root / arch, seed=0) for arch in ARCHS}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("arch", ARCHS)
def test_writes_a_complete_checkpoint(models: dict[str, Path], arch: str) -> None:
    path = models[arch]
    assert {p.name for p in path.iterdir()} == FILES
    config = json.loads((path / "config.json").read_text())
    cls = "Qwen3MoeForCausalLM" if arch == "qwen3_moe" else "Qwen2MoeForCausalLM"
    assert config["architectures"] == [cls]
    assert config["model_type"] == arch
    assert config["vocab_size"] == VOCAB_SIZE
    # 32: the smallest head size vLLM's CPU attention takes (qwen2_moe derives it)
    assert config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]) == 32
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 4]  # <|endoftext|>, <|im_end|>
    names = set(_tensors(path))
    # the classic per-expert names of published checkpoints, not transformers' fused ones
    for layer in (0, 1):
        for e in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in names
        assert f"model.layers.{layer}.mlp.experts.gate_up_proj" not in names
        shared = f"model.layers.{layer}.mlp.shared_expert_gate.weight"
        assert (shared in names) == (arch == "qwen2_moe")


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_spec_reads_it(models: dict[str, Path], arch: str) -> None:
    spec = MoESpec.from_pretrained(models[arch])
    assert spec.architecture == arch
    assert (spec.num_experts, spec.topk, spec.moe_layers) == (8, 2, (0, 1))
    assert (spec.hidden_size, spec.moe_intermediate_size) == (128, 64)
    assert spec.dtype == torch.float32
    if arch == "qwen2_moe":
        assert spec.num_shared_experts == 1
        assert spec.shared_expert_gate is True
        assert spec.shared_intermediate_size == 128
        assert spec.norm_topk_prob is False  # as Qwen1.5-MoE
    else:
        assert spec.num_shared_experts == 0
        assert spec.shared_expert_gate is False
        assert spec.norm_topk_prob is True  # as Qwen3


@pytest.mark.parametrize("arch", ARCHS)
def test_afd_loader_reads_what_transformers_computes_with(
    models: dict[str, Path], arch: str
) -> None:
    from transformers import AutoModelForCausalLM

    path = models[arch]
    spec = MoESpec.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    mlp = model.model.layers[1].mlp
    inter = spec.moe_intermediate_size
    for e, w in load_routed_experts(path, spec, 1, [0, 5, 7]).items():
        # transformers fuses the experts again on load: gate rows first, then up
        assert torch.equal(w.gate, mlp.experts.gate_up_proj[e, :inter])
        assert torch.equal(w.up, mlp.experts.gate_up_proj[e, inter:])
        assert torch.equal(w.down, mlp.experts.down_proj[e])
    if arch == "qwen2_moe":
        shared = load_shared_expert(path, spec, 1)
        assert torch.equal(shared.gate, mlp.shared_expert.gate_proj.weight)
        assert shared.gate_weight is not None
        assert torch.equal(shared.gate_weight, mlp.shared_expert_gate.weight)


def test_tokenizer_round_trips_and_renders_chat(models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["qwen2_moe"])
    assert len(tok) == VOCAB_SIZE
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    for text in ("The cat reads the golden book, 42 times!", "Ünïcode ✓ 数字\n\ttabs  "):
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
        assert all(5 <= i < VOCAB_SIZE for i in ids)  # no special token added
    # trained merges: corpus words are whole tokens, unseen text falls back to bytes
    assert tok.tokenize(" the golden book") == ["Ġthe", "Ġgolden", "Ġbook"]
    assert tok.tokenize("zqxj") == ["z", "q", "x", "j"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Does the robot build the bridge?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nDoes the robot build the bridge?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok(text).input_ids
    assert ids.count(3) == 3 and ids.count(4) == 2  # <|im_start|>, <|im_end|> as one token each
    assert tok.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_greedy_generate(models: dict[str, Path], arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[arch])
    model = AutoModelForCausalLM.from_pretrained(models[arch]).eval()
    prompts = ["The cat reads the", "A robot builds the golden", "hello world 123", "the"]
    steps = 12
    margins = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt).input_ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=steps, do_sample=False)
        new = out[0, ids.shape[1] :]
        assert new.shape == (steps,)  # special tokens have logit 0: never EOS
        assert bool((new >= len(SPECIAL_TOKENS)).all())
        # the same tokens as argmax of a full forward per step (no KV cache)
        tokens, margin = greedy_margins(model, ids, steps)
        assert torch.equal(tokens[0], new)
        margins.append(margin[0])
    all_margins = torch.cat(margins)
    # non-degenerate logits: greedy is decided by a clear margin, not a near-tie
    assert float(all_margins.median()) > 0.5
    assert float(all_margins.min()) > 0.0
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok(prompts[0]).input_ids])).logits[0, -1]
    assert 4.0 < float(logits[len(SPECIAL_TOKENS) :].std()) < 16.0


def test_same_seed_same_files_other_seed_other_weights(
    models: dict[str, Path], tmp_path: Path
) -> None:
    reference = _tensors(models["qwen2_moe"])
    again = build_tiny_model("qwen2_moe", tmp_path / "again", seed=0)
    other = build_tiny_model("qwen2_moe", tmp_path / "other", seed=1)
    same, different = _tensors(again), _tensors(other)
    assert same.keys() == reference.keys() == different.keys()
    for name, tensor in reference.items():
        assert torch.equal(same[name], tensor), name
        assert not torch.equal(different[name], tensor), name  # every tensor is random
    for file in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / file).read_bytes() == (models["qwen2_moe"] / file).read_bytes(), file


def test_cli_bfloat16_is_the_float32_draw_rounded(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    argv = ["tiny-model", "--arch", "qwen3_moe", "--out", str(out), "--dtype", "bfloat16"]
    assert cli.main(argv) == 0
    assert MoESpec.from_pretrained(out).dtype == torch.bfloat16
    bf16, fp32 = _tensors(out), _tensors(models["qwen3_moe"])
    assert bf16.keys() == fp32.keys()
    for name, tensor in fp32.items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], tensor.to(torch.bfloat16)), name
    # a non-empty directory is refused, and left as it was
    before = sorted(p.name for p in out.iterdir())
    assert cli.main(argv) == 1
    assert sorted(p.name for p in out.iterdir()) == before


def test_cli_rejects_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["tiny-model", "--arch", "mixtral", "--out", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert not (tmp_path / "m").exists()
