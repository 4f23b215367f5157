"""The AFD link: one interface for both ends, one implementation per backend.

    from afd_dispatch.link import attention_link, ffn_link

`attention_link(deployment, session)` and `ffn_link(deployment, rank)` build the
implementation the deployment's config names. The runtime, the Ray actors and the vLLM
plugin use nothing else of the op backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from afd_dispatch.errors import check
from afd_dispatch.link.base import AttentionLink, Batch, FFNLink
from afd_dispatch.runtime.deployment import Deployment

if TYPE_CHECKING:
    from afd_dispatch.link.npu import Rendezvous

__all__ = ["AttentionLink", "Batch", "FFNLink", "attention_link", "ffn_link", "link_kind"]


def link_kind(deployment: Deployment) -> str:
    """The implementation the config selects: "reference" (windows in this host's memory,
    `reference.transport`) or "npu" (HCCL windows)."""
    deployment.config.check_sections(deployment.backend)
    return deployment.backend


def attention_link(
    deployment: Deployment,
    session: int,
    ops: Any = None,
    rendezvous: Rendezvous | None = None,
) -> AttentionLink:
    """The attention end of `deployment` for `session`. `ops` (reference only): the op
    module to call, e.g. a timed wrapper of the reference backend. `rendezvous` (NPU only):
    where the ranks meet to set up their communicators."""
    if link_kind(deployment) == "npu":
        from afd_dispatch.link.npu import NPUAttentionLink

        return NPUAttentionLink(deployment, session, _needed(rendezvous))
    from afd_dispatch.link.reference import ReferenceAttentionLink

    return ReferenceAttentionLink(deployment, session, ops)


def ffn_link(
    deployment: Deployment,
    rank: int,
    ops: Any = None,
    rendezvous: Rendezvous | None = None,
) -> FFNLink:
    """The FFN end of `deployment` for FFN `rank` (its local experts from the expert table)."""
    expert_num = deployment.local_expert_num(rank)
    if link_kind(deployment) == "npu":
        from afd_dispatch.link.npu import NPUFFNLink

        return NPUFFNLink(deployment, rank, expert_num, _needed(rendezvous))
    from afd_dispatch.link.reference import ReferenceFFNLink

    return ReferenceFFNLink(deployment, rank, expert_num, ops)


def _needed(rendezvous: Rendezvous | None) -> Rendezvous:
    check(rendezvous is not None, "rendezvous", "a Rendezvous with the NPU link", rendezvous)
    assert rendezvous is not None
    return rendezvous
