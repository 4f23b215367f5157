"""Waiting on Ray with a deadline, and Ray's failures told as AFD diagnoses.

Every `ray.get` of the project goes through `get`: it always has a deadline, and what
reaches the caller is an AFD error that says what was waited for, for how long and the
likely cause, never a bare Ray exception. An error the actor itself raised arrives as
itself (project errors pickle with their type and message).
"""

from __future__ import annotations

import re
from typing import Any

from afd_dispatch.errors import AFDPeerError, AFDTimeoutError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours actor names in its messages


def get(refs: Any, timeout_s: float, what: str, hint: str = "") -> Any:
    """`ray.get(refs)` within `timeout_s`; `what` names the awaited party ("FFN rank 1's
    handshake"), `hint` the likely cause of a timeout.

    Raises `AFDTimeoutError` on expiry, `AFDPeerError` when the actor died or is restarting
    (with Ray's cause, e.g. the exception its constructor raised), and re-raises the
    actor's own exception otherwise.
    """
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise AFDTimeoutError(
            f"{what}: no answer within {timeout_s:g} s" + (f" ({hint})" if hint else "")
        ) from None
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
            raise cause from None
        raise AFDPeerError(f"{what}: {cause_of(exc)}") from None
    except ray.exceptions.RayActorError as exc:
        raise AFDPeerError(f"{what}: {describe_actor_error(exc)}") from None
    except ray.exceptions.RayError as exc:  # unschedulable, node died, out of memory, ...
        raise AFDPeerError(f"{what}: Ray: {type(exc).__name__}: {cause_of(exc)}") from None


def describe_actor_error(exc: BaseException) -> str:
    """One line for a dead or unavailable actor: what happened and Ray's cause."""
    import ray

    if isinstance(exc, ray.exceptions.ActorUnavailableError):
        return f"its actor is unavailable (restarting or unreachable): {cause_of(exc)}"
    if getattr(exc, "_actor_init_failed", False):
        return f"its actor died: its constructor raised {cause_of(exc)}"
    return f"its actor died: {cause_of(exc)}"


def cause_of(exc: BaseException | str) -> str:
    """The most telling line of a Ray error (or its text): the raised exception of a
    creation task's traceback if there is one, else the first line of the message."""
    text = _ANSI.sub("", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [line for line in lines if _looks_raised(line)]
    if raised:
        return raised[-1]
    return lines[0] if lines else (exc if isinstance(exc, str) else type(exc).__name__)


def _looks_raised(line: str) -> bool:
    # "afd_dispatch.errors.AFDInputError: checkpoint: ..." ends a Python traceback
    name, sep, _ = line.partition(":")
    short = name.rsplit(".", 1)[-1]
    return bool(sep) and short.isidentifier() and short.endswith(("Error", "Exception"))
