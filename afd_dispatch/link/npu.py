"""The NPU link: HCCL windows and the torch_npu ops, as Atlas A3 runs them.

Per micro-batch slot, one communicator over all A + F ranks (FFN ranks first from
`ffn_start_rank_id`), because A3's `npu_ffn_to_attention` writes one micro-batch per
attention window (M = 1). Setting one up, on every rank, in this order:

1. `Rendezvous`: a TCP store (`torch.distributed.TCPStore`) whose keys are prefixed per
   slot (`PrefixStore("afd_window.mb<i>")`); every rank announces itself and its
   `ProtocolParams`, and waits for all others until `startup_timeout_s`, naming the
   missing ranks, or refusing a rank that planned another deployment.
2. `torch_npu._C._distributed_c10d.ProcessGroupHCCL(store, rank, world_size, options)`
   (vllm-ascend's stateless HCCL group, `netloader_pg.py`); its name,
   `get_hccl_comm_name(rank)`, is the ops' `group` argument (afd-plugin's window connector).
3. `_window_register_and_exchange(window_bytes, peer_ranks)` with the other role's ranks,
   then `_get_window_mem()`: this rank's window, sized by `WindowLayout` (torch_npu
   `csrc/distributed/Init.cpp`).
4. `torch_npu._afd.create_schedule_context_holder(...)` over that window (schedule_mode 0
   on FFN ranks, 1 on attention ranks) through the checked binding
   `afd_dispatch.kernels.npu`; slot strides as A3 callers size them
   (`layout.a3_attn_to_ffn_token_size`, align512(2H)). Then a second barrier: every holder
   has initialised its window before any rank sends.

Fixed capacity (public A3 reproductions: combine returns stale rows and leaves flags set
when the token count changes between calls on one context): every send carries all BS
rows with a full active mask; padding rows repeat valid rows (never all-zero rows, which
dynamic int8 quantization cannot scale) and get zero combine weights.

Layer ids: after batching, an FFN rank reads the layer word of the info row of a session
that has rows in the batch (4 bytes; on A3 one device-to-host read per batch). That word
cannot change before this rank's results went back: the session sends this slot again only
after it received these rows' results. (Another session's may: one whose tokens all went to
other FFN ranks can be on the next layer already.)

Restarts: a restarted FFN process would have to rejoin every communicator, which needs all
ranks; this link starts at slot 0 and does not resume.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from afd_dispatch.errors import AFDHandshakeError, AFDTimeoutError, check
from afd_dispatch.kernels import npu as npu_ops
from afd_dispatch.kernels.npu._loader import torch_npu
from afd_dispatch.layout import (
    DEFAULT_HCCL_BUFFSIZE_MB,
    LAYER_OFFSET,
    TOKEN_DTYPE_INT8,
    align512,
    token_dtype_code,
)
from afd_dispatch.link.base import AttentionLink, Batch, FFNLink, dequantize_rows
from afd_dispatch.runtime.deployment import Deployment, ProtocolParams

STORE_PREFIX = "afd_window"


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of a deployment meet: a TCP store served at host:port."""

    host: str
    port: int


def serve_rendezvous(host: str = "127.0.0.1", port: int = 0) -> tuple[Rendezvous, Any]:
    """Start the TCP store every rank connects to (keep the returned store alive)."""
    store = torch.distributed.TCPStore(host, port, is_master=True, wait_for_workers=False)
    return Rendezvous(host, store.port), store


@dataclass
class _Slot:
    """One slot's communicator on this rank."""

    group: str  # the HCCL communicator name
    window: torch.Tensor
    holder: Any
    process_group: Any  # kept alive: torch_npu deregisters the window when it is freed

    @property
    def ctx(self) -> torch.Tensor:
        context: torch.Tensor = self.holder.get_schedule_context_tensor()
        return context


def _wait_for_all(store: Any, key: str, world: int, timeout_s: float, what: str) -> None:
    """Every rank set `key/<rank>` within `timeout_s`, or an error naming who did not."""
    keys = [f"{key}/{r}" for r in range(world)]
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while not store.check(keys):
        if time.monotonic() >= deadline:
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            raise AFDTimeoutError(
                f"{what}: ranks {missing} did not arrive within {timeout_s:g} s "
                "(not started, crashed in start-up, or given another rendezvous address)"
            )
        time.sleep(pause)  # a start-up wait: back off, never spin
        pause = min(pause * 2, 0.1)


def _check_buffsize(deployment: Deployment) -> None:
    """The windows must fit HCCL_BUFFSIZE (MB, the A3 host check), before anything is set up."""
    raw = os.environ.get("HCCL_BUFFSIZE", str(DEFAULT_HCCL_BUFFSIZE_MB))
    check(raw.isdigit(), "HCCL_BUFFSIZE", "a whole number of MB", raw)
    deployment.layout.check_hccl_buffsize(int(raw))


