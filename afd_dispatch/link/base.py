"""The two ends of the AFD link, as small classes with their contracts.

AFD is a dispatch/combine pair whose experts live elsewhere (cf. vLLM's
`fused_moe/modular_kernel.py` prepare/finalize, afd-plugin's `connectors/base.py`):

    attention rank                                    FFN rank
    AttentionLink.send(slot)   ==== A2F window ====>  FFNLink.collect(slot) -> Batch
                                                      experts(Batch.rows, Batch.group_list)
    AttentionLink.receive(slot) <=== F2A window ====  FFNLink.give_back(slot, Batch, out)

The runtime (endpoint, FFN worker, pipeline, Ray actors, vLLM plugin) talks to these
classes only. Which op backend runs underneath, where the windows come from, how a batch's
layer id is found and how int8 rows are dequantized are each implementation's business.

Slots are micro-batch slots 0..M-1 of the deployment, used cyclically in the same order on
every rank: the attention side sends and receives them in that order, the FFN side collects
them in that order (an FFN rank batches each slot over all A attention ranks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


class AttentionLink(ABC):
    """One attention rank's end: send a slot's routed tokens, receive its combined result.

    `device`: where the tensors handed to `send` / `receive` must live (the windows').
    """

    device: torch.device = torch.device("cpu")

    @abstractmethod
    def send(
        self,
        slot: int,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        active_mask: torch.Tensor,
    ) -> None:
        """Send slot `slot` of MoE layer `layer` to the FFN ranks.

        x (1, BS, H) in the deployment's dtype; expert_ids (1, BS, K) int32 global routed
        expert ids; active_mask (1, BS) bool, a prefix of True for the real tokens. Returns
        once the rows are in the FFN windows. Raises `AFDInputError` before writing on bad
        input, `AFDTimeoutError` when a destination did not consume its previous message
        within the deployment's `wait_timeout_s`.
        """

    @abstractmethod
    def receive(self, slot: int, layer: int, expert_scales: torch.Tensor) -> torch.Tensor:
        """Wait for slot `slot`'s results and return (BS, H): per token the sum over its K
        routed results weighted by expert_scales (BS, K) float32, plus its shared results.
        Rows of inactive tokens are unspecified. Raises `AFDTimeoutError` naming the
        missing slots after `wait_timeout_s`."""

    def close(self) -> None:  # noqa: B027  (optional: most links hold nothing to release)
        """Release what the link holds (contexts, communicators); idempotent."""


@dataclass
class Batch:
    """One slot as an FFN rank collected it: rows grouped by local expert.

    rows (n, H) in the deployment's activation dtype, or float32 for int8 rows (already
    dequantized: q * scale);
    group_list (expert_num, 2) int64 (local expert id, row count) pairs in ascending id
    order, then zeros; layer: the MoE layer the rows belong to (-1 allowed when count is 0);
    count: n. `handle` is the
    implementation's own record of where each row goes back (session, micro-batch, token,
    slot); callers pass it back untouched.
    """

    rows: torch.Tensor
    group_list: torch.Tensor
    layer: int
    count: int
    handle: Any


class FFNLink(ABC):
    """One FFN rank's end: collect the next slot from all sessions, give its results back.

    `device`: where `collect`'s rows live and `give_back`'s outputs must (the windows').
    """

    device: torch.device = torch.device("cpu")

    @abstractmethod
    def collect(self, slot: int) -> Batch:
        """Wait until every session sent slot `slot` and return its rows. Raises
        `AFDTimeoutError` naming the missing attention ranks after `wait_timeout_s`, and
        `ScheduleStopped` once `stop()` was called. A link that can `refuse` raises
        `AFDBadMicroBatchError` for a complete micro-batch whose contents are invalid
        (layer ids that disagree, a local expert id out of range), with the window as it
        was before the call, for `refuse`."""

    def refuse(self, slot: int) -> int:
        """Answer the micro-batch at `slot` that `collect` refused (raised
        `AFDBadMicroBatchError`): every row any session sent gets a zero result, and the
        micro-batch is consumed as `collect` would, so that no session waits for it and
        the next slot follows. Returns the rows answered.
        Links that never raise `AFDBadMicroBatchError` need not implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot refuse a micro-batch")

    @abstractmethod
    def give_back(self, slot: int, batch: Batch, out: torch.Tensor) -> None:
        """Send `out` (>= batch.count, H) rows, row i the expert output of batch row i, to
        the attention ranks the rows came from."""

    @abstractmethod
    def resume_slot(self) -> int:
        """The slot to collect first: 0 on fresh windows, else the one a predecessor on
        this rank (a restarted worker) would have collected next."""

    def pending(self) -> tuple[int, Batch] | None:
        """(slot, batch) a predecessor on this rank collected and did not give back (it
        died in between): the worker serves it before anything else. None by default: a
        link without a journal loses such a micro-batch."""
        return None

    @abstractmethod
    def stop(self) -> None:
        """Make a `collect` waiting now or later raise `ScheduleStopped`; thread-safe."""

    def close(self) -> None:  # noqa: B027  (optional: most links hold nothing to release)
        """Release what the link holds; idempotent."""


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 rows of int8 `q` (n, H) times their float32 `scale` (n,): A2F's int8 rows
    dequantized (the scale is 1 / (127 / max|x|), stored at byte H of each slot)."""
    return q.to(torch.float32) * scale.unsqueeze(-1)
