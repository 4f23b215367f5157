"""Configurations the runtime cannot follow are refused when the config is read.

Where the runtime can run here, a case first runs it (in-process windows, FFN workers in
threads, as `afd_threads` builds them) on a config the check used to accept, to show where
and how it fails, then shows `AFDConfig` refusing that config with the reason. The NPU
link's own refusals are shown in tests/test_npu_link_failures.py (emulated torch_npu); a
Ray address with a port no host has would only fail once a server joins the cluster.

`sync_flag` 1 (the filed bug): `npu_attention_to_ffn` then writes the header of a
micro-batch only to the FFN ranks that received at least one of its slots, while each FFN
rank's batching (`npu_ffn_worker_batching`) waits for a header from every attention rank,
micro-batch after micro-batch. An FFN rank that got nothing in micro-batch 0 waits for it
forever, and every later micro-batch routed to that rank times out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from afd_threads import config, counters_when_served, deployment, ffn_workers, receive_patiently

from afd_dispatch import AFDConfig, AFDInputError, AFDTimeoutError
from afd_dispatch.config import ReferenceBackendConfig
from afd_dispatch.fixtures.tiny_moe import ColocatedMoE, TinyMoEConfig, TinyMoEModel
from afd_dispatch.integrations.ray import FFNWorkerPool
from afd_dispatch.kernels import resolve_backend
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.experts import ExpertBank

H = 32
SHORT_WAIT_S = 2.0  # the deadline the stuck micro-batch runs into
PATIENCE_S = 15.0  # a busy host may take longer than SHORT_WAIT_S to run a healthy rank


def tiny(shared: bool) -> TinyMoEModel:
    return TinyMoEModel(
        TinyMoEConfig(
            vocab_size=16, hidden_size=H, num_layers=2, num_heads=2, num_experts=6, topk=2,
            moe_intermediate_size=16, shared_intermediate_size=24 if shared else 0,
            max_positions=8, seed=5,
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def routed_only() -> TinyMoEModel:
    """No shared expert: a token's slots go to its routed experts' ranks only."""
    return tiny(shared=False)


@pytest.fixture(scope="module")
def with_shared() -> TinyMoEModel:
    return tiny(shared=True)


def banks(model: TinyMoEModel) -> dict[int, ExpertBank]:
    return model.expert_banks(True)


def as_once_accepted(cfg: AFDConfig, **values: Any) -> AFDConfig:
    """`cfg` with `values` set past the checks: a config as the check used to accept it."""
    for name, value in values.items():
        object.__setattr__(cfg, name, value)
    return cfg


def hosted_by(dep: Deployment, rank: int) -> list[int]:
    """The routed experts FFN `rank` hosts."""
    return sorted(g for g in dep.hosted(rank).values() if g < dep.spec.num_experts)


# == sync_flag ==============================================================================
@pytest.mark.parametrize("sync_flag", [0, 1])
def test_sync_flag_1_leaves_an_ffn_rank_waiting_for_a_header(
    routed_only: TinyMoEModel, sync_flag: int
) -> None:
    """A = 1, F = 2, M = 2: micro-batch 0 routed to experts of FFN rank 0 only, micro-batch
    1 to experts of rank 1 only. With sync_flag 0 both come back right; with 1 rank 1 never
    gets micro-batch 0's header, so it never collects micro-batch 1 either."""
    model = routed_only
    cfg = config(1, 2, micro_batch_num=2, max_tokens_per_micro_batch=4, trace=True)
    cfg = as_once_accepted(cfg, sync_flag=sync_flag, wait_timeout_s=SHORT_WAIT_S)
    reference = ColocatedMoE(banks(model), 0, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(3, H, generator=g) for _ in range(2)]
    weights = torch.full((3, 2), 0.5)
    with (
        deployment(cfg, model.spec, torch.float32) as dep,
        ffn_workers(dep, lambda rank: banks(model)) as workers,
    ):
        ranks = list(dep.topology.ffn_ranks)
        ids = [torch.tensor([hosted_by(dep, r)[:2]] * 3, dtype=torch.int32) for r in ranks]
        assert set(hosted_by(dep, ranks[0])).isdisjoint(hosted_by(dep, ranks[1]))
        endpoint = AttentionEndpoint(dep, 0)
        layer = model.moe_layers[0]
        for slot in (0, 1):
            endpoint.send(slot, layer, x[slot], ids[slot], weights)
        got = receive_patiently(endpoint, 0, PATIENCE_S)  # rank 0 had all of micro-batch 0
        assert torch.equal(got, reference.moe(layer, x[0], ids[0], weights))
        if sync_flag == 0:
            got = receive_patiently(endpoint, 1, PATIENCE_S)
            assert torch.equal(got, reference.moe(layer, x[1], ids[1], weights))
            served = counters_when_served(workers, 2)
            assert [c["micro_batches_served_total"] for c in served] == [2, 2]
            return
        with pytest.raises(AFDTimeoutError):
            endpoint.receive(1)
        _, (rank1, rank1_thread) = workers
        # rank 1 is alive and still waiting for micro-batch 0, which it will never get
        assert rank1_thread.is_alive() and rank1_thread.error is None
        assert rank1.tracer.snapshot()[1].get("micro_batches_served_total", 0) == 0


