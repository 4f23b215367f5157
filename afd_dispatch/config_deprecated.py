"""The deprecated keys of `--afd-config`, read in today's terms with a FutureWarning.

`AFDConfig.from_dict` passes a user's object through `current_keys` before it checks any
key, so an old config still starts, says what to write instead, and an old key given
beside its new one is refused (they would name one setting twice).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from afd_dispatch.kernels import BACKENDS, resolve_backend
from afd_dispatch.untrusted_json import refuse_unless
from afd_dispatch.windows.transport import WINDOW_TRANSPORTS

RENAMED_KEYS = {"num_attention_workers": "num_attention_ranks", "num_ffn_workers": "num_ffn_ranks"}
"""Old key -> today's (afd-plugin's, and the field's usual term); the old one is still read,
with a FutureWarning, and refused beside the new one."""
MOVED_KEYS = {"transport": "reference.transport"}
"""Old top-level key -> the backend section that owns it now; read as `RENAMED_KEYS` are
("hccl", the NPU link's only windows, is dropped: nothing chooses it)."""
OLD_TRANSPORTS = ("auto", *WINDOW_TRANSPORTS, "hccl")
"""What the top-level `transport` took (its last value, "hccl", named the NPU link's windows)."""
ROLE_ALLOWED = (
    '"attention" (the process reading the config is the attention side and starts the FFN '
    'ranks itself, as Ray actors; nothing runs an FFN process from "ffn")'
)


def current_keys(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with deprecated keys in today's terms, a FutureWarning for each one given:
    `RENAMED_KEYS`, `MOVED_KEYS` (`_moved_transport`), and `role`, which nothing read (the
    config's reader is always the attention side): "attention" is dropped, anything else
    refused (`ROLE_ALLOWED`)."""
    out = dict(data)
    if "transport" in out:
        out = _moved_transport(out)
    for old, new in RENAMED_KEYS.items():
        if old in out:
            refuse_unless(new not in out, old, f"absent beside {new!r} (its old name)", out[old])
            warnings.warn(
                f"--afd-config key {old!r} is deprecated: it is {new!r} now",
                FutureWarning,
                stacklevel=3,
            )
            out[new] = out.pop(old)
    if "role" in out:
        refuse_unless(out["role"] == "attention", "role", ROLE_ALLOWED, out["role"])
        warnings.warn(
            "--afd-config key 'role' is deprecated and ignored: the process that reads the "
            "config is always the attention side",
            FutureWarning,
            stacklevel=3,
        )
        del out["role"]
    return out


def _moved_transport(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with its top-level `transport` moved to `reference.transport`; "hccl", the NPU
    link's windows (it has no others), is dropped, and refused where the backend is not npu
    (as it was before it moved)."""
    out = dict(data)
    value = out.pop("transport")
    section = out.get("reference", {})
    refuse_unless(
        value in OLD_TRANSPORTS,
        "transport",
        f"one of {[*OLD_TRANSPORTS]} (deprecated: use reference.transport)",
        value,
    )
    refuse_unless(
        not isinstance(section, Mapping) or "transport" not in section,
        "transport",
        "absent beside 'reference.transport' (its old place)",
        value,
    )
    warnings.warn(
        "--afd-config key 'transport' is deprecated: it is 'reference.transport' now (the "
        "NPU link's windows are always HCCL memory)",
        FutureWarning,
        stacklevel=4,
    )
    if value != "hccl":
        if isinstance(section, Mapping):
            out["reference"] = {**section, "transport": value}
        return out
    backend = out.get("backend", "auto")
    if backend in BACKENDS:  # else refused as `backend` by the declaration
        resolved = resolve_backend(backend)
        auto = f' ("auto" is {resolved!r} on this host)' if backend != resolved else ""
        refuse_unless(
            resolved == "npu",
            "transport",
            f"\"hccl\" only with backend 'npu', whose windows are HCCL memory{auto}",
            value,
        )
    return out
