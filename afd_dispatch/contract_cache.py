"""What the input contract's checks (`afd_dispatch.contract`) remember between calls.

The structural checks of `npu_attention_to_ffn` run once per distinct call structure
(`structure_key`, `a2f_structures`), and an expert table is validated once per version
(`validated_table`), not on every call of every layer.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from afd_dispatch.layout import WindowLayout
from afd_dispatch.placement import validate_expert_rank_table
from afd_dispatch.topology import RankTopology

_TABLE_ARGUMENT = 5  # expert_rank_table's position in the call
# structure key -> (weak reference to the expert table, layout, topology)
a2f_structures: dict[tuple[object, ...], tuple[Any, WindowLayout, RankTopology]] = {}


def structure_key(*args: object) -> tuple[object, ...] | None:
    """What the structural checks of a call depend on: each tensor's type, dtype, shape and
    (for the expert table) identity and version; every other argument as given. None when
    an argument is not hashable that way (the full checks then run, and name it)."""
    key: list[object] = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and i == _TABLE_ARGUMENT:  # checked by value
            key.append((a.dtype, a.shape, a.device.type, id(a), a._version))
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.shape, a.device.type))
        elif isinstance(a, (list, tuple)):
            key.append(tuple(a))
        else:
            key.append(a)
    try:
        hash(tuple(key))
    except TypeError:
        return None
    return tuple(key)


# id(table) -> (weak reference, version, topology, moe_expert_num, S): a table is checked once,
# not on every call of every layer (on A3 each check is a device-to-host copy).
_checked_tables: dict[int, tuple[weakref.ref[torch.Tensor], int, RankTopology, int, int]] = {}


def validated_table(table: torch.Tensor, topology: RankTopology, moe_expert_num: int) -> int:
    if isinstance(table, torch.Tensor):
        hit = _checked_tables.get(id(table))
        if hit is not None:
            ref, version, topo, experts, shared = hit
            if (
                ref() is table
                and version == table._version
                and (topo, experts) == (topology, moe_expert_num)
            ):
                return shared
    shared = validate_expert_rank_table(table, topology, moe_expert_num)
    if len(_checked_tables) > 64:
        _checked_tables.clear()
    _checked_tables[id(table)] = (
        weakref.ref(table),
        table._version,
        topology,
        moe_expert_num,
        shared,
    )
    return shared