def test_sync_flag_1_is_refused_naming_the_reason() -> None:
    """What the test above shows, refused when the config is read."""
    for make in (
        lambda: AFDConfig(num_attention_ranks=1, num_ffn_ranks=2, sync_flag=1),
        lambda: AFDConfig.from_json(
            '{"num_attention_ranks": 1, "num_ffn_ranks": 2, "micro_batch_num": 2, "sync_flag": 1}'
        ),
    ):
        with pytest.raises(AFDInputError) as refused:
            make()
        err = refused.value
        assert (err.argument, err.value) == ("sync_flag", 1)
        assert err.allowed.startswith("0 (")
        assert "header from every attention rank" in err.allowed
    assert AFDConfig(num_attention_ranks=1, num_ffn_ranks=2, sync_flag=0).sync_flag == 0


# == the reference section and window_groups against the backend ============================
def test_a_transport_the_reference_link_does_not_run_is_refused_when_built_in_code() -> None:
    """ "hccl" was a transport key of its own; now the reference section declares the
    reference link's windows only, so code cannot build the combination a link refuses
    (the NPU link with a reference transport: tests/test_npu_link_failures.py)."""
    with pytest.raises(AFDInputError) as refused:
        ReferenceBackendConfig(transport="hccl")  # type: ignore[arg-type]
    assert (refused.value.argument, refused.value.value) == ("reference.transport", "hccl")


@pytest.mark.parametrize(
    ("transport", "made"), [("auto", "shm"), ("shm", "shm"), ("inproc", "inproc")]
)
def test_the_windows_are_made_on_the_configs_transport(
    with_shared: TinyMoEModel, transport: str, made: str
) -> None:
    cfg = config(1, 2, reference=ReferenceBackendConfig(transport))  # a group of its own
    groups = Deployment(cfg, with_shared.spec, torch.float32).create_windows()
    try:
        assert [g.spec.transport for g in groups] == [made]
    finally:
        for g in groups:
            g.close()


def test_the_ray_pool_refuses_in_process_windows_before_any_actor(
    with_shared: TinyMoEModel, tmp_path: Path
) -> None:
    """Its actors attach from other processes: in-process windows would fail in each."""
    inproc = ReferenceBackendConfig(transport="inproc")
    dep = Deployment(config(1, 2, reference=inproc), with_shared.spec, torch.float32)
    groups = dep.create_windows()
    try:
        with pytest.raises(AFDInputError) as refused:
            FFNWorkerPool(dep, str(tmp_path), groups)
        assert (refused.value.argument, refused.value.value) == ("reference.transport", "inproc")
    finally:
        for g in groups:
            g.close()


BASE = '{"num_attention_ranks": 1, "num_ffn_ranks": 2, '
NPU = '"backend": "npu", "window_groups": "per_micro_batch", '


