"""Who is who in an AFD communicator: FFN ranks first, attention ranks after."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from afd_dispatch.errors import check

MAX_RANKS_PER_ROLE = 768  # one A3 SuperPoD: 384 chips, 2 dies each


@dataclass(frozen=True)
class RankTopology:
    """The rank layout of one window group (one HCCL communicator on A3).

    FFN ranks are the contiguous range `[ffn_start_rank_id, ffn_start_rank_id + F)`.
    Attention ranks are all other ranks in ascending order, and an attention rank's
    session id is its index among them (so with `ffn_start_rank_id == 0`, session s is
    rank `F + s`). Any A:F ratio is allowed, A < F included.
    """

    num_attention_ranks: int
    num_ffn_ranks: int
    ffn_start_rank_id: int = 0

    def __post_init__(self) -> None:
        for name, value in (
            ("num_attention_ranks", self.num_attention_ranks),
            ("num_ffn_ranks", self.num_ffn_ranks),
        ):
            check(
                isinstance(value, int) and 1 <= value <= MAX_RANKS_PER_ROLE,
                name,
                f"an integer in [1, {MAX_RANKS_PER_ROLE}]",
                value,
            )
        check(
            0 <= self.ffn_start_rank_id <= self.num_attention_ranks,
            "ffn_start_rank_id",
            f"in [0, {self.num_attention_ranks}] (world_size - F)",
            self.ffn_start_rank_id,
        )

    @classmethod
    def from_world(
        cls, world_size: int, num_attention_ranks: int, ffn_start_rank_id: int = 0
    ) -> RankTopology:
        check(
            world_size > num_attention_ranks,
            "world_size",
            f"> A = {num_attention_ranks} (at least one FFN rank)",
            world_size,
        )
        return cls(num_attention_ranks, world_size - num_attention_ranks, ffn_start_rank_id)

    @property
    def world_size(self) -> int:
        return self.num_attention_ranks + self.num_ffn_ranks

    @property
    def ffn_ranks(self) -> range:
        return range(self.ffn_start_rank_id, self.ffn_start_rank_id + self.num_ffn_ranks)

    @functools.cached_property
    def attention_ranks(self) -> tuple[int, ...]:
        # kept: the ops look ranks up per call, and this is O(world size) to build
        return tuple(r for r in range(self.world_size) if r not in self.ffn_ranks)

    def is_ffn(self, rank: int) -> bool:
        return rank in self.ffn_ranks

    def attention_rank(self, session_id: int) -> int:
        check(
            0 <= session_id < self.num_attention_ranks,
            "session_id",
            f"in [0, {self.num_attention_ranks})",
            session_id,
        )
        return self.attention_ranks[session_id]

    def session_of(self, rank: int) -> int:
        check(
            rank in self.attention_ranks,
            "rank",
            f"an attention rank, one of {list(self.attention_ranks)}",
            rank,
        )
        return self.attention_ranks.index(rank)

    def role_of(self, rank: int) -> str:
        check(0 <= rank < self.world_size, "rank", f"in [0, {self.world_size})", rank)
        return "ffn" if self.is_ffn(rank) else "attention"
