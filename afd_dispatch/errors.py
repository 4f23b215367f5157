"""The two ways an AFD call fails: bad input, and a peer that never answered.

These errors cross process boundaries (spawned ranks, Ray actors), so each must survive a
pickle round trip with its type, message and attributes.
"""

from __future__ import annotations

import pickle
from typing import Any


class AFDInputError(ValueError):
    """An argument is outside what the op family accepts.

    Raised before anything is written to any window. The message names the argument,
    what is allowed and the value seen, so the caller can fix the call without reading
    the kernel sources (on A3 the same input would hang or corrupt device memory).
    """

    def __init__(self, argument: str, allowed: str, value: Any) -> None:
        self.argument = argument
        self.allowed = allowed
        self.value = value
        super().__init__(f"{argument}: expected {allowed}, got {value!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException pickles as `type(*args)`, and `args` holds only the message, which
        # this __init__ cannot take: unpickling raised TypeError, and Ray handed the driver
        # an UnserializableException. Rebuild without __init__, then restore the attributes.
        args = tuple(_portable(arg) for arg in self.args)
        state = {name: _portable(attr) for name, attr in vars(self).items()}
        return (_rebuild, (type(self), args), state)


class AFDBadMicroBatchError(AFDInputError):
    """A complete micro-batch in an FFN rank's window holds what batching refuses (sessions
    that disagree on its layer, a local expert id out of range). The message is the
    refusal's; the window is as it was before the call, so the FFN side can answer the
    micro-batch with zeros (`FFNLink.refuse`) instead of failing on it for good."""


class AFDTimeoutError(TimeoutError):
    """A wait on window flags passed its deadline.

    The message says who waited (rank, role), for whom (session / micro-batch) and which
    flags were still missing, which is what a user chasing a hang needs first.
    """


def check(condition: bool, argument: str, allowed: str, value: Any) -> None:
    """Raise `AFDInputError(argument, allowed, value)` unless `condition` holds."""
    if not condition:
        raise AFDInputError(argument, allowed, value)


class AFDHandshakeError(RuntimeError):
    """The attention side and an FFN worker disagree on a parameter both must share."""


def _rebuild(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    """An instance of `cls` holding `args`, made without its __init__ (pickle restores the
    attributes next)."""
    return cls.__new__(cls, *args)


def _portable(obj: Any) -> Any:
    """`obj` if a pickle round trip rebuilds it, else its repr (the message shows it anyway).

    `value` may be anything a caller passed, e.g. a lock or a lambda; one unpicklable
    attribute must not make the whole error unreadable in the other process.
    """
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return repr(obj)
    return obj


class AFDPeerError(RuntimeError):
    """A peer of this rank cannot serve: an FFN rank failed for good (restart budget spent),
    refused a micro-batch, or this session's data path broke.

    The message names the rank and why, as the deployment's health board reports it, so a
    caller can fail the request at once instead of waiting out a deadline.
    """


class AFDRefusedError(AFDPeerError):
    """An FFN rank refused a micro-batch (answered it with zeros): the slot came back, so
    the link is in order, but its results are not the model's."""
