"""`torch_npu._afd`, emulated: the schedule-context holder and the four scheduler ops.

The holder does what torch_npu's does (Ascend/pytorch `csrc/afd/ScheduleContext.cpp`, as
the hardware team's `test/_afd` tests exercise it): check the sizes (token sizes multiples
of 512, every count non-zero, the window of the chosen mode given and larger than its
512-aligned info table), fill the 1024-byte context (window regions, a workspace for the
FFN scheduler's outputs, polling index 0 / micro-batch id M - 1) and initialise the
window's info table (FFN: flags 0, ids INT32_MAX; attention: zeros).
"""

from __future__ import annotations

import weakref

import torch

import afd_dispatch.kernels.reference  # noqa: F401  (registers torch.ops.afd)
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.layout import EMPTY_LOCAL_ID, align512
from afd_dispatch.windows import register_memory, resolve, unregister_memory

_ALIGN = 512


class ScheduleContextHolder:
    def __init__(self, args: dict[str, int]) -> None:
        self._args = args
        self._ctx = torch.zeros(sc.CONTEXT_BYTES, dtype=torch.int8)
        self._workspace: weakref.finalize | None = None

    def init(self) -> None:
        a = self._args
        mode = a["schedule_mode"]
        counts = ("session_num", "micro_batch_num", "micro_batch_size", "selected_expert_num")
        for key in (*counts, "expert_num"):
            if a[key] <= 0:
                raise RuntimeError(f"create_schedule_context_holder: {key} must be non-zero")
        for key in ("attn_to_ffn_token_size", "ffn_to_attn_token_size"):
            if a[key] % _ALIGN:
                raise RuntimeError(f"create_schedule_context_holder: {key} % 512 != 0")
        if mode not in (0, 1):
            raise RuntimeError(f"create_schedule_context_holder: schedule_mode {mode}")
        ffn = mode == 0
        window = a["ffn_window"] if ffn else a["attention_window"]
        size = a["ffn_window_size"] if ffn else a["attention_window_size"]
        num_attention_ranks, m, bs, k = (a[key] for key in counts)
        info_bytes = (m * (8 + 4 * bs * k) * num_attention_ranks) if ffn else 4 * m * bs * k
        if window == 0 or size <= align512(info_bytes):
            raise RuntimeError("create_schedule_context_holder: window missing or too small")
        ctx = self._ctx
        for field, key in (
            (sc.SESSION_NUM, "session_num"),
            (sc.MICRO_BATCH_NUM, "micro_batch_num"),
            (sc.MICRO_BATCH_SIZE, "micro_batch_size"),
            (sc.SELECTED_EXPERT_NUM, "selected_expert_num"),
            (sc.EXPERT_NUM, "expert_num"),
            (sc.ATTN_TO_FFN_TOKEN_SIZE, "attn_to_ffn_token_size"),
            (sc.FFN_TO_ATTN_TOKEN_SIZE, "ffn_to_attn_token_size"),
        ):
            sc.put(ctx, field, a[key])
        sc.put(ctx, sc.SCHEDULE_MODE, mode)
        sc.put(ctx, sc.RUN_FLAG, 1)
        _, memory = resolve(window, size, "ffn_window" if ffn else "attention_window")
        info = memory[:info_bytes].view(torch.int32)
        data_at, data_size = align512(info_bytes), size - align512(info_bytes)
        if ffn:
            sc.put(ctx, sc.FFN_INFO_BUF, window)
            sc.put(ctx, sc.FFN_INFO_BUF_SIZE, info_bytes)
            sc.put(ctx, sc.FFN_DATA_BUF, window + data_at)
            sc.put(ctx, sc.FFN_DATA_BUF_SIZE, data_size)
            sc.put(ctx, sc.FFN_POLLING_INDEX, 0)
            rows = info.view(num_attention_ranks * m, 2 + bs * k)
            rows.fill_(EMPTY_LOCAL_ID)
            rows[:, :2] = 0
            self._allocate_workspace(
                (4 * num_attention_ranks,) * 3 + (4 * num_attention_ranks * bs * k,)
            )
            sc.put(ctx, sc.FFN_OUT_NUM, 0)
        else:
            sc.put(ctx, sc.ATTN_INFO_BUF, window)
            sc.put(ctx, sc.ATTN_INFO_BUF_SIZE, info_bytes)
            sc.put(ctx, sc.ATTN_DATA_BUF, window + data_at)
            sc.put(ctx, sc.ATTN_DATA_BUF_SIZE, data_size)
            sc.put(ctx, sc.ATTN_MICRO_BATCH_ID, m - 1)
            info.zero_()

    def _allocate_workspace(self, sizes: tuple[int, ...]) -> None:
        total = sum(align512(s) for s in sizes)
        workspace = torch.zeros(total, dtype=torch.uint8)
        base = register_memory(workspace)
        self._workspace = weakref.finalize(self, unregister_memory, base)
        at = base
        for (field, size_field), size in zip(sc.FFN_SCHEDULER_BUFFERS, sizes, strict=True):
            sc.put(self._ctx, field, at)
            sc.put(self._ctx, size_field, size)
            at += align512(size)

    def get_schedule_context_tensor(self) -> torch.Tensor:
        return self._ctx

    def stop_schedule(self) -> None:
        sc.put(self._ctx, sc.RUN_FLAG, 0)

    def get_schedule_context_info(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._args.items())


def create_schedule_context_holder(
    schedule_mode: int,
    session_num: int,
    micro_batch_num: int,
    micro_batch_size: int,
    selected_expert_num: int,
    expert_num: int,
    attn_to_ffn_token_size: int,
    ffn_to_attn_token_size: int,
    ffn_window: int = 0,
    ffn_window_size: int = 0,
    attention_window: int = 0,
    attention_window_size: int = 0,
) -> ScheduleContextHolder:
    holder = ScheduleContextHolder(
        {
            "schedule_mode": schedule_mode,
            "session_num": session_num,
            "micro_batch_num": micro_batch_num,
            "micro_batch_size": micro_batch_size,
            "selected_expert_num": selected_expert_num,
            "expert_num": expert_num,
            "attn_to_ffn_token_size": attn_to_ffn_token_size,
            "ffn_to_attn_token_size": ffn_to_attn_token_size,
            "ffn_window": ffn_window,
            "ffn_window_size": ffn_window_size,
            "attention_window": attention_window,
            "attention_window_size": attention_window_size,
        }
    )
    holder.init()
    return holder


# The scheduler ops (torch_npu/utils/_afd_ops.py binds torch.ops.npu.* here): the reference
# kernels read everything through the context, as the A3 kernels do.
ffn_worker_scheduler_ = torch.ops.afd.ffn_worker_scheduler_
ffn_worker_scheduler = torch.ops.afd.ffn_worker_scheduler
attention_worker_scheduler_ = torch.ops.afd.attention_worker_scheduler_
attention_worker_scheduler = torch.ops.afd.attention_worker_scheduler


def __getattr__(name: str) -> object:
    raise AttributeError(f"torch_npu emulator: torch_npu._afd.{name} is not emulated")