def _open_slots(
    deployment: Deployment, rank: int, rendezvous: Rendezvous, expert_num: int
) -> list[_Slot]:
    cfg, layout, topology = deployment.config, deployment.layout, deployment.topology
    check(
        cfg.window_groups == "per_micro_batch",
        "window_groups",
        '"per_micro_batch" with the NPU link (A3\'s npu_ffn_to_attention takes M = 1)',
        cfg.window_groups,
    )
    _check_buffsize(deployment)
    timeout = datetime.timedelta(seconds=cfg.startup_timeout_s)
    world = topology.world_size
    ffn = topology.is_ffn(rank)
    peers = list(topology.attention_ranks if ffn else topology.ffn_ranks)
    try:
        client = torch.distributed.TCPStore(
            rendezvous.host, rendezvous.port, is_master=False, timeout=timeout
        )
    except RuntimeError as exc:  # torch's DistNetworkError: nobody serves the rendezvous
        raise AFDTimeoutError(
            f"rank {rank} found no rendezvous at {rendezvous.host}:{rendezvous.port} within "
            f"{cfg.startup_timeout_s:g} s (the attention side serves it: not started yet, or "
            f"another address): {exc}"
        ) from None
    mine = deployment.params()
    hccl = torch_npu()._C._distributed_c10d
    slots = []
    for i, channel in enumerate(deployment.channels):
        store = torch.distributed.PrefixStore(f"{STORE_PREFIX}.mb{i}", client)
        who = f"rank {rank} at the rendezvous of slot {i} ({rendezvous.host}:{rendezvous.port})"
        store.set(f"joined/{rank}", json.dumps(mine.to_dict()))
        _wait_for_all(store, "joined", world, cfg.startup_timeout_s, who)
        for r in range(world):
            theirs = ProtocolParams.from_dict(json.loads(store.get(f"joined/{r}")))
            try:
                mine.check_matches(theirs, f"rank {rank}", f"rank {r}")
            except AFDHandshakeError as exc:
                raise AFDHandshakeError(f"slot {i} ({channel.group}): {exc}") from None
        options = hccl.ProcessGroupHCCL.Options()
        options._timeout = datetime.timedelta(seconds=cfg.wait_timeout_s)
        backend = hccl.ProcessGroupHCCL(store, rank, world, options)
        group = backend.get_hccl_comm_name(rank)
        need = layout.ffn_window_bytes if ffn else layout.attn_window_bytes
        backend._window_register_and_exchange(need, peers)
        window = backend._get_window_mem()
        got = check_window(window, need)
        holder = npu_ops.create_schedule_context_holder(
            0 if ffn else 1, layout.num_attention_ranks, layout.micro_batches, layout.tokens,
            layout.slots, expert_num, layout.attn_to_ffn_token_size,
            align512(layout.ffn_to_attn_token_size),
            ffn_window=window.data_ptr() if ffn else 0, ffn_window_size=got if ffn else 0,
            attention_window=0 if ffn else window.data_ptr(),
            attention_window_size=0 if ffn else got,
        )  # fmt: skip
        store.set(f"ready/{rank}", "1")
        _wait_for_all(store, "ready", world, cfg.startup_timeout_s, who)
        slots.append(_Slot(group, window, holder, backend))
    return slots


def check_window(window: torch.Tensor, need: int) -> int:
    """The registered window must hold the layout's `need` bytes; return its byte size."""
    got = window.numel() * window.element_size()
    check(got >= need, "HCCL window bytes", f">= {need} (the layout's window)", got)
    return got


class NPUAttentionLink(AttentionLink):
    """Attention rank `session`: `npu_attention_to_ffn` out, `npu_attention_worker_combine` in."""

    def __init__(self, deployment: Deployment, session: int, rendezvous: Rendezvous) -> None:
        self.deployment = deployment
        self.rank = deployment.topology.attention_rank(session)
        self._slots = _open_slots(deployment, self.rank, rendezvous, 1)
        # torch_npu's ops take device tensors: everything the link passes lives where the
        # windows do (the host, on the emulator)
        self.device = device = self._slots[0].window.device
        self._session = torch.tensor([session], dtype=torch.int32, device=device)
        self._micro_batch = torch.zeros(1, dtype=torch.int32, device=device)  # M = 1 each
        self._layer = torch.zeros(1, dtype=torch.int32, device=device)
        self._full = torch.ones(1, deployment.layout.tokens, dtype=torch.bool, device=device)
        self._table = deployment.table.to(device)
        self._shapes = deployment.layout.op_shapes
        self._token_dtype = token_dtype_code(deployment.layout.dtype)

    def send(
        self,
        slot: int,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        active_mask: torch.Tensor,
    ) -> None:
        # Pads x and expert_ids in place: they are the endpoint's staging buffers.
        dep, cfg = self.deployment, self.deployment.config
        n = int(active_mask.sum())
        _pad_to_capacity(x, expert_ids, n, dep.spec.num_experts)
        self._layer[0] = layer
        npu_ops.npu_attention_to_ffn(
            x, self._session, self._micro_batch, self._layer, expert_ids, self._table,
            self._slots[slot].group, dep.topology.world_size,
            self._shapes["ffn_token_info_table_shape"], self._shapes["ffn_token_data_shape"],
            self._shapes["attn_token_info_table_shape"], dep.spec.num_experts,
            active_mask=self._full, quant_mode=cfg.quant_mode_code, sync_flag=cfg.sync_flag,
            ffn_start_rank_id=dep.topology.ffn_start_rank_id,
        )  # fmt: skip

    def receive(self, slot: int, layer: int, expert_scales: torch.Tensor) -> torch.Tensor:
        # Padding rows carry zero weights (the endpoint zeroes scales past its n tokens).
        self._layer[0] = layer
        y, _ = npu_ops.npu_attention_worker_combine(
            self._slots[slot].ctx, expert_scales, self._layer, self.deployment.layout.hidden,
            token_dtype=self._token_dtype, need_schedule=1,
        )  # fmt: skip
        return y

    def close(self) -> None:
        for s in self._slots:
            s.holder.stop_schedule()
        self._slots = []  # frees the process groups, which deregister the windows


