"""The reference link: the reference ops over window groups registered in this process.

The windows are `WindowGroup`s this process created (`Deployment.create_windows`) or
attached from their specs (shared memory, another process's). Each rank keeps one schedule
context per group; an FFN rank keeps its contexts beside its windows, so a restarted worker
resumes at the slot its predecessor was collecting.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from afd_dispatch.errors import AFDBadMicroBatchError, AFDInputError, check
from afd_dispatch.kernels import reference as ref
from afd_dispatch.kernels.reference import schedule_context as sc
from afd_dispatch.kernels.reference.context_holder import ScheduleContextHolder, context_for
from afd_dispatch.kernels.reference.ffn_worker_batching import (
    consume_micro_batch,
    ffn_area,
    wait_for_micro_batch,
)
from afd_dispatch.kernels.reference.schedule_context import (
    batched_micro_batches,
    last_batched_layer,
)
from afd_dispatch.layout import (
    EMPTY_ID_THRESHOLD,
    FLAG_OFFSET,
    JOURNAL_BATCHED,
    JOURNAL_COLLECTING,
    JOURNAL_EMPTY,
    SLOTS_OFFSET,
    TOKEN_DTYPE_INT8,
    token_dtype_code,
)
from afd_dispatch.link.base import AttentionLink, Batch, FFNLink, dequantize_rows
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.windows import get_window_group, store_fence


def _contexts(
    deployment: Deployment, rank: int, expert_num: int, persistent: bool
) -> dict[str, ScheduleContextHolder]:
    return {
        name: context_for(get_window_group(name), rank, expert_num, persistent)
        for name in deployment.group_names
    }


class ReferenceAttentionLink(AttentionLink):
    """Attention rank `session` of `deployment`. `ops`: the module whose
    `npu_attention_to_ffn` / `npu_attention_worker_combine` run, with the wait before
    combine, `wait_for_next_results` (default: the reference's; benchmarks pass a timed
    wrapper of it)."""

    def __init__(self, deployment: Deployment, session: int, ops: Any = None) -> None:
        self.deployment = deployment
        self.ops = ops if ops is not None else ref
        self.rank = deployment.topology.attention_rank(session)
        self._contexts = _contexts(deployment, self.rank, 1, persistent=False)
        self._ctx = [
            self._contexts[c.group].get_schedule_context_tensor() for c in deployment.channels
        ]
        self._session = torch.tensor([session], dtype=torch.int32)
        self._micro_batch = [
            torch.tensor([c.window_micro_batch], dtype=torch.int32) for c in deployment.channels
        ]
        self._layer = torch.zeros(1, dtype=torch.int32)
        self._layer_id = self._layer.numpy()  # same memory: a store without a torch call
        self._shapes = deployment.layout.op_shapes
        self._token_dtype = token_dtype_code(deployment.layout.dtype)
        self._receipts = [
            get_window_group(c.group).receipts(self.rank).numpy() for c in deployment.channels
        ]

    def send(
        self,
        slot: int,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        active_mask: torch.Tensor,
    ) -> None:
        dep, cfg = self.deployment, self.deployment.config
        self._layer_id[0] = layer
        self.ops.npu_attention_to_ffn(
            x, self._session, self._micro_batch[slot], self._layer, expert_ids, dep.table,
            dep.channels[slot].group, dep.topology.world_size,
            self._shapes["ffn_token_info_table_shape"], self._shapes["ffn_token_data_shape"],
            self._shapes["attn_token_info_table_shape"], dep.spec.num_experts,
            active_mask=active_mask, quant_mode=cfg.quant_mode_code, sync_flag=cfg.sync_flag,
            ffn_start_rank_id=dep.topology.ffn_start_rank_id,
        )  # fmt: skip

    def receive(self, slot: int, layer: int, expert_scales: torch.Tensor) -> torch.Tensor:
        self._layer_id[0] = layer
        # Count the receipt before combine clears the flags: an FFN rank's successor reads
        # flags 0 and this count unchanged as "never delivered" (`ReferenceFFNLink.pending`).
        hidden = self.deployment.layout.hidden
        ctx, token_dtype = self._ctx[slot], self._token_dtype
        m = self.ops.wait_for_next_results(ctx, expert_scales, hidden, token_dtype)
        self._receipts[slot][m] += 1
        store_fence()
        y, _ = self.ops.npu_attention_worker_combine(
            self._ctx[slot], expert_scales, self._layer, self.deployment.layout.hidden,
            token_dtype=self._token_dtype, need_schedule=1,
        )  # fmt: skip
        return y


class ReferenceFFNLink(FFNLink):
    """FFN rank `rank` of `deployment`, hosting `expert_num` local experts."""

    def __init__(self, deployment: Deployment, rank: int, expert_num: int, ops: Any = None) -> None:
        self.deployment = deployment
        self.ops = ops if ops is not None else ref
        self.rank = rank
        self.expert_num = expert_num
        self._contexts = _contexts(deployment, rank, expert_num, persistent=True)
        self._ctx = [
            self._contexts[c.group].get_schedule_context_tensor() for c in deployment.channels
        ]
        layout = deployment.layout
        self._max_out = [layout.num_attention_ranks, layout.tokens, layout.slots, layout.hidden]
        self._token_dtype = TOKEN_DTYPE_INT8 if layout.quant else token_dtype_code(layout.dtype)
        self._attn_ranks = torch.tensor(deployment.topology.attention_ranks, dtype=torch.int32)
        self._shapes = layout.op_shapes
        # What this rank batched and has not given back yet, per slot, in the group's shared
        # memory: a restarted worker redoes it (`pending`) instead of losing it.
        # (one journal per window group: this rank has at most one batch in flight)
        # (header and receipts as numpy: scalar stores without a torch call each)
        self._journals: dict[str, tuple[np.ndarray, torch.Tensor, torch.Tensor, np.ndarray]] = {}
        for name in deployment.group_names:
            views = layout.ffn_journal_views(get_window_group(name).journal_storage(rank))
            header, rows, info, receipts = views
            self._journals[name] = (header.numpy(), rows, info, receipts.numpy())
        # Each session's receipt counts per group (`WindowGroup.receipts`), read-only here
        self._receipts = {
            name: [
                get_window_group(name).receipts(r).numpy()
                for r in deployment.topology.attention_ranks
            ]
            for name in deployment.group_names
        }

    def collect(self, slot: int) -> Batch:
        ctx = self._ctx[slot]
        self._before_batching(slot)
        try:
            y, groups, session_ids, mbs, tokens, offsets, scales, count = (
                self.ops.npu_ffn_worker_batching(
                    ctx, self.expert_num, self._max_out, token_dtype=self._token_dtype,
                    need_schedule=1,
                )
            )  # fmt: skip
        except AFDInputError as exc:  # the window's contents: put them back, for refuse
            self._undo_consumed(self.deployment.channels[slot].group)
            raise AFDBadMicroBatchError(exc.argument, exc.allowed, exc.value) from exc
        n = int(count[0])
        quant = self.deployment.layout.quant
        rows = dequantize_rows(y[:n], scales[:n]) if quant else y[:n]
        handle = (session_ids, mbs, tokens, offsets, count, None)
        batch = Batch(rows, groups, last_batched_layer(ctx), n, handle)
        if n:
            self._journal(slot, batch)
        else:  # an empty batch is never given back: nothing to redo either
            self._journals[self.deployment.channels[slot].group][0][0] = JOURNAL_EMPTY
        return batch

    def give_back(self, slot: int, batch: Batch, out: torch.Tensor) -> None:
        session_ids, mbs, tokens, offsets, count, undelivered = batch.handle
        if undelivered is not None:  # a predecessor's batch: only what never arrived
            out = out[: batch.count].index_select(0, undelivered)
            session_ids, mbs, tokens, offsets = (
                t.index_select(0, undelivered) for t in (session_ids, mbs, tokens, offsets)
            )
            count = torch.tensor([undelivered.numel()], dtype=torch.int64)
        self.ops.npu_ffn_to_attention(
            out, session_ids, mbs, tokens, offsets, count, self.deployment.channels[slot].group,
            self.deployment.topology.world_size, self._shapes["token_info_table_shape"],
            self._shapes["token_data_shape"], attn_rank_table=self._attn_ranks,
        )  # fmt: skip
        self._journals[self.deployment.channels[slot].group][0][0] = JOURNAL_EMPTY

    def refuse(self, slot: int) -> int:
        """See `FFNLink.refuse`. Every slot of the micro-batch that holds an id (valid or
        not) is answered, since the attention side waits for each such slot's flag. The
        micro-batch is consumed and the journal cleared before the answer: a death while
        answering leaves the sessions to their deadline, never a replay."""
        group_name = self.deployment.channels[slot].group
        self._before_batching(slot)
        header, _, info, _ = self._journals[group_name]
        ctx = self._ctx[slot]
        area = ffn_area(ctx, with_info=True)
        m = int(header[5])
        layout = self.deployment.layout
        ids = info[:, SLOTS_OFFSET:].reshape(
            layout.num_attention_ranks, layout.tokens, layout.slots
        )
        session, token, where = (ids < EMPTY_ID_THRESHOLD).nonzero(as_tuple=True)
        consume_micro_batch(ctx, area, m, last_batched_layer(ctx))
        store_fence()
        header[0] = JOURNAL_EMPTY
        n = session.numel()
        if n:
            zeros = torch.zeros(n, layout.hidden, dtype=layout.dtype)
            self.ops.npu_ffn_to_attention(
                zeros, session.int(), torch.full((n,), m, dtype=torch.int32), token.int(),
                where.int(), torch.tensor([n]), group_name, self.deployment.topology.world_size,
                self._shapes["token_info_table_shape"], self._shapes["token_data_shape"],
                attn_rank_table=self._attn_ranks,
            )  # fmt: skip
        return n

    def _before_batching(self, slot: int) -> None:
        """Wait (as batching would) until every session flagged the micro-batch the context
        polls, and copy its info rows into the journal: if this process dies once batching
        has consumed them but before `_journal`, a successor puts them back."""
        ctx = self._ctx[slot]
        area = ffn_area(ctx, with_info=True)
        m = sc.index_field(ctx, sc.FFN_POLLING_INDEX, area.micro_batches)
        wait_for_micro_batch(ctx, area, m)
        assert area.info is not None
        group = self.deployment.channels[slot].group
        header, _, info, receipts = self._journals[group]
        header[0] = JOURNAL_EMPTY
        store_fence()
        info.copy_(area.info[:, m])
        # Every session has sent micro-batch m, so each has counted its last receipt of m
        # and counts the next only once this rank's results are back: stable until then.
        receipts[:] = [r[m] for r in self._receipts[group]]
        header[1:] = (slot, 0, 0, batched_micro_batches(ctx), m)
        store_fence()  # the copy is whole before it counts
        header[0] = JOURNAL_COLLECTING

    def _journal(self, slot: int, batch: Batch) -> None:
        """Record `batch` (where each row came from, its expert) before any expert runs."""
        header, rows, _, _ = self._journals[self.deployment.channels[slot].group]
        n = batch.count
        session_ids, mbs, tokens, offsets, _, _ = batch.handle
        groups = batch.group_list.numpy()
        fields = rows.numpy()  # numpy: five row copies without a torch call each
        for field, values in enumerate((session_ids, mbs, tokens, offsets)):
            fields[field, :n] = values.numpy()[:n]
        fields[4, :n] = np.repeat(groups[:, 0], groups[:, 1])
        header[1:4] = (slot, batch.layer, n)
        store_fence()  # the record is whole before it counts
        header[0] = JOURNAL_BATCHED

    def pending(self) -> tuple[int, Batch] | None:
        """The micro-batch a predecessor journaled and did not finish giving back, rebuilt
        from the journal and the window's rows, or None.

        The predecessor may have died anywhere in `give_back`, so each row is given back
        again only if it never arrived: its result flag is still 0 and its session has not
        counted a receipt of the micro-batch since it was collected. Neither can change
        under us (the session waits for this flag before it counts), and a session that
        counted has combined the results and may be sending new rows into the same window
        cells, so nothing of it is written (its rows are read with the rest and their
        results dropped). The experts still run on the whole batch, so with
        `batch_invariant` every row's result is the one the predecessor computed."""
        channels = self.deployment.channels
        for name in self.deployment.group_names:
            self._undo_consumed(name)
        batched = [name for name, (header, *_) in self._journals.items() if int(header[0])]
        check(
            len(batched) <= 1,
            f"journals of FFN rank {self.rank}",
            "at most one micro-batch batched and not given back (one is served at a time)",
            batched,
        )
        for name in batched:
            header, rows, _, _ = self._journals[name]
            check(int(header[0]) == JOURNAL_BATCHED, "journal state", "0 or 1", int(header[0]))
            slot, layer, n = (int(v) for v in header[1:4])
            mine = [i for i, c in enumerate(channels) if c.group == name]
            check(slot in mine, f"journal slot of group {name!r}", f"one of {mine}", slot)
            layout = self.deployment.layout
            check(0 <= n <= rows.shape[1], "journal count", f"[0, {rows.shape[1]}]", n)
            session, mb, token, where, expert = (rows[f, :n].long() for f in range(5))
            undelivered = self._undelivered(name, session, mb, token, where)
            if undelivered.numel() == 0:
                header[0] = JOURNAL_EMPTY  # all of it arrived: nothing to redo
                return None
            group = get_window_group(name)
            _, data = group.ffn_views(self.rank)
            picked = data[session, mb, token, where]  # (n, HS)
            if layout.quant:
                scales = picked[:, layout.hidden : layout.hidden + 4].contiguous()
                batch_rows = dequantize_rows(
                    picked[:, : layout.hidden], scales.view(torch.float32).view(-1)
                )
            else:
                batch_rows = picked[:, : layout.hidden].clone()
            experts, counts = torch.unique_consecutive(expert, return_counts=True)
            group_list = torch.zeros(self.expert_num, 2, dtype=torch.int64)
            group_list[: experts.numel(), 0] = experts
            group_list[: experts.numel(), 1] = counts
            capacity = rows.shape[1]
            handle = [torch.zeros(capacity, dtype=torch.int32) for _ in range(4)]
            for out, values in zip(handle, (session, mb, token, where), strict=True):
                out[:n] = values
            count = torch.tensor([n], dtype=torch.int64)
            redo = None if undelivered.numel() == n else undelivered
            return slot, Batch(batch_rows, group_list, layer, n, (*handle, count, redo))
        return None

    def _undelivered(
        self,
        name: str,
        session: torch.Tensor,
        mb: torch.Tensor,
        token: torch.Tensor,
        where: torch.Tensor,
    ) -> torch.Tensor:
        """Indices (int64) of the journaled rows of group `name` whose results never
        reached their session (see `pending`)."""
        group = get_window_group(name)
        _, _, _, at_collect = self._journals[name]
        micro_batch = int(self._journals[name][0][5])
        ranks = self.deployment.topology.attention_ranks
        arrived = torch.ones(session.numel(), dtype=torch.bool)
        for s in torch.unique(session).tolist():
            check(
                0 <= s < len(ranks), f"journal session of group {name!r}", f"[0, {len(ranks)})", s
            )
            rows = (session == s).nonzero().flatten()
            # Flags first, then the count: the session counts before combine clears the
            # flags, so a flag read as 0 with the count unchanged after it was never set
            # (read the other way round, a combine in between looks undelivered).
            flags, _ = group.attn_views(ranks[s])
            seen = flags[mb[rows], token[rows], where[rows]] == 1
            store_fence()
            if self._receipts[name][s][micro_batch] != int(at_collect[s]):
                continue  # combined: these cells may hold its next micro-batch by now
            arrived[rows] = seen
        return (~arrived).nonzero().flatten()

    def _undo_consumed(self, name: str) -> None:
        """A predecessor died while collecting from group `name`: put the micro-batch's info
        rows back and rewind the context to where `_before_batching` found it, so that it is
        collected again; then clear the journal.

        Batching consumes in steps (empty the slot ids, clear the flags, advance the polling
        index, count), and death may fall between any two, so the whole state before
        batching is restored, not a guess at which steps ran. For a session with rows here
        that is safe: it rewrites the micro-batch only once its results are back. A session
        with no rows here waits for nothing from this rank, so once its flag was cleared it
        may be writing its next message into the same row: its row is put back only while
        it still reads as consumed (flag 0, no ids). (One writing at that very moment can
        still meet the restored flag; batching then finds the layers disagree and the
        micro-batch is refused, not served wrong.)"""
        header, _, info, _ = self._journals[name]
        if int(header[0]) != JOURNAL_COLLECTING:
            return
        slot, before, m = int(header[1]), int(header[4]), int(header[5])
        ctx = self._ctx[slot]
        window_info, _ = get_window_group(name).ffn_views(self.rank)
        ids = info[:, SLOTS_OFFSET:]
        for s in range(info.shape[0]):
            now = window_info[s, m]
            waits_for_us = bool((ids[s] < EMPTY_ID_THRESHOLD).any())
            consumed = int(now[FLAG_OFFSET]) == 0 and bool(
                (now[SLOTS_OFFSET:] >= EMPTY_ID_THRESHOLD).all()
            )
            if waits_for_us or consumed:
                now.copy_(info[s])
        sc.put(ctx, sc.FFN_POLLING_INDEX, m)
        sc.put(ctx, sc.REF_BATCHED_COUNT, before)
        store_fence()
        header[0] = JOURNAL_EMPTY

    def resume_slot(self) -> int:
        """Slots are collected cyclically, so the micro-batches batched so far on this rank's
        persistent contexts, summed over the window groups, give the next slot. With one
        shared group that is its polling index; with a group per micro-batch each group's
        polling index is always 0, and only the count tells which group is next."""
        served = sum(
            batched_micro_batches(h.get_schedule_context_tensor()) for h in self._contexts.values()
        )
        return served % len(self.deployment.channels)

    def stop(self) -> None:
        for holder in self._contexts.values():
            holder.stop_schedule()
        for name in self.deployment.group_names:  # a waiting batching sees it at once
            get_window_group(name).ring(self.rank)
