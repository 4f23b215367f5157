"""FFN ranks as Ray actors over the NPU link, on the torch_npu + HCCL emulator.

The driver is the attention side (two sessions, one thread each); two FFN actors set up
their communicators with it at a TCP rendezvous the driver serves, and the decode equals
the colocated model bit for bit. Ray runs here with the emulator on its workers' path.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from npu_ranks import EMULATOR
from test_npu_link_emulated import MODEL, PROMPT_LEN, STEPS, config_json, prompts
from test_runtime_decode import Int8Inputs

from afd_dispatch import AFDConfig
from afd_dispatch.fixtures.tiny_moe import ColocatedMoE, TinyMoEModel, decode
from afd_dispatch.integrations.ray import FFNWorkerPool
from afd_dispatch.link import attention_link
from afd_dispatch.link.npu import serve_rendezvous
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.attention import AttentionEndpoint
from afd_dispatch.runtime.deployment import Deployment

pytestmark = [pytest.mark.ray, pytest.mark.slow]

JOIN_S = 120.0


@pytest.fixture(scope="module")
def emulated_ray() -> Iterator[None]:
    """A Ray of this module's own whose workers import the emulator as torch_npu, and the
    emulator on this process's path; both undone afterwards."""
    import ray

    assert not ray.is_initialized()
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join([EMULATOR, tests, os.environ.get("PYTHONPATH", "")])
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    sys.path.insert(0, EMULATOR)
    try:
        yield
    finally:
        sys.path.remove(EMULATOR)
        ray.shutdown()
        from torch_npu._C._distributed_c10d import close_all

        close_all()
        for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
            del sys.modules[name]


@pytest.mark.parametrize("quant_mode", ["none", "int8"])
def test_ffn_actors_over_the_npu_link_decode_like_colocated(
    emulated_ray: None, tmp_path: Path, quant_mode: str
) -> None:
    model = TinyMoEModel(MODEL)
    model.save_pretrained(tmp_path)
    config = AFDConfig.from_json(config_json("npu", quant_mode=quant_mode))
    deployment = Deployment(config, MoESpec.from_pretrained(tmp_path), torch.bfloat16)
    rendezvous, store = serve_rendezvous()
    sessions = prompts()
    outputs: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def attend(s: int) -> None:
        try:
            link = attention_link(deployment, s, rendezvous=rendezvous)
            endpoint = AttentionEndpoint(deployment, s, link=link)
            outputs[s] = decode(model, endpoint, sessions[s], STEPS, deployment.micro_batches)
        except BaseException as exc:  # the test reports it
            errors.append(exc)

    with FFNWorkerPool(deployment, str(tmp_path), [], rendezvous=rendezvous) as pool:
        threads = [threading.Thread(target=attend, args=(s,), daemon=True) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_S)
        assert not any(t.is_alive() for t in threads), "an attention session hung"
        info = pool.info()
    del store
    assert errors == [], errors
    assert all(i["error"] is None and i["serving"] for i in info.values()), info
    moe = ColocatedMoE(model.expert_banks(True), model.spec.num_shared_experts, torch.bfloat16)
    colocated = Int8Inputs(moe) if quant_mode == "int8" else moe  # int8: q * scale inputs
    for s, p in enumerate(sessions):
        want = decode(model, colocated, p, STEPS, deployment.micro_batches)
        assert len(outputs[s]) == PROMPT_LEN + STEPS
        for step, (g, w) in enumerate(zip(outputs[s], want, strict=True)):
            assert torch.equal(g, w), f"session {s} step {step}"
