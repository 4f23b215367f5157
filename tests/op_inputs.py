"""Op inputs several test modules build, and what a rejected input must raise.

- `holder_args_with_window`: the keyword arguments of `create_schedule_context_holder`,
  whose window goes on the side the schedule mode names (A3: 0 is FFN) and is 0 on the other;
- `raises_input_error`: the `AFDInputError` checks every bad-input test makes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from afd_dispatch import AFDInputError


def holder_args_with_window(
    counts: dict[str, Any], window: int, window_size: int, **changes: Any
) -> dict[str, Any]:
    """`counts` (schedule_mode, session_num ... ffn_to_attn_token_size), the window on the
    side `counts["schedule_mode"]` names with 0 on the other, then a test's `changes`."""
    ffn = counts["schedule_mode"] == 0
    args = {
        **counts,
        "ffn_window": window if ffn else 0,
        "ffn_window_size": window_size if ffn else 0,
        "attention_window": 0 if ffn else window,
        "attention_window_size": 0 if ffn else window_size,
    }
    args.update(changes)
    return args


def raises_input_error(call: Callable[[], object], argument: str, shown: str) -> AFDInputError:
    """`call()` raises AFDInputError whose argument names `argument`, value shows `shown`."""
    with pytest.raises(AFDInputError) as info:
        call()
    err = info.value
    assert shown, "a case must say which part of the value the message shows"
    assert argument in err.argument, f"argument {err.argument!r} does not name {argument!r}"
    assert shown in repr(err.value), f"value {err.value!r} does not show {shown!r}"
    return err
