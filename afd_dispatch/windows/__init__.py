"""Windows: per-rank byte buffers the AFD ops write into one-sidedly."""

from afd_dispatch.windows.group import (
    WindowGroup,
    WindowGroupSpec,
    attach_window_group,
    create_window_group,
    destroy_window_group,
    get_window_group,
    resolve_address,
)
from afd_dispatch.windows.wait import ScheduleStopped, store_fence, wait_until

__all__ = [
    "ScheduleStopped",
    "WindowGroup",
    "WindowGroupSpec",
    "attach_window_group",
    "create_window_group",
    "destroy_window_group",
    "get_window_group",
    "resolve_address",
    "store_fence",
    "wait_until",
]