@pytest.mark.parametrize(
    ("keys", "argument", "shown"),
    [
        ('"backend": "reference", "transport": "hccl"', "transport", "hccl"),
        (NPU + '"reference": {"transport": "shm"}', "reference.transport", "shm"),
        (NPU + '"reference": {"transport": "inproc"}', "reference.transport", "inproc"),
        # the NPU link's own refusals: tests/test_npu_link_failures.py (section 5)
        ('"backend": "npu"', "window_groups", "shared"),
        ('"backend": "npu", "micro_batch_num": 1', "window_groups", "shared"),
    ],
    ids=["reference-hccl", "npu-shm", "npu-inproc", "npu-shared", "npu-shared-m1"],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:--afd-config key 'transport' is deprecated:FutureWarning")
def test_backend_combinations_the_links_refuse_are_refused_when_read(
    keys: str, argument: str, shown: str
) -> None:
    with pytest.raises(AFDInputError) as refused:
        AFDConfig.from_json(BASE + keys + "}")
    err = refused.value
    assert (err.argument, err.value) == (argument, shown)
    assert "with backend" in err.allowed, err.allowed


def test_auto_is_checked_as_the_backend_it_resolves_to_here() -> None:
    """As `Deployment` resolves it: "auto" is "npu" where torch_npu is installed."""
    here = resolve_backend("auto")
    if here == "npu":
        keys, argument, refused = '"reference": {"transport": "shm"}', "reference.transport", "shm"
    else:  # the old key: "hccl" only names the NPU link's windows
        keys, argument, refused = '"transport": "hccl"', "transport", "hccl"
    with pytest.raises(AFDInputError) as info, pytest.warns(FutureWarning, match="transport"):
        AFDConfig.from_json(BASE + keys + ', "window_groups": "per_micro_batch"}')
    assert (info.value.argument, info.value.value) == (argument, refused)
    assert f'"auto" is {here!r} on this host' in info.value.allowed


def test_backend_combinations_the_links_run_are_accepted() -> None:
    for keys in (
        '"backend": "reference", "reference": {"transport": "shm"}',
        '"backend": "reference", "reference": {"transport": "inproc"}, '
        '"window_groups": "per_micro_batch"',
        '"backend": "npu", "window_groups": "per_micro_batch"',
        '"backend": "npu", "reference": {"transport": "auto"}, "window_groups": "per_micro_batch"',
        '"backend": "npu", "window_groups": "per_micro_batch", "quant_mode": "int8"',
    ):
        AFDConfig.from_json(BASE + keys + "}")


# == shared_expert_ranks with shared_experts_on "attention" ===================================
def test_shared_expert_ranks_with_shared_experts_on_attention(with_shared: TinyMoEModel) -> None:
    """No FFN rank hosts a shared expert then, so the ranks the key reserves for them have
    nothing to host: the reference plan refused it blaming the model ("has no shared
    expert", though it has one), the NPU plan gave a whole FFN rank nothing but the null
    expert A3's combine needs (its output is zero)."""
    spec = with_shared.spec
    assert spec.num_shared_experts == 1

    def once_accepted(backend: str) -> AFDConfig:
        cfg = AFDConfig(num_attention_ranks=1, num_ffn_ranks=3, backend=backend)
        return as_once_accepted(cfg, shared_experts_on="attention", shared_expert_ranks=(2,))

    with pytest.raises(AFDInputError, match="when the model has no shared expert"):
        Deployment(once_accepted("reference"), spec, torch.float32)
    npu = Deployment(once_accepted("npu"), spec, torch.bfloat16)
    assert npu.null_shared_slot
    assert list(npu.hosted(2).values()) == [spec.num_experts]  # the null shared row, only

    with pytest.raises(AFDInputError) as refused:
        AFDConfig.from_json(BASE + '"shared_experts_on": "attention", "shared_expert_ranks": [1]}')
    err = refused.value
    assert (err.argument, err.value) == ("shared_expert_ranks", [1])
    assert 'empty with shared_experts_on "attention"' in err.allowed
    # either alone is fine
    AFDConfig.from_json(BASE + '"shared_experts_on": "attention"}')
    AFDConfig.from_json(BASE + '"shared_expert_ranks": [1]}')


# == role ======================================================================================
def test_role_ffn_changes_nothing_and_is_refused(with_shared: TinyMoEModel) -> None:
    """No part of the runtime reads `role`: the FFN actors are started by the attention
    side with its config, and a server given "ffn" would serve as the attention side.
    (afd-plugin's spelling of it in --additional-config was refused already.)"""
    attention = AFDConfig(num_attention_ranks=1, num_ffn_ranks=2)
    ffn = as_once_accepted(AFDConfig(num_attention_ranks=1, num_ffn_ranks=2), role="ffn")
    spec = with_shared.spec
    assert Deployment(ffn, spec).params() == Deployment(attention, spec).params()

    with pytest.raises(AFDInputError) as refused:
        AFDConfig.from_json(BASE + '"role": "ffn"}')
    assert (refused.value.argument, refused.value.value) == ("role", "ffn")
    assert "starts the FFN ranks itself" in refused.value.allowed


# == ray_address ===============================================================================
@pytest.mark.parametrize("address", ["10.0.0.1:65536", "h:0", "ray://h:70000"])
def test_ray_address_with_a_port_no_host_has_is_refused(address: str) -> None:
    """Ray would fail to connect only once the server starts its deployment."""
    with pytest.raises(AFDInputError) as refused:
        AFDConfig.from_json(BASE + f'"ray_address": "{address}"}}')
    assert (refused.value.argument, refused.value.value) == ("ray_address", address)
    assert "port 1..65535" in refused.value.allowed


@pytest.mark.parametrize(
    "address", ["auto", "local", "h:1", "10.0.0.1:65535", "ray://h", "ray://h:10001"]
)
def test_ray_address_accepted(address: str) -> None:
    assert AFDConfig.from_json(BASE + f'"ray_address": "{address}"}}').ray_address == address
