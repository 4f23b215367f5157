"""`--additional-config '{"afd": {...}}'`, as vllm-project/afd-plugin users write it.

The `afd` object may hold this project's own keys (`AFDConfig`) and afd-plugin's. Keys of
afd-plugin that mean something here are translated; the others are refused with what to
use instead. Facts about afd-plugin's keys are from its `afd_plugin/config.py` and README
("AFD Config"), snapshot 2e4378f2 (2026-08-08):

- `num_attention_ranks`, `num_ffn_ranks`: A and F, the same keys here.
- `role` / `afd_role`: "attention" or "ffn". Here one `vllm serve` is the attention side
  and starts the FFN ranks itself as Ray actors, so only "attention" means something.
- `compute_gate_on_attention`: the router runs on the attention ranks. vLLM's runner
  always routes here, so only true means something.
- `async_dp` / `async`: DP engines step independently. Here every DP rank sends the same
  sequence of (layer, micro-batch) in lockstep, so only false means something.
- `connector` / `afd_connector`, `host` / `afd_host`, `port` / `afd_port`,
  `connector_extra_config`: afd-plugin's transports and rendezvous; none is used here.
Its booleans may be given as 0/1 or "true"/"false"/"yes"/"no"/"on"/"off".
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from afd_dispatch.config import SECTIONS, AFDConfig
from afd_dispatch.config_deprecated import MOVED_KEYS, RENAMED_KEYS
from afd_dispatch.errors import AFDInputError, check

FLAG = "--additional-config afd"
# afd-plugin's names (its num_attention_ranks and num_ffn_ranks are ours too) and our
# deprecated ones -> ours
RENAMED = {"afd_role": "role", **RENAMED_KEYS}
# afd-plugin key -> (the only value that means something here, why)
FIXED = {
    "compute_gate_on_attention": (True, "vLLM's router always runs on the attention ranks"),
    "async_dp": (False, "data-parallel ranks step in lockstep (every MoE layer, every rank)"),
    "async": (False, "data-parallel ranks step in lockstep (every MoE layer, every rank)"),
}
CONNECTOR_INSTEAD = (
    'backend ("npu": HCCL windows; "reference": windows in shared memory, '
    'reference.transport "shm")'
)
INSTEAD = {
    "connector": CONNECTOR_INSTEAD,
    "afd_connector": CONNECTOR_INSTEAD,
    "host": "nothing: the process that launches the engines serves the rendezvous; "
    "ray_address for a Ray cluster",
    "afd_host": "nothing: the process that launches the engines serves the rendezvous; "
    "ray_address for a Ray cluster",
    "port": "nothing: the rendezvous port is chosen free at start",
    "afd_port": "nothing: the rendezvous port is chosen free at start",
    "connector_extra_config": 'quant_mode ("none" or "int8") for dynamic quantization; '
    "micro_batch_num and max_tokens_per_micro_batch for the pipeline",
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def translate(values: Any) -> dict[str, Any]:
    """The `afd` object with afd-plugin's keys in our terms; `AFDInputError` names the key."""
    check(isinstance(values, Mapping), FLAG, "a JSON object", type(values).__name__)
    ours = {f.name for f in dataclasses.fields(AFDConfig) if f.init}
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # our key -> the key it came from
    for key, value in values.items():
        if key in INSTEAD:
            raise AFDInputError(
                f"{FLAG} key {key!r}", f"not set (afd-plugin's; use {INSTEAD[key]})", value
            )
        if key in FIXED:
            wanted, why = FIXED[key]
            check(
                _flag(key, value) == wanted,
                f"{FLAG} key {key!r}",
                f"{str(wanted).lower()} or absent ({why})",
                value,
            )
            continue
        target = RENAMED.get(key, key)
        if key in RENAMED_KEYS:
            check(
                target not in values,
                f"{FLAG} key {key!r}",
                f"absent beside {target!r} (its old name)",
                value,
            )
            warnings.warn(
                f"{FLAG} key {key!r} is deprecated: it is {target!r} now",
                FutureWarning,
                stacklevel=2,
            )
        check(
            target in ours or target == "role" or target in MOVED_KEYS,  # read by from_dict
            f"{FLAG} key {key!r}",
            f"one of {sorted(ours | set(RENAMED) | set(FIXED) | {'role', *MOVED_KEYS})}",
            key,
        )
        if target in out and out[target] != value:
            raise AFDInputError(
                f"{FLAG} keys {given[target]!r} and {key!r}",
                "the same value (they name one setting)",
                {given[target]: out[target], key: value},
            )
        out[target] = value
        given[target] = key
    role = out.pop("role", "attention")  # nothing reads it: only "attention" is true here
    check(
        role == "attention",
        f"{FLAG} key {given.get('role', 'role')!r}",
        '"attention" (one vllm serve is the attention side and starts the FFN ranks '
        "as Ray actors; start no FFN server)",
        role,
    )
    return out


def merge(
    afd_config: dict[str, Any], additional: dict[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """Both flags' settings, refused where they disagree (naming both values); a backend
    section given by both is merged key by key, so each flag sets only what it names."""
    out = {**additional, **afd_config}
    for key in sorted(afd_config.keys() & additional.keys()):
        mine, theirs = afd_config[key], additional[key]
        if key in SECTIONS and isinstance(mine, Mapping) and isinstance(theirs, Mapping):
            out[key] = merge(dict(mine), dict(theirs), f"{prefix}{key}.")
        elif mine != theirs:
            raise AFDInputError(
                f"{prefix}{key} (given by --afd-config and by {FLAG})",
                "the same value in both",
                {"--afd-config": mine, FLAG: theirs},
            )
    return out


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise AFDInputError(f"{FLAG} key {key!r}", "a boolean (true/false, 0/1)", value)
