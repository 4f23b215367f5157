"""afd-dispatch: attention/FFN disaggregation for MoE serving.

The planning layer lives here (config, topology, placement, window layout, the op
contract, windows); the op family's backends in `afd_dispatch.kernels`.
"""

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDInputError, AFDTimeoutError
from afd_dispatch.layout import WindowLayout
from afd_dispatch.placement import (
    build_expert_rank_table,
    local_experts,
    validate_expert_rank_table,
)
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows import (
    WindowGroup,
    WindowGroupSpec,
    attach_window_group,
    create_window_group,
    destroy_window_group,
    get_window_group,
)

__all__ = [
    "AFDConfig",
    "AFDInputError",
    "AFDTimeoutError",
    "RankTopology",
    "WindowGroup",
    "WindowGroupSpec",
    "WindowLayout",
    "attach_window_group",
    "build_expert_rank_table",
    "create_window_group",
    "destroy_window_group",
    "get_window_group",
    "local_experts",
    "validate_expert_rank_table",
]
