"""Windows: per-rank byte buffers the AFD ops write into one-sidedly."""

from afd_dispatch.windows.group import (
    WindowGroup,
    WindowGroupSpec,
    attach_window_group,
    create_window_group,
    destroy_window_group,
    get_window_group,
    resolve_address,
    window_group_over,
    window_of,
)
from afd_dispatch.windows.memory import (
    DEFAULT_TIMEOUT_S,
    Region,
    memory_generation,
    register_memory,
    registered_memory,
    resolve,
    unregister_memory,
)
from afd_dispatch.windows.wait import ScheduleStopped, store_fence, wait_until

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Region",
    "ScheduleStopped",
    "WindowGroup",
    "WindowGroupSpec",
    "attach_window_group",
    "create_window_group",
    "destroy_window_group",
    "get_window_group",
    "memory_generation",
    "register_memory",
    "registered_memory",
    "resolve",
    "resolve_address",
    "store_fence",
    "unregister_memory",
    "wait_until",
    "window_group_over",
    "window_of",
]
