"""The NPU backend: the A3 AFD op family forwarded to torch_npu, checked on the host first.

    from afd_dispatch.kernels.npu import npu_attention_to_ffn, ...

Same calling surface as the reference backend (torch_npu's schemas: argument names, order,
defaults, keyword-only split). What each call checks before it reaches the device:

- `npu_attention_to_ffn`, `npu_ffn_to_attention`: the planning layer's contract
  (`afd_dispatch.contract`), then the A3 limits (`a3`): float16/bfloat16 activations,
  1024 <= H <= 8192, and M == 1 for `npu_ffn_to_attention`.
- `create_schedule_context_holder`: torch_npu's own host checks (token sizes multiples of
  512, a window of the chosen mode) and the A3 limits of the ops that use the context; the
  sizes are then recorded under the context tensor's address (`contexts`).
- `npu_ffn_worker_batching`, `npu_attention_worker_combine`: the contract's argument
  checks, the A3 token dtypes (no float32 code 3), combine's single shared expert, and,
  for contexts recorded here, every size against the record: the token sizes are row
  strides, any multiple of 512 bytes that holds the row (H + 4 with int8, 2H otherwise).
  A context made elsewhere gets the static checks only.
- the four scheduler ops (in place and not): the context tensor's type (and mode, when
  recorded); for the FFN ones execute_mode == 0 and sync_group_size dividing session_num.
  The non-in-place ones return a new context tensor, which inherits the record.

Checks that read tensor contents (ids, mask prefix, actual_token_num) cost a device-to-host
copy on A3; `set_value_checks(False)` turns them off process-wide.

torch_npu is imported on the first forwarded call, never when this module is imported, so
the backend imports (and validates) on any host.
"""

from afd_dispatch.kernels.npu.a3 import set_value_checks, value_checks_enabled
from afd_dispatch.kernels.npu.contexts import (
    ContextSizes,
    create_schedule_context_holder,
    recorded_context,
)
from afd_dispatch.kernels.npu.ops import (
    attention_worker_scheduler,
    attention_worker_scheduler_,
    ffn_worker_scheduler,
    ffn_worker_scheduler_,
    npu_attention_to_ffn,
    npu_attention_worker_combine,
    npu_ffn_to_attention,
    npu_ffn_worker_batching,
)

__all__ = [
    "ContextSizes",
    "attention_worker_scheduler",
    "attention_worker_scheduler_",
    "create_schedule_context_holder",
    "ffn_worker_scheduler",
    "ffn_worker_scheduler_",
    "npu_attention_to_ffn",
    "npu_attention_worker_combine",
    "npu_ffn_to_attention",
    "npu_ffn_worker_batching",
    "recorded_context",
    "set_value_checks",
    "value_checks_enabled",
]
