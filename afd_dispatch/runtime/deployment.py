"""One AFD deployment, planned: config + model -> topology, window layout, expert table.

Both roles build their `Deployment` from the same config and model, and compare
`ProtocolParams` at startup, so a worker started with another config or model is refused
before any window is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDHandshakeError, check
from afd_dispatch.kernels import resolve_backend
from afd_dispatch.layout import WindowLayout, a3_attn_to_ffn_token_size
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.placement import build_expert_rank_table, local_experts
from afd_dispatch.topology import RankTopology
from afd_dispatch.windows import WindowGroup, create_window_group


@dataclass(frozen=True)
class Channel:
    """Where the pipeline's micro-batch m (its slot, 0..M-1) travels: a window group, and
    the micro-batch id the ops use inside that group (`window_micro_batch`: m in a shared
    group, 0 in a group of its own)."""

    group: str
    window_micro_batch: int


@dataclass(frozen=True)
class ProtocolParams:
    """Everything both roles must agree on before the first window write."""

    groups: tuple[str, ...]
    world_size: int
    num_attention_ranks: int
    ffn_start_rank_id: int
    micro_batches: int
    tokens: int
    hidden: int
    topk: int
    shared: int
    num_experts: int
    moe_layers: tuple[int, ...]
    dtype: str
    quant_mode: int
    table_shape: tuple[int, ...]
    table_digest: str

    def check_matches(self, other: ProtocolParams, mine: str, theirs: str) -> None:
        """Raise `AFDHandshakeError` naming every field that differs, with both values."""
        pairs = [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in fields(self)]
        diffs = [f"{n}: {mine} has {a!r}, {theirs} has {b!r}" for n, a, b in pairs if a != b]
        if diffs:
            raise AFDHandshakeError(f"{mine} and {theirs} disagree: " + "; ".join(diffs))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ProtocolParams:
        """The inverse of `to_dict` after a trip through JSON (which makes tuples lists)."""
        fixed: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
        }
        return cls(**fixed)


class Deployment:
    """The plan both roles derive from (`AFDConfig`, `MoESpec`)."""

    def __init__(self, config: AFDConfig, spec: MoESpec, dtype: torch.dtype | None = None) -> None:
        # "attention": the attention side runs the shared experts itself, so the AFD table
        # and the windows carry routed experts only; `spec` still describes the whole model
        # (a spec with its shared experts removed is no valid spec of e.g. Qwen2-MoE)
        shared = 0 if config.shared_experts_on == "attention" else spec.num_shared_experts
        self.config = config
        self.spec = spec
        self.dtype = dtype or spec.dtype or torch.bfloat16
        self.topology: RankTopology = config.topology
        self.backend = resolve_backend(config.backend)
        # A3's combine adds exactly one shared slot (E = K + 1): where the FFN side runs no
        # shared expert, the NPU link carries a null one, whose output is zero.
        self.null_shared_slot = self.backend == "npu" and shared == 0
        if self.backend == "npu":
            check(
                shared <= 1,
                "num_shared_experts",
                "0 or 1 on the FFN side with backend 'npu' (A3 combines one shared slot)",
                shared,
            )
            shared = 1
        self.table = build_expert_rank_table(
            self.topology,
            spec.num_experts,
            shared,
            config.expert_replicas,
            config.shared_expert_ranks,
        )
        m = config.micro_batch_num
        per_micro_batch = config.window_groups == "per_micro_batch"
        quant = config.quant_mode_code == 2
        # On A3 the slot stride must be what torch_npu's holder takes: a multiple of 512.
        stride = (
            a3_attn_to_ffn_token_size(spec.hidden_size, self.dtype, quant)
            if self.backend == "npu"
            else 0
        )
        self.layout = WindowLayout(
            num_attention_ranks=config.num_attention_ranks,
            micro_batches=1 if per_micro_batch else m,
            tokens=config.max_tokens_per_micro_batch,
            topk=spec.topk,
            shared=shared,
            hidden=spec.hidden_size,
            dtype=self.dtype,
            quant=quant,
            attn_to_ffn_token_size=stride,
        )
        self.layout.check_hccl_buffsize(config.hccl_buffsize_mb)
        if per_micro_batch:
            self.channels = [Channel(f"{config.group}.mb{i}", 0) for i in range(m)]
        else:
            self.channels = [Channel(config.group, i) for i in range(m)]
        self.group_names = list(dict.fromkeys(c.group for c in self.channels))

    @property
    def micro_batches(self) -> int:
        return self.config.micro_batch_num

    def hosted(self, rank: int) -> dict[int, int]:
        """{local id: global expert row} of FFN `rank`."""
        return local_experts(self.table, rank)

    def local_expert_num(self, rank: int) -> int:
        """The `expert_num` of FFN `rank`'s batching: its local experts (at least 1)."""
        return max(1, len(self.hosted(rank)))

    def params(self) -> ProtocolParams:
        return ProtocolParams(
            groups=tuple(self.group_names),
            world_size=self.topology.world_size,
            num_attention_ranks=self.topology.num_attention_ranks,
            ffn_start_rank_id=self.topology.ffn_start_rank_id,
            micro_batches=self.micro_batches,
            tokens=self.layout.tokens,
            hidden=self.layout.hidden,
            topk=self.layout.topk,
            shared=self.layout.shared,
            num_experts=self.spec.num_experts,
            moe_layers=tuple(self.spec.moe_layers),
            dtype=str(self.dtype),
            quant_mode=self.config.quant_mode_code,
            table_shape=tuple(self.table.shape),
            table_digest=hashlib.sha256(self.table.numpy().tobytes()).hexdigest()[:16],
        )

    def create_windows(self, transport: str | None = None) -> list[WindowGroup]:
        """Allocate the window groups (reference backend; on A3, HCCL owns the windows).

        `transport`: "inproc" (every rank in this process) or "shm" (shared memory, for
        ranks in other processes); by default the config's `reference.transport`, where
        "auto" is "shm".
        """
        if transport is None:
            configured = self.config.reference.transport
            transport = "shm" if configured == "auto" else configured
        groups: list[WindowGroup] = []
        try:
            for name in self.group_names:
                groups.append(
                    create_window_group(
                        name, self.topology, self.layout, transport, self.config.wait_timeout_s
                    )
                )
        except BaseException:
            for g in groups:
                g.close()
            raise
        return groups
