"""The two ways an AFD call fails: bad input, and a peer that never answered."""

from __future__ import annotations

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
