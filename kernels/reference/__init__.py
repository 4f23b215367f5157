"""The reference backend: the A3 AFD op family in pure torch, same bytes in the same windows.

    from afd_dispatch.kernels.reference import npu_attention_to_ffn, ...

Each op is the registered custom op `torch.ops.afd.<name>`, with torch_npu's schema.
"""

import torch

from afd_dispatch.kernels.reference import ops as _ops  # noqa: F401  (registers torch.ops.afd)
from afd_dispatch.kernels.reference.attention_worker_combine import wait_for_next_results
from afd_dispatch.kernels.reference.context_holder import (
    ScheduleContextHolder,
    context_for,
    create_schedule_context_holder,
)
from afd_dispatch.kernels.reference.quant import dequantize_rows, quantize_rows
from afd_dispatch.kernels.reference.schedule_context import last_batched_layer

npu_attention_to_ffn = torch.ops.afd.npu_attention_to_ffn
npu_ffn_worker_batching = torch.ops.afd.npu_ffn_worker_batching
npu_ffn_to_attention = torch.ops.afd.npu_ffn_to_attention
npu_attention_worker_combine = torch.ops.afd.npu_attention_worker_combine
ffn_worker_scheduler_ = torch.ops.afd.ffn_worker_scheduler_
ffn_worker_scheduler = torch.ops.afd.ffn_worker_scheduler
attention_worker_scheduler_ = torch.ops.afd.attention_worker_scheduler_
attention_worker_scheduler = torch.ops.afd.attention_worker_scheduler

__all__ = [
    "ScheduleContextHolder",
    "attention_worker_scheduler",
    "attention_worker_scheduler_",
    "context_for",
    "create_schedule_context_holder",
    "dequantize_rows",
    "ffn_worker_scheduler",
    "ffn_worker_scheduler_",
    "last_batched_layer",
    "npu_attention_to_ffn",
    "npu_attention_worker_combine",
    "npu_ffn_to_attention",
    "npu_ffn_worker_batching",
    "quantize_rows",
    "wait_for_next_results",
]
