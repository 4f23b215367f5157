"""Property test of the whole loop: A2F -> batching -> per-expert function -> F2A -> combine.

Hypothesis draws a deployment (A, F, M, BS, H, K, S, routed experts, replicas, shared-expert
ranks, ffn_start_rank_id), a quant mode, and a sequence of (layer, micro-batch) messages with
random active-mask prefixes. Every FFN rank applies f_g(x) = x * c_g with c_g a signed power
of two, so the expert itself is exact; every attention rank's combine output is compared, on
its active tokens only (masked rows are stale), with a direct computation of
`sum_k w_k * f_k(x) + sum_shared f_shared(x)`:

- quant_mode 0: bit-exact, because the direct computation runs the combine's float32 order
  (acc = 0; acc = acc + f_k(x) * w_k for k < K; acc = acc + f_shared(x) per shared slot), and
  f_k(x) = x * c_k is exact, so both sides perform the same roundings on the same values.
- quant_mode 2: within the dequantization error bound derived in `quant_error_bound`.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loop_harness import Harness

from afd_dispatch import (
    RankTopology,
    WindowLayout,
    build_expert_rank_table,
    create_window_group,
    destroy_window_group,
)
from afd_dispatch.layout import QUANT_INT8, QUANT_NONE

U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53  # unit roundoff of float64

# c_g = sign * 2**p: exact to multiply by, distinct enough that a token sent to the wrong
# expert (or the wrong token to an expert) changes the result.
EXPONENTS = (-2, -1, 0, 1, 2, 3)


@dataclass(frozen=True)
class Message:
    """One (layer, micro-batch) the attention ranks send and combine."""

    layer: int
    micro_batch: int
    active: tuple[int, ...]  # active-token prefix length per session


@dataclass(frozen=True)
class LoopCase:
    num_attention_ranks: int
    num_ffn_ranks: int
    ffn_start_rank_id: int
    micro_batches: int
    tokens: int
    hidden: int
    topk: int
    shared: int
    num_routed: int
    replicas: int | dict[int, int]
    shared_expert_ranks: tuple[int, ...]
    quant_mode: int
    pipelined: bool  # send all M micro-batches of a layer before serving any of them
    zero_rows: bool  # put some all-zero token rows in (quant defines them as scale 0)
    layers: int
    masks: tuple[tuple[int, ...], ...]  # per (layer, micro-batch): prefix length per session
    seed: int

    def messages(self) -> Iterator[list[Message]]:
        """The messages in flight together: one at a time, or all M of a layer."""
        masks = iter(self.masks)
        for layer in range(self.layers):
            batch = [Message(layer, m, next(masks)) for m in range(self.micro_batches)]
            if self.pipelined:
                yield batch
            else:
                yield from ([msg] for msg in batch)


@st.composite
def loop_cases(draw: st.DrawFn) -> LoopCase:
    a = draw(st.integers(1, 4))
    f = draw(st.integers(1, 4))
    ffn_start = draw(st.integers(0, a))
    m = draw(st.integers(1, 3))
    bs = draw(st.integers(1, 8))
    hidden = 32 * draw(st.integers(1, 4))
    num_routed = draw(st.integers(1, 8))
    topk = draw(st.integers(1, min(4, num_routed)))
    shared = draw(st.integers(0, 2))
    ffn_ranks = list(range(ffn_start, ffn_start + f))
    shared_ranks: list[int] = []
    if shared and f > 1:
        shared_ranks = draw(st.lists(st.sampled_from(ffn_ranks), unique=True, max_size=f - 1))
    routed_ranks = f - len(shared_ranks)
    replicas = draw(
        st.one_of(
            st.integers(1, routed_ranks),
            st.dictionaries(
                st.integers(0, num_routed - 1), st.integers(1, routed_ranks), max_size=num_routed
            ),
        )
    )
    layers = draw(st.integers(1, 3))
    prefix = st.integers(0, bs)
    masks = draw(
        st.lists(
            st.tuples(*([prefix] * a)),
            min_size=layers * m,
            max_size=layers * m,
        )
    )
    return LoopCase(
        num_attention_ranks=a,
        num_ffn_ranks=f,
        ffn_start_rank_id=ffn_start,
        micro_batches=m,
        tokens=bs,
        hidden=hidden,
        topk=topk,
        shared=shared,
        num_routed=num_routed,
        replicas=replicas,
        shared_expert_ranks=tuple(shared_ranks),
        quant_mode=draw(st.sampled_from([QUANT_NONE, QUANT_INT8])),
        pipelined=draw(st.booleans()),
        zero_rows=draw(st.booleans()),
        layers=layers,
        masks=tuple(masks),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def expert_multipliers(num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """c_g = +-2**p for every global expert row (routed, then shared), float32."""
    p = torch.tensor(EXPONENTS, dtype=torch.float32)
    picks = p[torch.randint(len(EXPONENTS), (num_experts,), generator=gen)]
    signs = torch.randint(2, (num_experts,), generator=gen).to(torch.float32) * 2 - 1
    return signs * torch.pow(2.0, picks)


def direct_exact(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, c: torch.Tensor, num_routed: int
) -> torch.Tensor:
    """The combine's float32 order: acc = 0; acc += f_k(x) * w_k; acc += f_shared(x)."""
    acc = torch.zeros_like(x)
    for k in range(ids.shape[1]):
        acc = acc + (x * c[ids[:, k]].unsqueeze(1)) * weights[:, k : k + 1]
    for g in range(num_routed, c.numel()):
        acc = acc + x * c[g]
    return acc