def _pad_to_capacity(x: torch.Tensor, ids: torch.Tensor, n: int, num_experts: int) -> None:
    """Fill rows n.. of x (1, BS, H) and ids (1, BS, K) in place: valid rows repeated, or,
    with no valid row, ones routed to experts 0..K-1 (any real expert; weights are 0)."""
    bs, k = ids.shape[1], ids.shape[2]
    if n == bs:
        return
    if n == 0:
        x[0].fill_(1)
        ids[0] = torch.arange(k, dtype=ids.dtype) % num_experts
        return
    source = torch.arange(bs - n) % n
    x[0, n:] = x[0, source]
    ids[0, n:] = ids[0, source]


class NPUFFNLink(FFNLink):
    """FFN rank `rank`: `npu_ffn_worker_batching` in, `npu_ffn_to_attention` out."""

    def __init__(
        self, deployment: Deployment, rank: int, expert_num: int, rendezvous: Rendezvous
    ) -> None:
        self.deployment = deployment
        self.rank = rank
        self.expert_num = expert_num
        self._slots = _open_slots(deployment, rank, rendezvous, expert_num)
        self.device = self._slots[0].window.device
        layout = deployment.layout
        self._max_out = [layout.num_attention_ranks, layout.tokens, layout.slots, layout.hidden]
        self._token_dtype = TOKEN_DTYPE_INT8 if layout.quant else token_dtype_code(layout.dtype)
        self._attn_ranks = torch.tensor(
            deployment.topology.attention_ranks, dtype=torch.int32, device=self.device
        )
        self._shapes = layout.op_shapes
        self._info_width = layout.ffn_info_shape[2]  # int32 words of one session's info row

    def collect(self, slot: int) -> Batch:
        s = self._slots[slot]
        y, groups, session_ids, mbs, tokens, offsets, scales, count = (
            npu_ops.npu_ffn_worker_batching(
                s.ctx, self.expert_num, self._max_out, token_dtype=self._token_dtype,
                need_schedule=1,
            )
        )  # fmt: skip
        n = int(count[0])
        # The layer word of a session with rows in this batch: it cannot send this slot
        # again before these rows' results went back, so its header still holds this
        # batch's layer (another session, whose tokens all went elsewhere, may be on the
        # next layer already). No rows: no experts run, the layer does not matter.
        layer = self.batch_layer(slot, session_ids, n)
        rows = dequantize_rows(y[:n], scales[:n]) if self.deployment.layout.quant else y[:n]
        return Batch(rows, groups, layer, n, (session_ids, mbs, tokens, offsets, count))

    def batch_layer(self, slot: int, session_ids: torch.Tensor, count: int) -> int:
        """The layer of a batch of `count` rows whose sessions are `sessions` (-1 if empty)."""
        if count == 0:
            return -1
        word = int(session_ids[0]) * self._info_width + LAYER_OFFSET
        return int(self._slots[slot].window[4 * word : 4 * word + 4].view(torch.int32)[0])

    def give_back(self, slot: int, batch: Batch, out: torch.Tensor) -> None:
        session_ids, mbs, tokens, offsets, count = batch.handle
        npu_ops.npu_ffn_to_attention(
            out, session_ids, mbs, tokens, offsets, count, self._slots[slot].group,
            self.deployment.topology.world_size, self._shapes["token_info_table_shape"],
            self._shapes["token_data_shape"], attn_rank_table=self._attn_ranks,
        )  # fmt: skip

    def resume_slot(self) -> int:
        return 0

    def stop(self) -> None:
        for s in self._slots:
            s.holder.stop_schedule()

    def close(self) -> None:
        self.stop()
        self._slots = []  # frees the process groups, which deregister the windows
