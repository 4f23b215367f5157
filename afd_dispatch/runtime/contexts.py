"""Schedule contexts for one rank of a deployment, one per window group.

With the reference backend the windows are `WindowGroup`s this process has registered
(created here or attached from a spec). On A3 the windows belong to HCCL communicators
that vllm-ascend sets up; making their contexts is the integration's job there.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from afd_dispatch.errors import check
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.windows import get_window_group


def rank_contexts(
    deployment: Deployment,
    ops: ModuleType,
    rank: int,
    expert_num: int = 1,
    persistent: bool = False,
) -> dict[str, Any]:
    """{group name: schedule context holder} for `rank`."""
    check(
        hasattr(ops, "context_for"),
        "backend",
        "the reference backend (A3 contexts come from the HCCL integration)",
        getattr(ops, "__name__", ops),
    )
    return {
        name: ops.context_for(get_window_group(name), rank, expert_num, persistent)
        for name in deployment.group_names
    }
