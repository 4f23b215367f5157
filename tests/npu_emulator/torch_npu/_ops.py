"""The four AFD ops, emulated: the reference kernels over the communicator's windows.

`npu_attention_to_ffn` and `npu_ffn_to_attention` write other ranks' windows: they find
the communicator by its name (`group`) and run the reference kernel over a window group
laid over the windows this process mapped, with the layout their own arguments describe
(as the A3 kernels take every size from their arguments). Ranks whose windows this process
did not map (same-role peers, which the op never writes) get placeholders. Batching and
combine read everything through the schedule context, as on A3.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import torch

import afd_dispatch.kernels.reference  # noqa: F401  (registers torch.ops.afd)
from afd_dispatch.layout import MAX_TOPK, WindowLayout
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows import WindowGroup, get_window_group, window_group_over
from torch_npu._C._distributed_c10d import communicator

_lock = threading.Lock()
# Tests that run the emulator in processes they do not control (a vLLM server, Ray actors)
# name a file here; every op call appends "<op> <pid>" to it.
CALL_LOG = "TORCH_NPU_EMULATOR_CALL_LOG"


def _record(op: str) -> None:
    path = os.environ.get(CALL_LOG)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{op} {os.getpid()}\n")


def _group_over(
    name: str, topology: RankTopology, layout: WindowLayout, ffn_windows: bool = True
) -> str:
    """The name of a reference window group over communicator `name`'s windows
    (`ffn_windows` False: placeholders for the FFN ranks, which F2A never writes)."""
    key = f"{name}|{ffn_windows}|{hash((topology, layout))}"
    with _lock:
        try:
            get_window_group(key)
            return key
        except ValueError:
            pass
        comm = communicator(name)
        windows = []
        for rank in range(topology.world_size):
            mapped = comm.windows.get(rank) if ffn_windows or not topology.is_ffn(rank) else None
            need = layout.ffn_window_bytes if topology.is_ffn(rank) else layout.attn_window_bytes
            windows.append(mapped if mapped is not None else torch.zeros(need, dtype=torch.uint8))
        group: WindowGroup = window_group_over(key, topology, layout, windows, timeout_s=60.0)
        return group.name


def npu_attention_to_ffn(
    x: torch.Tensor,
    session_id: torch.Tensor,
    micro_batch_id: torch.Tensor,
    layer_id: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_rank_table: torch.Tensor,
    group: str,
    world_size: int,
    ffn_token_info_table_shape: Sequence[int],
    ffn_token_data_shape: Sequence[int],
    attn_token_info_table_shape: Sequence[int],
    moe_expert_num: int,
    *,
    scales: torch.Tensor | None = None,
    active_mask: torch.Tensor | None = None,
    quant_mode: int = 0,
    sync_flag: int = 0,
    ffn_start_rank_id: int = 0,
) -> None:
    _record("npu_attention_to_ffn")
    num_attention_ranks = ffn_token_info_table_shape[0]
    shared = expert_rank_table.shape[1] - moe_expert_num
    quant = quant_mode == 2
    elem = 1 if quant else x.element_size()
    layout = WindowLayout(
        num_attention_ranks, attn_token_info_table_shape[0], x.shape[1], expert_ids.shape[2],
        shared, x.shape[2], x.dtype, quant,
        attn_to_ffn_token_size=ffn_token_data_shape[4] * elem,
    )  # fmt: skip
    topology = RankTopology(
        num_attention_ranks, world_size - num_attention_ranks, ffn_start_rank_id
    )
    torch.ops.afd.npu_attention_to_ffn(
        x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table,
        _group_over(group, topology, layout), world_size, ffn_token_info_table_shape,
        ffn_token_data_shape, attn_token_info_table_shape, moe_expert_num, scales=scales,
        active_mask=active_mask, quant_mode=quant_mode, sync_flag=sync_flag,
        ffn_start_rank_id=ffn_start_rank_id,
    )  # fmt: skip


def npu_ffn_to_attention(
    x: torch.Tensor,
    session_ids: torch.Tensor,
    micro_batch_ids: torch.Tensor,
    token_ids: torch.Tensor,
    expert_offsets: torch.Tensor,
    actual_token_num: torch.Tensor,
    group: str,
    world_size: int,
    token_info_table_shape: Sequence[int],
    token_data_shape: Sequence[int],
    *,
    attn_rank_table: torch.Tensor | None = None,
) -> None:
    _record("npu_ffn_to_attention")
    if attn_rank_table is None:
        raise RuntimeError("torch_npu emulator: npu_ffn_to_attention needs attn_rank_table")
    attention = sorted(int(r) for r in attn_rank_table)
    ffn = sorted(set(range(world_size)) - set(attention))
    if not ffn or ffn != list(range(ffn[0], ffn[0] + len(ffn))):
        raise RuntimeError(f"torch_npu emulator: FFN ranks {ffn} are not one contiguous range")
    m, bs, slots = token_info_table_shape
    topk = min(slots, MAX_TOPK)  # the attention window depends on E only, not its split
    layout = WindowLayout(len(attention), m, bs, topk, slots - topk, x.shape[1], x.dtype)
    topology = RankTopology(len(attention), len(ffn), ffn[0])
    torch.ops.afd.npu_ffn_to_attention(
        x, session_ids, micro_batch_ids, token_ids, expert_offsets, actual_token_num,
        _group_over(group, topology, layout, ffn_windows=False), world_size, token_info_table_shape,
        token_data_shape, attn_rank_table=attn_rank_table,
    )  # fmt: skip


def npu_ffn_worker_batching(
    schedule_context: torch.Tensor,
    expert_num: int,
    max_out_shape: Sequence[int],
    *,
    token_dtype: int = 0,
    need_schedule: int = 0,
    layer_num: int = 0,
) -> tuple[torch.Tensor, ...]:
    _record("npu_ffn_worker_batching")
    result: tuple[torch.Tensor, ...] = torch.ops.afd.npu_ffn_worker_batching(
        schedule_context, expert_num, max_out_shape, token_dtype=token_dtype,
        need_schedule=need_schedule, layer_num=layer_num,
    )  # fmt: skip
    return result


def npu_attention_worker_combine(
    schedule_context: torch.Tensor,
    expert_scales: torch.Tensor,
    layer_id: torch.Tensor,
    hidden_size: int,
    *,
    token_dtype: int = 0,
    need_schedule: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    _record("npu_attention_worker_combine")
    y, next_layer = torch.ops.afd.npu_attention_worker_combine(
        schedule_context, expert_scales, layer_id, hidden_size, token_dtype=token_dtype,
        need_schedule=need_schedule,
    )  # fmt: skip
    return y, next_layer
