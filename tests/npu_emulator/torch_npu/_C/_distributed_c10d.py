"""`ProcessGroupHCCL`, emulated: a communicator's name and its registered windows.

What torch_npu gives (Ascend/pytorch `csrc/distributed/Init.cpp`, `ProcessGroupHCCL.cpp`):
`ProcessGroupHCCL(store, rank, size, options)`; `get_hccl_comm_name(rank)` names the
communicator (the same string on every rank); `_window_register_and_exchange(window_size,
peer_ranks)` allocates this rank's window of `window_size` bytes, registers it and
exchanges it with `peer_ranks`, once per group; `_get_window_mem()` returns this rank's
window, a 1-D int8 tensor. Here a window is an owner-only shared-memory file; its name goes
to the peers through the group's store, and every process registers the windows it maps, so
the reference kernels find them by address and the AFD ops by communicator name.
"""

from __future__ import annotations

import datetime
import secrets
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from afd_dispatch.windows import register_memory, unregister_memory
from afd_dispatch.windows.transport import SharedMemoryTransport


@dataclass
class Communicator:
    """One emulated HCCL communicator as this process sees it."""

    name: str
    rank: int
    size: int
    windows: dict[int, torch.Tensor] = field(default_factory=dict)  # rank -> uint8 window
    transports: list[SharedMemoryTransport] = field(default_factory=list)
    addresses: list[int] = field(default_factory=list)
    groups: int = 0  # ProcessGroupHCCL objects of this process that registered a window here

    def close(self) -> None:
        for address in self.addresses:
            unregister_memory(address)
        self.windows.clear()
        for t in self.transports:
            t.close()
        self.transports.clear()


_lock = threading.Lock()
COMMUNICATORS: dict[str, Communicator] = {}


def communicator(name: str) -> Communicator:
    with _lock:
        comm = COMMUNICATORS.get(name)
    if comm is None:
        raise RuntimeError(f"torch_npu emulator: no HCCL communicator named {name!r} here")
    return comm


class ProcessGroupHCCL:
    class Options:
        """The options object vllm-ascend fills in (only these attributes are emulated)."""

        def __init__(self) -> None:
            self._timeout = datetime.timedelta(minutes=30)
            self.global_ranks_in_group: list[int] = []
            self.group_id = ""
            self.hccl_config: dict[str, Any] = {}

    def __init__(self, store: Any, rank: int, size: int, options: Options | None = None) -> None:
        if not (0 <= rank < size):
            raise RuntimeError(f"ProcessGroupHCCL: rank {rank} outside [0, {size})")
        self._store = store
        self._rank = rank
        self._size = size
        self._options = options or ProcessGroupHCCL.Options()
        self._name: str | None = None
        self._window: torch.Tensor | None = None

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def get_hccl_comm_name(self, rank: int) -> str:
        # Every rank must ask (torch_npu creates the communicator on the first call).
        if self._name is None:
            if self._rank == 0:
                self._store.set("hccl_comm_name", f"hccl_emu_{secrets.token_hex(8)}")
            self._name = self._store.get("hccl_comm_name").decode()
        return self._name

    def _window_register_and_exchange(self, window_size: int, peer_ranks: list[int]) -> None:
        if self._window is not None:
            raise RuntimeError("_window_register_and_exchange: a window is already registered")
        if not (isinstance(window_size, int) and window_size > 0):
            raise RuntimeError(f"_window_register_and_exchange: window_size {window_size!r}")
        if any(not (0 <= p < self._size) or p == self._rank for p in peer_ranks):
            raise RuntimeError(f"_window_register_and_exchange: peer_ranks {peer_ranks}")
        name = self.get_hccl_comm_name(self._rank)
        comm = Communicator(name, self._rank, self._size)
        own = SharedMemoryTransport([window_size])
        comm.transports.append(own)
        comm.windows[self._rank] = own.window(0)
        self._store.set(f"window/{self._rank}", f"{own.token}:{window_size}")
        for peer in peer_ranks:
            token, size = self._store.get(f"window/{peer}").decode().split(":")
            mapped = SharedMemoryTransport([int(size)], token=token)
            comm.transports.append(mapped)
            comm.windows[peer] = mapped.window(0)
        # the emulated ops wait (on flags in these windows) as long as the group's timeout
        timeout_s = self._options._timeout.total_seconds()
        for window in comm.windows.values():
            comm.addresses.append(register_memory(window, timeout_s=timeout_s))
        with _lock:
            existing = COMMUNICATORS.get(name)
            if existing is None:
                COMMUNICATORS[name] = comm
            else:  # a second rank of the communicator in this process: one view of all
                for rank, window in comm.windows.items():
                    existing.windows.setdefault(rank, window)
                existing.transports += comm.transports
                existing.addresses += comm.addresses
                comm = existing
            comm.groups += 1
        self._window = comm.windows[self._rank].view(torch.int8)
        # As torch_npu's destructor deregisters the window: when the group object goes, so
        # does this process's view of the communicator (once its last group here goes).
        weakref.finalize(self, _release, name)

    def _get_window_mem(self) -> torch.Tensor:
        if self._window is None:
            raise RuntimeError("_get_window_mem: no window registered")
        return self._window

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"torch_npu emulator: ProcessGroupHCCL.{name} is not emulated")


def _release(name: str) -> None:
    with _lock:
        comm = COMMUNICATORS.get(name)
        if comm is None:
            return
        comm.groups -= 1
        if comm.groups > 0:
            return
        del COMMUNICATORS[name]
    comm.close()


def close_all() -> None:
    """Unmap every window of this process (the emulator's own teardown, for tests)."""
    with _lock:
        comms = list(COMMUNICATORS.values())
        COMMUNICATORS.clear()
    for comm in comms:
        comm.close()


__all__ = ["ProcessGroupHCCL"]
