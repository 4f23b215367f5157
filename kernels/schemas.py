"""The op family's schemas, verbatim from torch_npu 2.14.0.

Source: `torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml` in the torch_npu 2.14.0
wheel. The reference backend registers its ops with exactly these strings (in the `afd`
namespace), so every caller's argument names, order, defaults and keyword-only split are
those of torch_npu.
"""

from __future__ import annotations

TORCH_NPU_SCHEMAS: dict[str, str] = {
    "npu_attention_to_ffn": (
        "npu_attention_to_ffn(Tensor x, Tensor session_id, Tensor micro_batch_id, "
        "Tensor layer_id, Tensor expert_ids, Tensor expert_rank_table, str group, "
        "int world_size, int[] ffn_token_info_table_shape, int[] ffn_token_data_shape, "
        "int[] attn_token_info_table_shape, int moe_expert_num, *, Tensor? scales=None, "
        "Tensor? active_mask=None, int quant_mode=0, int sync_flag=0, "
        "int ffn_start_rank_id=0) -> ()"
    ),
    "npu_ffn_worker_batching": (
        "npu_ffn_worker_batching(Tensor schedule_context, int expert_num, "
        "int[4] max_out_shape, *, int token_dtype=0, int need_schedule=0, "
        "int layer_num=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "npu_ffn_to_attention": (
        "npu_ffn_to_attention(Tensor x, Tensor session_ids, Tensor micro_batch_ids, "
        "Tensor token_ids, Tensor expert_offsets, Tensor actual_token_num, str group, "
        "int world_size, int[] token_info_table_shape, int[] token_data_shape, *, "
        "Tensor? attn_rank_table=None) -> ()"
    ),
    "npu_attention_worker_combine": (
        "npu_attention_worker_combine(Tensor schedule_context, Tensor expert_scales, "
        "Tensor layer_id, int hidden_size, *, int token_dtype=0, int need_schedule=0) "
        "-> (Tensor, Tensor)"
    ),
    "ffn_worker_scheduler_": (
        "ffn_worker_scheduler_(Tensor(a!) self, *, int sync_group_size=1, "
        "int execute_mode=0) -> Tensor(a!)"
    ),
    "ffn_worker_scheduler": (
        "ffn_worker_scheduler(Tensor self, *, int sync_group_size=1, int execute_mode=0) -> Tensor"
    ),
    "attention_worker_scheduler_": "attention_worker_scheduler_(Tensor(a!) self) -> Tensor(a!)",
    "attention_worker_scheduler": "attention_worker_scheduler(Tensor self) -> Tensor",
}

OP_FAMILY = (
    "npu_attention_to_ffn",
    "npu_ffn_worker_batching",
    "npu_ffn_to_attention",
    "npu_attention_worker_combine",
)
