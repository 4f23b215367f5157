"""JSON nobody vouches for: `--afd-config`, a checkpoint's config.json, a hardware profile.

One set of rules for all of them: a size cap checked before anything is read, UTF-8, valid
JSON, no key twice in one object (ambiguous, not "last wins"), and every refusal an
`AFDInputError` naming the argument and showing at most `MAX_SHOWN_CHARS` of the value (a
bad value may be a megabyte long).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from afd_dispatch.errors import AFDInputError

MAX_SHOWN_CHARS = 200  # of a bad value, in an error message


class Cut(str):
    """The start of a repr too long to show whole; shown as it is (no extra quotes)."""

    def __repr__(self) -> str:
        return str(self)


def shown(value: Any) -> Any:
    """`value`, or when its repr is long (or too deep to make), a `Cut` summary of it."""
    try:
        text = repr(value)
    except RecursionError:
        return Cut(f"<{type(value).__name__} nested too deep to show>")
    if len(text) <= MAX_SHOWN_CHARS:
        return value
    return Cut(f"{text[:MAX_SHOWN_CHARS]}... ({len(text)} characters)")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON's true is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An integer or a float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def refuse_unless(condition: bool, argument: str, allowed: str, value: Any) -> None:
    """`afd_dispatch.errors.check` for untrusted values: the value is `shown`."""
    if not condition:
        raise AFDInputError(argument, allowed, shown(value))


def too_deep(value: Any, limit: int) -> bool:
    """Whether `value` nests lists / objects more than `limit` deep (iterative: the check
    itself must not recurse)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, Mapping)):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, Mapping) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def read_text(path: str, argument: str, max_bytes: int, allowed: str) -> str:
    """The text of the file at `path`, refused (`allowed` says what was expected) when it
    cannot be read as UTF-8 or is larger than `max_bytes`."""
    try:
        size = os.stat(path).st_size
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise AFDInputError(argument, allowed, f"{shown(path)!r} ({why})") from None
    refuse_unless(size <= max_bytes, argument, f"a file of at most {max_bytes} bytes", size)
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read(max_bytes + 1)
    except (OSError, UnicodeDecodeError) as exc:  # a directory, a binary file
        raise AFDInputError(argument, allowed, f"{shown(path)!r} ({exc})") from None


def loads(text: str, argument: str, where: str = "") -> Any:
    """The JSON value of `text`; `where` (e.g. a path and ": ") starts what a refusal shows."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys(argument))
    except json.JSONDecodeError as exc:
        raise AFDInputError(
            argument, "valid JSON", f"{where}{exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:  # over-long integers, deep nesting
        if isinstance(exc, AFDInputError):
            raise
        raise AFDInputError(argument, "valid JSON", f"{where}{str(exc)[:200]}") from None


def read_object(path: str, argument: str, max_bytes: int) -> dict[str, Any]:
    """The JSON object in the file at `path` (at most `max_bytes`), as `read_text` and
    `loads` check it; any other top-level value is refused."""
    text = read_text(path, argument, max_bytes, "a readable UTF-8 JSON file")
    data = loads(text, argument, f"{path!r}: ")
    refuse_unless(isinstance(data, dict), argument, "a JSON object", type(data).__name__)
    return data  # type: ignore[no-any-return]


def _unique_keys(argument: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            refuse_unless(key not in out, argument, "each key at most once per object", key)
            out[key] = value
        return out

    return hook
