"""The AFD link: one interface for both ends, one implementation per (backend, transport).

    from afd_dispatch.link import attention_link, ffn_link

`attention_link(deployment, session)` and `ffn_link(deployment, rank, expert_num)` build the
implementation the deployment's config names. The runtime, the Ray actors and the vLLM
plugin use nothing else of the op backends.
"""

from __future__ import annotations

from typing import Any

from afd_dispatch.errors import check
from afd_dispatch.kernels import npu_available
from afd_dispatch.link.base import AttentionLink, Batch, FFNLink
from afd_dispatch.runtime.deployment import Deployment

__all__ = ["AttentionLink", "Batch", "FFNLink", "attention_link", "ffn_link", "link_kind"]

REFERENCE_TRANSPORTS = ("auto", "inproc", "shm")


def link_kind(deployment: Deployment) -> str:
    """The implementation the config selects: "reference" (or "npu", on A3)."""
    cfg = deployment.config
    backend = cfg.backend
    if backend == "auto":
        backend = "npu" if npu_available() else "reference"
    if backend == "reference":
        check(
            cfg.transport in REFERENCE_TRANSPORTS,
            "transport",
            f"one of {list(REFERENCE_TRANSPORTS)} with backend 'reference'",
            cfg.transport,
        )
        return "reference"
    check(
        False,
        "backend",
        "'reference' here: the NPU link (HCCL windows, torch_npu ops) is not wired yet",
        backend,
    )
    raise AssertionError("unreachable")


def attention_link(deployment: Deployment, session: int, ops: Any = None) -> AttentionLink:
    """The attention end of `deployment` for `session`. `ops` (reference only): the op
    module to call, e.g. a timed wrapper of the reference backend."""
    link_kind(deployment)
    from afd_dispatch.link.reference import ReferenceAttentionLink

    return ReferenceAttentionLink(deployment, session, ops)


def ffn_link(deployment: Deployment, rank: int, expert_num: int, ops: Any = None) -> FFNLink:
    """The FFN end of `deployment` for FFN `rank` hosting `expert_num` local experts."""
    link_kind(deployment)
    from afd_dispatch.link.reference import ReferenceFFNLink

    return ReferenceFFNLink(deployment, rank, expert_num, ops)
