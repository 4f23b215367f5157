"""`MoESpec` from Hugging Face config.json: published configs, transformers' own, bad ones.

The published configs below carry the keys (and values) of the config.json files released
with the models; `tests/data/hf_tiny_moe_checkpoints.json` holds the config.json files that
transformers 5.19 wrote for tiny random models, with the MoE layers transformers built.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from afd_dispatch import AFDInputError
from afd_dispatch.model.spec import MAX_JSON_BYTES, MoESpec

RECORD = json.loads((Path(__file__).parent / "data" / "hf_tiny_moe_checkpoints.json").read_text())

QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "router_aux_loss_coef": 0.001,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}
QWEN15_MOE_A27B: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "model_type": "qwen2_moe",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "torch_dtype": "bfloat16",
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4,
    "num_experts": 60,
    "norm_topk_prob": False,
}
MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "router_aux_loss_coef": 0.02,
    "torch_dtype": "bfloat16",
}
DEEPSEEK_V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "q_lora_rank": None,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
}
DEEPSEEK_V2: dict[str, Any] = {
    **DEEPSEEK_V2_LITE,
    "hidden_size": 5120,
    "moe_intermediate_size": 1536,
    "n_group": 8,
    "n_routed_experts": 160,
    "num_hidden_layers": 60,
    "routed_scaling_factor": 16.0,
    "topk_group": 3,
    "topk_method": "group_limited_greedy",
}
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
}


def test_qwen3_moe_published_config() -> None:
    spec = MoESpec.from_hf_config(QWEN3_30B_A3B)
    assert (spec.architecture, spec.weight_scheme) == ("qwen3_moe", "qwen3_moe")
    assert (spec.hidden_size, spec.num_layers, spec.num_experts, spec.topk) == (2048, 48, 128, 8)
    assert spec.moe_layers == tuple(range(48))
    assert spec.moe_intermediate_size == 768
    assert (spec.num_shared_experts, spec.shared_intermediate_size) == (0, 0)
    assert not spec.shared_expert_gate
    assert spec.norm_topk_prob and spec.routed_scaling_factor == 1.0
    assert (spec.scoring_func, spec.topk_method, spec.n_group, spec.topk_group) == (
        "softmax",
        "greedy",
        1,
        1,
    )
    assert spec.dtype == torch.bfloat16


def test_qwen2_moe_has_one_gated_shared_expert() -> None:
    spec = MoESpec.from_hf_config(QWEN15_MOE_A27B)
    assert spec.weight_scheme == "qwen2_moe"
    assert (spec.num_experts, spec.topk, spec.moe_intermediate_size) == (60, 4, 1408)
    assert (spec.num_shared_experts, spec.shared_intermediate_size) == (1, 5632)
    assert spec.shared_expert_gate
    assert not spec.norm_topk_prob
    assert spec.moe_layers == tuple(range(24))


def test_mixtral_every_layer_sparse_and_renormalised() -> None:
    spec = MoESpec.from_hf_config(MIXTRAL_8X7B)
    assert spec.weight_scheme == "mixtral"
    assert (spec.num_experts, spec.topk, spec.moe_intermediate_size) == (8, 2, 14336)
    assert spec.moe_layers == tuple(range(32))
    assert spec.norm_topk_prob  # Mixtral's router always renormalises its top-k
    assert spec.num_shared_experts == 0


def test_deepseek_v2_lite_greedy() -> None:
    spec = MoESpec.from_hf_config(DEEPSEEK_V2_LITE)
    assert spec.weight_scheme == "deepseek"
    assert spec.moe_layers == tuple(range(1, 27))  # first_k_dense_replace = 1
    # two shared experts form one MLP of 2 * 1408
    assert (spec.num_shared_experts, spec.shared_intermediate_size) == (1, 2816)
    assert (spec.topk_method, spec.scoring_func, spec.n_group, spec.topk_group) == (
        "greedy",
        "softmax",
        1,
        1,
    )
    assert not spec.score_correction_bias


def test_deepseek_v2_group_limited() -> None:
    spec = MoESpec.from_hf_config(DEEPSEEK_V2)
    assert (spec.topk_method, spec.n_group, spec.topk_group) == ("group_limited_greedy", 8, 3)
    assert spec.routed_scaling_factor == 16.0
    assert spec.shared_intermediate_size == 3072


def test_deepseek_v3_sigmoid_grouped_with_bias() -> None:
    spec = MoESpec.from_hf_config(DEEPSEEK_V3)
    assert spec.moe_layers == tuple(range(3, 61))  # MTP layer 61 is not a decoder layer
    assert (spec.num_experts, spec.topk, spec.moe_intermediate_size) == (256, 8, 2048)
    assert (spec.num_shared_experts, spec.shared_intermediate_size) == (1, 2048)
    assert (spec.scoring_func, spec.topk_method, spec.n_group, spec.topk_group) == (
        "sigmoid",
        "noaux_tc",
        8,
        4,
    )
    assert spec.score_correction_bias and spec.norm_topk_prob
    assert spec.routed_scaling_factor == 2.5


def test_deepseek_defaults_follow_transformers() -> None:
    # transformers 5.19 writes no scoring_func / topk_method / moe_layer_freq for V3
    v3 = {k: v for k, v in DEEPSEEK_V3.items() if k not in ("scoring_func", "topk_method")}
    spec = MoESpec.from_hf_config(v3)
    assert (spec.scoring_func, spec.topk_method) == ("sigmoid", "noaux_tc")
    v2 = {
        k: v
        for k, v in DEEPSEEK_V2_LITE.items()
        if k not in ("scoring_func", "topk_method", "n_group", "topk_group")
    }
    spec = MoESpec.from_hf_config(v2)
    assert (spec.scoring_func, spec.topk_method, spec.n_group) == ("softmax", "greedy", 1)
    assert (
        MoESpec.from_hf_config({**DEEPSEEK_V2_LITE, "n_shared_experts": None}).num_shared_experts
        == 0
    )


def test_sparse_step_and_dense_layers() -> None:
    qwen = {
        **QWEN3_30B_A3B,
        "num_hidden_layers": 8,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
    }
    # layer l is sparse iff (l + 1) % step == 0 and l is not listed
    assert MoESpec.from_hf_config(qwen).moe_layers == (1, 5, 7)
    ds = {**DEEPSEEK_V3, "num_hidden_layers": 9, "first_k_dense_replace": 2, "moe_layer_freq": 3}
    # layer l is sparse iff l >= first_k_dense_replace and l % moe_layer_freq == 0
    assert MoESpec.from_hf_config(ds).moe_layers == (3, 6)


@pytest.mark.parametrize("arch", sorted(RECORD["models"]))
def test_configs_transformers_wrote(arch: str) -> None:
    model = RECORD["models"][arch]
    spec = MoESpec.from_hf_config(model["config"])
    assert spec.architecture == arch
    # the MoE layers transformers itself built from this config
    assert list(spec.moe_layers) == model["moe_layers_built"]
    assert spec.dtype == torch.bfloat16  # transformers 5 writes `dtype`, not `torch_dtype`


def test_qwen3_expert_count_under_either_name() -> None:
    # transformers 5.19 writes Qwen3-MoE's count as num_local_experts (its attribute_map)
    renamed = {k: v for k, v in QWEN3_30B_A3B.items() if k != "num_experts"}
    assert MoESpec.from_hf_config({**renamed, "num_local_experts": 64}).num_experts == 64
    with pytest.raises(AFDInputError, match="num_local_experts") as info:
        MoESpec.from_hf_config({**QWEN3_30B_A3B, "num_local_experts": 64})
    assert "the same expert count" in str(info.value)


def test_from_pretrained_reads_dir_or_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    assert MoESpec.from_pretrained(tmp_path) == MoESpec.from_pretrained(tmp_path / "config.json")
    assert MoESpec.from_pretrained(str(tmp_path)).num_experts == 256


# -- bad configs ---------------------------------------------------------------------------
def _without(base: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in base.items() if k != key}


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, config, key named in the error, part of the value shown)
    ("unknown arch", {**MIXTRAL_8X7B, "model_type": "llama"}, "model_type", "llama"),
    ("no arch", _without(MIXTRAL_8X7B, "model_type"), "model_type", "None"),
    ("missing hidden", _without(QWEN3_30B_A3B, "hidden_size"), "hidden_size", "None"),
    ("hidden 0", {**QWEN3_30B_A3B, "hidden_size": 0}, "hidden_size", "0"),
    ("hidden str", {**QWEN3_30B_A3B, "hidden_size": "2048"}, "hidden_size", "2048"),
    ("layers bool", {**MIXTRAL_8X7B, "num_hidden_layers": True}, "num_hidden_layers", "True"),
    ("no experts", _without(QWEN3_30B_A3B, "num_experts"), "num_experts", "None"),
    ("experts 0", {**QWEN3_30B_A3B, "num_experts": 0}, "num_experts", "0"),
    ("topk > experts", {**MIXTRAL_8X7B, "num_experts_per_tok": 9}, "num_experts_per_tok", "9"),
    ("topk > 16", {**DEEPSEEK_V3, "num_experts_per_tok": 17}, "num_experts_per_tok", "17"),
    ("topk float", {**MIXTRAL_8X7B, "num_experts_per_tok": 2.0}, "num_experts_per_tok", "2.0"),
    (
        "no moe inter",
        _without(DEEPSEEK_V3, "moe_intermediate_size"),
        "moe_intermediate_size",
        "None",
    ),
    ("mixtral no inter", _without(MIXTRAL_8X7B, "intermediate_size"), "intermediate_size", "None"),
    (
        "qwen2 no shared size",
        _without(QWEN15_MOE_A27B, "shared_expert_intermediate_size"),
        "shared_expert_intermediate_size",
        "None",
    ),
    ("ds no shared count", _without(DEEPSEEK_V3, "n_shared_experts"), "n_shared_experts", "None"),
    ("ds shared -1", {**DEEPSEEK_V3, "n_shared_experts": -1}, "n_shared_experts", "-1"),
    ("gelu", {**MIXTRAL_8X7B, "hidden_act": "gelu"}, "hidden_act", "gelu"),
    ("dtype int8", {**MIXTRAL_8X7B, "torch_dtype": "int8"}, "torch_dtype", "int8"),
    (
        "dtypes disagree",
        {**MIXTRAL_8X7B, "dtype": "float16"},
        "dtype",
        "float16",
    ),
    ("mlp_only out of range", {**QWEN3_30B_A3B, "mlp_only_layers": [48]}, "mlp_only_layers", "48"),
    ("mlp_only not list", {**QWEN3_30B_A3B, "mlp_only_layers": "0"}, "mlp_only_layers", "0"),
    ("sparse step 0", {**QWEN3_30B_A3B, "decoder_sparse_step": 0}, "decoder_sparse_step", "0"),
    (
        "all layers dense",
        {**QWEN3_30B_A3B, "num_hidden_layers": 2, "mlp_only_layers": [0, 1]},
        "mlp_only_layers",
        "[0, 1]",
    ),
    ("norm not bool", {**QWEN3_30B_A3B, "norm_topk_prob": 1}, "norm_topk_prob", "1"),
    (
        "first dense >= layers",
        {**DEEPSEEK_V3, "first_k_dense_replace": 61},
        "first_k_dense_replace",
        "61",
    ),
    ("layer freq 0", {**DEEPSEEK_V3, "moe_layer_freq": 0}, "moe_layer_freq", "0"),
    ("scaling 0", {**DEEPSEEK_V3, "routed_scaling_factor": 0}, "routed_scaling_factor", "0"),
    (
        "scaling nan",
        {**DEEPSEEK_V3, "routed_scaling_factor": float("nan")},
        "routed_scaling_factor",
        "nan",
    ),
    ("v3 softmax", {**DEEPSEEK_V3, "scoring_func": "softmax"}, "scoring_func", "softmax"),
    ("v3 greedy", {**DEEPSEEK_V3, "topk_method": "greedy"}, "topk_method", "greedy"),
    ("v2 sigmoid", {**DEEPSEEK_V2, "scoring_func": "sigmoid"}, "scoring_func", "sigmoid"),
    ("v2 bad method", {**DEEPSEEK_V2, "topk_method": "top1"}, "topk_method", "top1"),
    ("n_group not divisor", {**DEEPSEEK_V3, "n_group": 7}, "n_group", "7"),
    ("topk_group > n_group", {**DEEPSEEK_V3, "topk_group": 9}, "topk_group", "9"),
    ("v2 grouped no n_group", _without(DEEPSEEK_V2, "n_group"), "n_group", "None"),
    (
        "too few groups for topk",
        {**DEEPSEEK_V3, "n_group": 64, "topk_group": 1},
        "n_group",
        "'topk_group': 1",
    ),
    ("qwen3 aliases differ", {**QWEN3_30B_A3B, "num_local_experts": 64}, "num_local_experts", "64"),
]


@pytest.mark.parametrize(("config", "key", "shown"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_names_key_and_value(config: dict[str, Any], key: str, shown: str) -> None:
    with pytest.raises(AFDInputError) as info:
        MoESpec.from_hf_config(copy.deepcopy(config))
    err = info.value
    assert key in err.argument, f"{err.argument!r} does not name {key!r}"
    assert shown in repr(err.value), f"{err.value!r} does not show {shown!r}"
    assert str(err).startswith(f"{err.argument}: expected ")


def test_v3_groups_need_two_experts() -> None:
    # noaux_tc scores a group by the sum of its two best experts: one-expert groups fail
    with pytest.raises(AFDInputError, match="top 2") as info:
        MoESpec.from_hf_config({**DEEPSEEK_V3, "n_group": 256, "topk_group": 8})
    assert "'n_group': 256" in str(info.value)


def test_not_a_dict() -> None:
    with pytest.raises(AFDInputError, match="config: expected a JSON object"):
        MoESpec.from_hf_config([("model_type", "mixtral")])


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("{not json", "valid JSON"),
        ("[1, 2]", "a JSON object"),
        ('{"model_type": "mixtral", "model_type": "qwen3_moe"}', "each key at most once"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "valid JSON"),  # deep nesting
    ],
)
def test_bad_config_file(tmp_path: Path, text: str, shown: str) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(AFDInputError, match=r"config\.json") as info:
        MoESpec.from_pretrained(tmp_path)
    assert shown in str(info.value)


def test_config_file_missing_or_huge(tmp_path: Path) -> None:
    with pytest.raises(AFDInputError, match="readable UTF-8 JSON file"):
        MoESpec.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(" " * (MAX_JSON_BYTES + 1))
    with pytest.raises(AFDInputError, match=f"at most {MAX_JSON_BYTES} bytes"):
        MoESpec.from_pretrained(tmp_path)


# -- direct construction -------------------------------------------------------------------
GOOD: dict[str, Any] = {
    "architecture": "deepseek_v3",
    "hidden_size": 16,
    "num_layers": 4,
    "moe_layers": (1, 2, 3),
    "num_experts": 8,
    "topk": 2,
    "moe_intermediate_size": 8,
    "num_shared_experts": 1,
    "shared_intermediate_size": 16,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "n_group": 4,
    "topk_group": 2,
}


def test_direct_construction_and_list_layers() -> None:
    spec = MoESpec(**{**GOOD, "moe_layers": [1, 3]})
    assert spec.moe_layers == (1, 3)
    assert spec.weight_scheme == "deepseek" and spec.score_correction_bias
    qwen2 = {**GOOD, "architecture": "qwen2_moe", "topk_method": "greedy", "n_group": 1}
    assert MoESpec(**{**qwen2, "topk_group": 1, "shared_expert_gate": True}).shared_expert_gate
    with pytest.raises(AFDInputError, match="only Qwen2-MoE gates its shared expert"):
        MoESpec(**{**qwen2, "topk_group": 1})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"architecture": "gpt2"}, "architecture"),
        ({"moe_layers": ()}, "moe_layers"),
        ({"moe_layers": (2, 1)}, "moe_layers"),
        ({"moe_layers": (1, 1)}, "moe_layers"),
        ({"moe_layers": (4,)}, "moe_layers"),
        ({"topk": 9}, "topk"),
        ({"num_shared_experts": 2}, "num_shared_experts"),
        ({"shared_intermediate_size": 0}, "shared_intermediate_size"),
        ({"num_shared_experts": 0}, "shared_intermediate_size"),
        ({"shared_expert_gate": True}, "shared_expert_gate"),  # DeepSeek's shared MLP: no gate
        (
            {"architecture": "mixtral", "topk_method": "greedy", "n_group": 1, "topk_group": 1},
            "num_shared_experts",
        ),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
        ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_method": "greedy"}, "n_group"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 5}, "topk_group"),
        ({"dtype": torch.int8}, "dtype"),
    ],
)
def test_direct_construction_checks(change: dict[str, Any], field: str) -> None:
    with pytest.raises(AFDInputError) as info:
        MoESpec(**{**GOOD, **change})
    assert info.value.argument == field
