"""Window groups: the reference backend's stand-in for an HCCL communicator's windows.

A group is named by the `group` string the ops take. Each rank has one window, sized by
its role from the group's `WindowLayout`. A process registers the groups it may write to;
the ops look them up by name (`attention_to_ffn`, `ffn_to_attention`) or by window
address (the schedule context's `ffn_window` / `attention_window`).

A window address is the address of the window's first byte in this process, registered in
`afd_dispatch.windows.memory` as the reference's equivalent of a device address.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from afd_dispatch.errors import AFDInputError, check
from afd_dispatch.layout import (
    EMPTY_ID_THRESHOLD,
    FLAG_OFFSET,
    LAYER_OFFSET,
    SLOTS_OFFSET,
    WindowLayout,
    align512,
)
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows.doorbell import Doorbell
from afd_dispatch.windows.memory import Region, register_memory, resolve, unregister_memory
from afd_dispatch.windows.transport import (
    WINDOW_TRANSPORTS,
    InProcessTransport,
    SharedMemoryTransport,
    Transport,
)

CONTEXT_STORAGE_BYTES = 1024
DOORBELL_BYTES = 64  # one int32 word, on a cache line of its own


@dataclass(frozen=True)
class WindowGroupSpec:
    """Everything another process needs to attach to a group (picklable).

    `token` names the shared-memory files; treat it as a secret of the deployment.
    """

    name: str
    topology: RankTopology
    layout: WindowLayout
    transport: str
    timeout_s: float
    token: str | None = None


class WindowGroup:
    """The windows of every rank of one communicator, as this process sees them."""

    def __init__(self, spec: WindowGroupSpec, transport: Transport) -> None:
        self.spec = spec
        self._transport = transport
        self._addresses: dict[int, int] = {}
        self._doorbells: dict[int, Doorbell | None] = {}
        # Typed views per rank, built once: the ops ask for them on every call.
        self._views: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # What an op derives from this group's windows alone (row addresses, say), kept
        # for its next call; cleared with the views on close.
        self.memo: dict[object, Any] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def topology(self) -> RankTopology:
        return self.spec.topology

    @property
    def layout(self) -> WindowLayout:
        return self.spec.layout

    @property
    def timeout_s(self) -> float:
        return self.spec.timeout_s

    def window(self, rank: int) -> torch.Tensor:
        self.topology.role_of(rank)
        return self._transport.window(rank)[: _window_bytes(self.spec, rank)]

    def context_storage(self, rank: int) -> torch.Tensor:
        """1024 bytes beside `rank`'s window where its schedule context may live.

        A context kept here outlives the process that made it (with shared memory), so a
        restarted FFN worker resumes at the micro-batch its predecessor was polling.
        """
        self.topology.role_of(rank)
        start = align512(_window_bytes(self.spec, rank))
        return self._transport.window(rank)[start : start + CONTEXT_STORAGE_BYTES].view(torch.int8)

    def journal_storage(self, rank: int) -> torch.Tensor:
        """FFN `rank`'s journal, after its context storage (`WindowLayout.ffn_journal_views`):
        what it batched and has not given back, for a restarted worker to redo."""
        check(self.topology.is_ffn(rank), "rank", f"an FFN rank of group {self.name!r}", rank)
        start = align512(_window_bytes(self.spec, rank)) + CONTEXT_STORAGE_BYTES
        return self._transport.window(rank)[start : start + self.layout.ffn_journal_bytes]

    def receipts(self, rank: int) -> torch.Tensor:
        """Attention `rank`'s receipt counts, int32 [M] (`WindowLayout.attn_receipts_bytes`),
        after its context storage: written by that rank, read by FFN ranks' successors."""
        check(
            not self.topology.is_ffn(rank),
            "rank",
            f"an attention rank of group {self.name!r}",
            rank,
        )
        start = align512(_window_bytes(self.spec, rank)) + CONTEXT_STORAGE_BYTES
        end = start + self.layout.attn_receipts_bytes
        return self._transport.window(rank)[start:end].view(torch.int32)

    def doorbell(self, rank: int) -> Doorbell | None:
        """The doorbell of `rank`'s window (`afd_dispatch.windows.doorbell`), after its
        context storage and journal; None for windows given by someone else, which have
        no room for one. Writers ring it wherever futex exists; whether waiters sleep on it
        is `Doorbell.sleeps` (so `AFD_NO_DOORBELL=1` in one process of a deployment only
        makes that process's waiters poll)."""
        if rank not in self._doorbells:
            self.topology.role_of(rank)
            bell = None
            if self._transport.kind != "given":
                start = _allocation_sizes(self.topology, self.layout)[rank] - DOORBELL_BYTES
                word = self._transport.window(rank)[start : start + 4].view(torch.int32)
                bell = Doorbell(word)
            self._doorbells[rank] = bell
        return self._doorbells[rank]

    def ring(self, rank: int) -> None:
        """Wake whoever waits on `rank`'s window (after a flag store into it)."""
        bell = self.doorbell(rank)
        if bell is not None:
            bell.ring()

    def ffn_views(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(info, data) of FFN `rank`'s window (`WindowLayout.ffn_views`)."""
        views = self._views.get(("ffn", rank))
        if views is None:
            check(self.topology.is_ffn(rank), "rank", f"an FFN rank of group {self.name!r}", rank)
            views = self._views["ffn", rank] = self.layout.ffn_views(self.window(rank))
        return views

    def attn_views(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(info, data) of attention `rank`'s window (`WindowLayout.attn_views`)."""
        views = self._views.get(("attn", rank))
        if views is None:
            check(
                not self.topology.is_ffn(rank),
                "rank",
                f"an attention rank of group {self.name!r}",
                rank,
            )
            views = self._views["attn", rank] = self.layout.attn_views(self.window(rank))
        return views

    def read_window(self, rank: int) -> bytes:
        """A copy of `rank`'s whole window, for tests and for users chasing a hang."""
        return self.window(rank).numpy().tobytes()

    def address(self, rank: int) -> int:
        """The window address to pass as `ffn_window` / `attention_window`."""
        self.topology.role_of(rank)
        with _lock:
            if rank not in self._addresses:
                self._addresses[rank] = register_memory(
                    self.window(rank), timeout_s=self.timeout_s, owner=(self, rank)
                )
            return self._addresses[rank]

    def window_bytes(self, rank: int) -> int:
        return _window_bytes(self.spec, rank)

    def reset(self) -> None:
        """Put every window in its initial state (flags 0, slots empty)."""
        for rank in range(self.topology.world_size):
            if self.topology.is_ffn(rank):
                self.layout.initialize_ffn(self.window(rank))
            else:
                self.layout.initialize_attn(self.window(rank))

    def describe(self, rank: int) -> dict[str, Any]:
        """`rank`'s info table decoded: what arrived, what is still missing."""
        if self.topology.is_ffn(rank):
            info, _ = self.ffn_views(rank)
            e = self.layout.slots
            rows = []
            for s in range(info.shape[0]):
                for m in range(info.shape[1]):
                    ids = info[s, m, SLOTS_OFFSET:]
                    filled = (ids < EMPTY_ID_THRESHOLD).nonzero().flatten().tolist()
                    rows.append(
                        {
                            "session": s,
                            "micro_batch": m,
                            "flag": int(info[s, m, FLAG_OFFSET]),
                            "layer": int(info[s, m, LAYER_OFFSET]),
                            "slots": [(i // e, i % e, int(ids[i])) for i in filled],
                        }
                    )
            return {"group": self.name, "rank": rank, "role": "ffn", "rows": rows}
        info, _ = self.attn_views(rank)
        mbs = []
        for m in range(info.shape[0]):
            missing = (info[m] != 1).nonzero().tolist()
            mbs.append(
                {
                    "micro_batch": m,
                    "arrived": int((info[m] == 1).sum()),
                    "missing": [tuple(x) for x in missing],
                }
            )
        return {
            "group": self.name,
            "rank": rank,
            "role": "attention",
            "session": self.topology.session_of(rank),
            "micro_batches": mbs,
        }

    def close(self) -> None:
        _unregister(self)
        self._views.clear()  # views keep a mapping alive
        self.memo.clear()
        self._transport.close()


# -- the process-local registries ------------------------------------------------------------
_lock = threading.Lock()
_groups: dict[str, WindowGroup] = {}


def create_window_group(
    name: str,
    topology: RankTopology,
    layout: WindowLayout,
    transport: str = "inproc",
    timeout_s: float = 30.0,
) -> WindowGroup:
    """Allocate every rank's window for communicator `name` and register it here.

    `transport` is "inproc" (all ranks in this process) or "shm" (shared memory; pass
    `group.spec` to `attach_window_group` in the other processes).
    """
    allowed = list(WINDOW_TRANSPORTS)
    check(transport in WINDOW_TRANSPORTS, "transport", f"one of {allowed}", transport)
    check(
        layout.num_attention_ranks == topology.num_attention_ranks,
        "layout.num_attention_ranks",
        f"A = {topology.num_attention_ranks}",
        layout.num_attention_ranks,
    )
    check(timeout_s > 0, "timeout_s", "> 0", timeout_s)
    with _lock:
        check(name not in _groups, "group", "a name not already registered in this process", name)
        sizes = _allocation_sizes(topology, layout)
        impl: Transport
        if transport == "shm":
            impl = SharedMemoryTransport(sizes)
            token: str | None = impl.token
        else:
            impl = InProcessTransport(sizes)
            token = None
        group = WindowGroup(
            WindowGroupSpec(name, topology, layout, transport, timeout_s, token), impl
        )
        group.reset()
        _groups[name] = group
    return group


def attach_window_group(spec: WindowGroupSpec) -> WindowGroup:
    """Map the windows of a shared-memory group created by another process."""
    check(
        spec.transport == "shm",
        "spec.transport",
        "'shm' (only shared memory attaches)",
        spec.transport,
    )
    sizes = _allocation_sizes(spec.topology, spec.layout)
    assert spec.token is not None
    with _lock:
        check(
            spec.name not in _groups,
            "group",
            "a name not already registered in this process",
            spec.name,
        )
        group = WindowGroup(spec, SharedMemoryTransport(sizes, token=spec.token))
        _groups[spec.name] = group
    return group


class _GivenWindows:
    """Windows whose memory someone else owns (e.g. a communicator's registered buffers)."""

    kind = "given"

    def __init__(self, windows: list[torch.Tensor]) -> None:
        self._windows = windows

    def window(self, rank: int) -> torch.Tensor:
        return self._windows[rank]

    def close(self) -> None:
        self._windows = []


def window_group_over(
    name: str,
    topology: RankTopology,
    layout: WindowLayout,
    windows: list[torch.Tensor],
    timeout_s: float = 30.0,
) -> WindowGroup:
    """Register a group named `name` over windows that already exist, one 1-D uint8
    tensor per rank of `topology` (each at least its role's window bytes), without
    touching their contents. For a stand-in of a communicator whose windows it maps; the
    caller keeps owning the memory. `close()` only forgets the group."""
    check(
        len(windows) == topology.world_size,
        "windows",
        f"one per rank ({topology.world_size})",
        len(windows),
    )
    for rank, w in enumerate(windows):
        need = _role_bytes(topology, layout, rank)
        ok = w.dtype == torch.uint8 and w.dim() == 1 and w.numel() >= need
        check(ok, f"windows[{rank}]", f"a 1-D uint8 tensor of >= {need} bytes", tuple(w.shape))
    spec = WindowGroupSpec(name, topology, layout, "given", timeout_s)
    with _lock:
        check(name not in _groups, "group", "a name not already registered in this process", name)
        group = WindowGroup(spec, _GivenWindows(list(windows)))
        _groups[name] = group
    return group


def _window_bytes(spec: WindowGroupSpec, rank: int) -> int:
    return _role_bytes(spec.topology, spec.layout, rank)


def _role_bytes(topology: RankTopology, layout: WindowLayout, rank: int) -> int:
    return layout.ffn_window_bytes if topology.is_ffn(rank) else layout.attn_window_bytes


def _allocation_sizes(topology: RankTopology, layout: WindowLayout) -> list[int]:
    """Per rank: its window, then (512-aligned) room for one schedule context; an FFN rank's
    journal or an attention rank's receipts after that; its doorbell last."""
    return [
        align512(_role_bytes(topology, layout, rank))
        + CONTEXT_STORAGE_BYTES
        + align512(
            layout.ffn_journal_bytes if topology.is_ffn(rank) else layout.attn_receipts_bytes
        )
        + DOORBELL_BYTES
        for rank in range(topology.world_size)
    ]


def get_window_group(name: str) -> WindowGroup:
    group = _groups.get(name)
    if group is None:
        raise AFDInputError("group", f"a registered window group, one of {sorted(_groups)}", name)
    return group


def destroy_window_group(name: str) -> None:
    group = _groups.get(name)
    if group is not None:
        group.close()


def resolve_address(address: int, argument: str) -> tuple[WindowGroup, int, int]:
    """(group, rank, byte offset) of an address inside a window (`WindowGroup.address`)."""
    region, _ = resolve(address, 1, argument)
    owner = region.owner
    if not (isinstance(owner, tuple) and isinstance(owner[0], WindowGroup)):
        raise AFDInputError(argument, "a window address from WindowGroup.address()", address)
    group, rank = owner
    return group, rank, address - region.start


def window_of(region: Region) -> tuple[WindowGroup, int] | None:
    """(group, rank) when `region` is a window, else None (memory registered by hand)."""
    owner = region.owner
    if isinstance(owner, tuple) and isinstance(owner[0], WindowGroup):
        return owner[0], owner[1]
    return None


def _unregister(group: WindowGroup) -> None:
    with _lock:
        if _groups.get(group.name) is group:
            del _groups[group.name]
        addresses = list(group._addresses.values())
        group._addresses.clear()
    for address in addresses:
        unregister_memory(address)