def quant_error_bound(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, c: torch.Tensor, num_routed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, bound): the exact result z (float64) and a bound on |combine output - z| with quant.

    Derivation, u = 2**-24, one token row x of float32 values, amax = max|x_i|, every
    float32 operation fl(a op b) = (a op b)(1 + d) with |d| <= u:

      ds = fl(127 / amax);  y_i = fl(x_i ds) = x_i ds (1 + d2);  q_i = round(y_i), so
      |q_i - y_i| <= 1/2 and |q_i| <= 127;  scale = fl(1 / ds) = (1 + d3) / ds, hence
      scale <= amax/127 * (1 + u) / (1 - u) <= amax/127 * (1 + 3u);
      the expert's input is x^_i = fl(q_i scale) = q_i scale (1 + d4), and

      x^_i - x_i = (q_i - y_i) scale + (y_i scale - x_i) + q_i scale d4
      |x^_i - x_i| <= scale/2 + |x_i| (2u + u^2) + 127 scale u
                   <= amax/127 * ((1 + 3u)(1/2 + 127u) + 127 (2u + u^2))
                    = amax/127 * (1/2 + 382.5u + 508u^2)
                   <= amax/127 * (1/2 + 2**-14) =: e            (the rounding to int8
                      is the scale/2 term; the rest is float32 noise around it)

    An all-zero row has amax = 0, scale 0, q 0, so e = 0 and x^ = x exactly.

    The expert output is d_j = c_j x^ (exact: c_j is a power of two). The combine sums the
    E = K + S terms d_j w_j (w_j = 1 for shared slots) in float32, one rounded product and
    one rounded add per term, so by the standard recursive-summation bound
    |combine - sum_j c_j w_j x^| <= gamma_{E+1} sum_j |c_j w_j| |x^|, gamma_n = nu/(1-nu).
    The reference z = sum_j c_j w_j x is computed in float64 (each product of float32 values
    is exact there; its E adds err by at most gamma64_E sum_j |c_j w_j| |x|). So per element

      |combine - z| <= sum_j |c_j w_j| * (e + gamma_{E+1} (|x| + e) + gamma64_E |x|).
    """
    x64 = x.to(torch.float64)
    cw = c.to(torch.float64)[ids] * weights.to(torch.float64)  # (BS, K)
    shared_c = c.to(torch.float64)[num_routed:]
    z = torch.zeros_like(x64)
    for k in range(ids.shape[1]):
        z = z + x64 * cw[:, k : k + 1]
    for cs in shared_c:
        z = z + x64 * cs
    slots = ids.shape[1] + shared_c.numel()
    gamma32 = (slots + 1) * U32 / (1 - (slots + 1) * U32)
    gamma64 = slots * U64 / (1 - slots * U64)
    amax = x64.abs().amax(dim=1, keepdim=True)
    e = amax / 127 * (0.5 + 2.0**-14)
    total_cw = cw.abs().sum(dim=1, keepdim=True) + shared_c.abs().sum()
    bound = total_cw * (e + gamma32 * (x64.abs() + e) + gamma64 * x64.abs())
    return z, bound


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=loop_cases())
def test_loop_matches_direct_computation(case: LoopCase) -> None:
    topology = RankTopology(case.num_attention_ranks, case.num_ffn_ranks, case.ffn_start_rank_id)
    layout = WindowLayout(
        case.num_attention_ranks,
        case.micro_batches,
        case.tokens,
        case.topk,
        case.shared,
        case.hidden,
        torch.float32,
        quant=case.quant_mode == QUANT_INT8,
    )
    table = build_expert_rank_table(
        topology, case.num_routed, case.shared, case.replicas, case.shared_expert_ranks
    )
    gen = torch.Generator().manual_seed(case.seed)
    c = expert_multipliers(case.num_routed + case.shared, gen)
    served: dict[int, int] = {}

    def expert(g: int, rows: torch.Tensor) -> torch.Tensor:
        served[g] = served.get(g, 0) + rows.shape[0]
        return rows * c[g]

    name = f"prop-loop-{uuid.uuid4().hex}"
    group = create_window_group(name, topology, layout, timeout_s=5.0)
    try:
        harness = Harness(group, table, case.num_routed, quant_mode=case.quant_mode)
        compared = 0
        expected: Counter[int] = Counter()  # rows each global expert must see
        for batch in case.messages():
            inputs = {}
            for msg in batch:
                for s in range(case.num_attention_ranks):
                    x = torch.randn(case.tokens, case.hidden, generator=gen)
                    if case.zero_rows:
                        x[(torch.arange(case.tokens) + msg.layer) % 3 == 0] = 0.0
                    ids = torch.rand(case.tokens, case.num_routed, generator=gen).argsort(1)
                    ids = ids[:, : case.topk].contiguous()
                    w = torch.rand(case.tokens, case.topk, generator=gen)
                    n = msg.active[s]
                    mask = torch.arange(case.tokens) < n
                    harness.send(s, msg.micro_batch, msg.layer, x, ids, mask)
                    inputs[msg.micro_batch, s] = (x, ids, w, n)
                    expected.update(ids[:n].flatten().tolist())
                    expected.update({g: n for g in range(case.num_routed, c.numel())})
            for _ in batch:
                for r in topology.ffn_ranks:
                    harness.serve(r, expert)
            for msg in batch:
                for s in range(case.num_attention_ranks):
                    x, ids, w, n = inputs[msg.micro_batch, s]
                    y = harness.combine(s, w, msg.layer)
                    assert y.shape == (case.tokens, case.hidden) and y.dtype == torch.float32
                    where = f"layer {msg.layer} micro-batch {msg.micro_batch} session {s}"
                    if case.quant_mode == QUANT_NONE:
                        want = direct_exact(x[:n], ids[:n], w[:n], c, case.num_routed)
                        assert torch.equal(y[:n], want), where
                    else:
                        z, bound = quant_error_bound(x[:n], ids[:n], w[:n], c, case.num_routed)
                        err = (y[:n].to(torch.float64) - z).abs()
                        worst = (err - bound).max().item() if n else 0.0
                        assert bool((err <= bound).all()), f"{where}: exceeds bound by {worst}"
                    compared += n
        # Every routed and shared slot of every active token reached its expert exactly once.
        assert served == {g: k for g, k in expected.items() if k}
        # The windows are back in their idle state: no flag or slot left behind.
        for r in topology.ffn_ranks:
            info, _ = group.ffn_views(r)
            assert int(info[:, :, 0].abs().sum()) == 0
            assert bool((info[:, :, 2:] >= 1_000_000).all())
        for r in topology.attention_ranks:
            info, _ = group.attn_views(r)
            assert int(info.abs().sum()) == 0
        assert compared == sum(sum(mask) for mask in case.masks)
    finally:
        destroy_window_group(name)
