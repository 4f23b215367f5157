"""An FFN rank names each batch's layer from a session that is in the batch.

Session 0 routes only to FFN rank 0, session 1 to FFN rank 1. Once rank 1 has batched
layer 0 (its flags cleared), session 0, which needs nothing from rank 1, may receive layer
0 from rank 0 and send layer 1 everywhere, overwriting its header in rank 1's window before
rank 1 looked. The layer word of session 0's row then says 1; that of session 1 (whose rows
rank 1 holds, and which cannot send again before rank 1 answers) still says 0.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch
from npu_emulator_fixture import emulated_torch_npu

from afd_dispatch import AFDConfig
from afd_dispatch.kernels import npu as npu_ops
from afd_dispatch.layout import LAYER_OFFSET
from afd_dispatch.link import attention_link, ffn_link
from afd_dispatch.link.npu import serve_rendezvous
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.deployment import Deployment

H, BS = 1024, 2


@pytest.fixture
def torch_npu(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    with emulated_torch_npu(monkeypatch) as module:
        yield module


def test_the_layer_comes_from_a_session_in_the_batch(torch_npu: ModuleType) -> None:
    spec = MoESpec(
        architecture="qwen3_moe", hidden_size=H, num_layers=2, moe_layers=(0, 1),
        num_experts=4, topk=1, moe_intermediate_size=16, dtype=torch.bfloat16,
    )  # fmt: skip
    cfg = AFDConfig(
        num_attention_ranks=2, num_ffn_ranks=2, backend="npu",
        window_groups="per_micro_batch", micro_batch_num=1, max_tokens_per_micro_batch=BS,
        startup_timeout_s=20, wait_timeout_s=10,
    )  # fmt: skip
    dep = Deployment(cfg, spec, torch.bfloat16)
    rendezvous, store = serve_rendezvous()
    links: dict[tuple[str, int], Any] = {}

    def make(key: tuple[str, int]) -> None:
        role, i = key
        links[key] = (
            attention_link(dep, i, rendezvous=rendezvous)
            if role == "a"
            else ffn_link(dep, i, rendezvous=rendezvous)
        )

    keys = [("a", 0), ("a", 1), ("f", 0), ("f", 1)]
    threads = [threading.Thread(target=make, args=(k,), daemon=True) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(links) == sorted(keys)
    a0, a1, f0, f1 = (links[k] for k in keys)
    hosted = {r: set(dep.hosted(r).values()) for r in (0, 1)}
    only_rank0 = min(hosted[0] - {spec.num_experts})  # a routed expert rank 0 hosts
    only_rank1 = min(hosted[1] - {spec.num_experts})

    def send(link: Any, layer: int, expert: int) -> None:
        x = torch.randn(1, BS, H).to(torch.bfloat16)
        ids = torch.full((1, BS, 1), expert, dtype=torch.int32)
        link.send(0, layer, x, ids, torch.ones(1, BS, dtype=torch.bool))

    send(a0, 0, only_rank0)
    send(a1, 0, only_rank1)
    batch0 = f0.collect(0)
    capacity = len(batch0.handle[0])  # Y = A * BS * E rows
    f0.give_back(0, batch0, torch.zeros(capacity, H, dtype=torch.bfloat16))
    # rank 1 batches layer 0 ...
    slot = f1._slots[0]
    out = npu_ops.npu_ffn_worker_batching(
        slot.ctx, f1.expert_num, f1._max_out, token_dtype=f1._token_dtype, need_schedule=1
    )
    sessions, count = out[2], int(out[-1][0])
    assert count > 0 and set(sessions[:count].tolist()) == {1}
    # ... while session 0, done with layer 0 (rank 0 answered it all), sends layer 1
    assert 0 in set(batch0.handle[0][: batch0.count].tolist())  # session 0 used rank 0
    a0.receive(0, 0, torch.ones(BS, 1))
    send(a0, 1, only_rank0)
    words = slot.window[: 4 * f1._info_width * 2].view(torch.int32)
    assert int(words[LAYER_OFFSET]) == 1  # session 0's header: already the next layer
    assert f1.batch_layer(0, sessions, count) == 0  # the batch's own layer
    del store
