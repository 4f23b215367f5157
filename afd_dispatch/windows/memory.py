"""The reference backend's device memory: addresses that schedule contexts point at.

On A3 a schedule context holds raw device addresses (its windows, the FFN scheduler's id
buffers), and the batching and combine kernels find everything through them. The reference
does the same with host addresses: a tensor registered here is found again by any address
inside it, so a context built by hand, the way the hardware team's own tests build theirs
(torch_npu's `test/_afd`, op-plugin `test/test_custom_ops`), works as it does on A3.

An address is `tensor.data_ptr()` plus a byte offset. Resolving one that no registered
tensor covers raises `AFDInputError` naming the context field, instead of reading freed
memory as the hardware would.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from afd_dispatch.errors import AFDInputError, check

DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Region:
    """One registered tensor: its bytes, and whom a wait on them should name."""

    start: int
    data: torch.Tensor  # 1-D uint8 over the whole registration
    timeout_s: float
    owner: object | None  # e.g. (WindowGroup, rank) for a window

    @property
    def end(self) -> int:
        return self.start + self.data.numel()


_lock = threading.Lock()
_starts: list[int] = []  # sorted; _regions[i] starts at _starts[i]
_regions: list[Region] = []
_generation = 0  # bumped by every register / unregister: what was resolved may be stale


def memory_generation() -> int:
    """A number that changes whenever registered memory does: a view resolved while it
    had one value is still valid while it keeps that value."""
    return _generation


def register_memory(
    tensor: torch.Tensor, *, timeout_s: float | None = None, owner: object | None = None
) -> int:
    """Make `tensor`'s bytes addressable by schedule contexts; return its address.

    `tensor`: contiguous, on the CPU, any dtype. It stays referenced until
    `unregister_memory(address)`. `timeout_s`: the deadline of waits on flags inside it
    (default `DEFAULT_TIMEOUT_S`). Registering memory that overlaps a registered tensor is
    refused, so an address always means one thing.
    """
    ok = isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu"
    check(ok and tensor.is_contiguous(), "tensor", "a contiguous CPU tensor", _show(tensor))
    check(tensor.numel() > 0, "tensor", "at least one element", tuple(tensor.shape))
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    check(timeout > 0, "timeout_s", "> 0", timeout)
    data = tensor.view(-1).view(torch.uint8)
    region = Region(tensor.data_ptr(), data, timeout, owner)
    with _lock:
        i = bisect.bisect_right(_starts, region.start)
        overlaps = (i > 0 and _regions[i - 1].end > region.start) or (
            i < len(_regions) and _regions[i].start < region.end
        )
        check(
            not overlaps,
            "tensor",
            "memory not overlapping a registered tensor",
            f"bytes [{region.start:#x}, {region.end:#x})",
        )
        _starts.insert(i, region.start)
        _regions.insert(i, region)
        _bump()
    return region.start


def _bump() -> None:
    global _generation
    _generation += 1


def unregister_memory(address: int) -> None:
    """Forget the tensor registered at `address` (its start); unknown addresses are ignored."""
    with _lock:
        i = bisect.bisect_left(_starts, address)
        if i < len(_starts) and _starts[i] == address:
            del _starts[i]
            del _regions[i]
            _bump()


@contextmanager
def registered_memory(
    *tensors: torch.Tensor, timeout_s: float | None = None
) -> Iterator[list[int]]:
    """Register `tensors` for the duration of a `with` block; yields their addresses."""
    addresses: list[int] = []
    try:
        for t in tensors:
            addresses.append(register_memory(t, timeout_s=timeout_s))
        yield addresses
    finally:
        for address in addresses:
            unregister_memory(address)


def resolve(address: int, nbytes: int, argument: str) -> tuple[Region, torch.Tensor]:
    """(region, uint8 view of `nbytes` at `address`) for a context field named `argument`.

    Raises `AFDInputError` when no registered tensor holds all of [address, address + nbytes).
    """
    with _lock:
        i = bisect.bisect_right(_starts, address) - 1
        region = _regions[i] if i >= 0 else None
    if region is None or not (region.start <= address and address + nbytes <= region.end):
        raise AFDInputError(
            argument,
            f"the address of {nbytes} registered bytes (register_memory / a window address)",
            address,
        )
    offset = address - region.start
    return region, region.data[offset : offset + nbytes]


def _show(t: object) -> str:
    if isinstance(t, torch.Tensor):
        layout = "contiguous" if t.is_contiguous() else "non-contiguous"
        return f"{t.device.type} {layout} {t.dtype} {tuple(t.shape)}"
    return type(t).__name__
