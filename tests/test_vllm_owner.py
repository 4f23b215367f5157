"""How data-parallel ranks join the one deployment their server owns (no vLLM server here).

1. An `Attachment` carries the owner's plan and window tokens: a rank with the same plan
   maps the owner's shared-memory windows (another process, real /dev/shm) and sees its
   bytes; a rank with another plan, or a window group the owner never made, is refused
   naming the difference, before anything is mapped; a malformed attachment names the
   variable.
2. Across nodes, the owner publishes the attachment as a named Ray actor; a launcher that
   joins the same Ray cluster (a separate `ray start --head` here) finds it; once the
   owner's process is gone the actor is gone too, and the lookup gives up at
   `startup_timeout_s` naming the deployment, the namespace and what starts it.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from ray_cluster import ray_env, ray_head, read_line

from afd_dispatch.config import AFDConfig
from afd_dispatch.errors import AFDHandshakeError, AFDInputError
from afd_dispatch.fixtures.tiny_hf import build_tiny_model
from afd_dispatch.integrations.vllm.owner import (
    ENV,
    NAMESPACE,
    Attachment,
)
from afd_dispatch.model.spec import MoESpec
from afd_dispatch.runtime.deployment import Deployment

A2F1 = {"num_attention_ranks": 2, "num_ffn_ranks": 1, "max_tokens_per_micro_batch": 8}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> MoESpec:
    path = tmp_path_factory.mktemp("owner") / "tiny"
    build_tiny_model("qwen3_moe", str(path), seed=0, dtype="float32")
    return MoESpec.from_pretrained(str(path))


def deployment(spec: MoESpec, **extra: object) -> Deployment:
    config = AFDConfig.from_dict({**A2F1, "backend": "reference", **extra})
    return Deployment(config, spec, torch.float32)


def read_through_attachment(text: str, spec: MoESpec, rank: int, n: int) -> bytes:
    """In another process: attach as session 1 would, read rank `rank`'s first n bytes."""
    groups, rendezvous = Attachment.from_json(text).attach(deployment(spec))
    assert rendezvous is None
    data = bytes(groups[0].window(rank)[:n].tolist())
    for group in groups:
        group.close()
    return data


# -- 1. attaching ------------------------------------------------------------------------------
def test_a_rank_attaches_to_the_owners_windows(spec: MoESpec) -> None:
    owner = deployment(spec)
    groups = owner.create_windows("shm")
    try:
        attachment = Attachment(
            owner_pid=1234,
            params=owner.params().to_dict(),
            windows={g.name: str(g.spec.token) for g in groups},
        )
        text = attachment.to_json()
        assert Attachment.from_json(text).to_json() == text
        pattern = torch.arange(64, dtype=torch.uint8) ^ 0x5A
        groups[0].window(2)[:64] = pattern  # the FFN rank's window
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            seen = pool.apply(read_through_attachment, (text, spec, 2, 64))
        assert seen == bytes(pattern.tolist())
    finally:
        for group in groups:
            group.close()


def test_a_rank_with_another_plan_is_refused_naming_the_fields(spec: MoESpec) -> None:
    owner = deployment(spec)
    attachment = Attachment(1234, owner.params().to_dict(), windows={"afd": "0" * 32})
    with pytest.raises(AFDHandshakeError) as refused:
        attachment.attach(deployment(spec, micro_batch_num=3))
    message = str(refused.value)
    assert "micro_batches: the deployment owner (pid 1234) has 2, this rank has 3" in message

    missing = dataclasses.replace(attachment, windows={"other": "0" * 32})
    with pytest.raises(AFDHandshakeError) as refused:
        missing.attach(deployment(spec))
    assert "made no window group 'afd' (it made ['other'])" in str(refused.value)


def test_an_npu_rank_gets_the_rendezvous_and_no_windows(spec: MoESpec) -> None:
    """On the NPU link HCCL owns the windows: the owner hands over where ranks meet."""
    npu = {"backend": "npu", "window_groups": "per_micro_batch"}
    owner = deployment(spec, **npu)
    attachment = Attachment(1234, owner.params().to_dict(), {}, ("10.0.0.7", 29500))
    groups, rendezvous = Attachment.from_json(attachment.to_json()).attach(deployment(spec, **npu))
    assert groups == [] and rendezvous is not None
    assert (rendezvous.host, rendezvous.port) == ("10.0.0.7", 29500)
    without = dataclasses.replace(attachment, rendezvous=None)
    with pytest.raises(AFDHandshakeError) as refused:
        without.attach(deployment(spec, **npu))
    assert "serves no rendezvous for the NPU link" in str(refused.value)


@pytest.mark.parametrize(
    "text", ["{", '{"owner_pid": 1}', '{"owner_pid": "x", "params": {}}', "[]", '"x"']
)
def test_a_malformed_attachment_names_the_variable(text: str) -> None:
    with pytest.raises(AFDInputError) as refused:
        Attachment.from_json(text)
    assert refused.value.argument == ENV


# -- 2. across nodes: the Ray cluster ------------------------------------------------------------
PUBLISHER = """
import sys
from afd_dispatch.config import AFDConfig
from afd_dispatch.integrations.ray import ensure_ray
from afd_dispatch.integrations.vllm.owner import Attachment, publish_attachment

address, group = sys.argv[1], sys.argv[2]
config = AFDConfig(num_attention_ranks=2, num_ffn_ranks=1, backend="npu",
                   group=group, ray_address=address)
ensure_ray(address)
directory = publish_attachment(config, Attachment(4321, {"tokens": 8}, {}, ("10.0.0.7", 29500)))
print("published", flush=True)
sys.stdin.read()  # until the test closes our stdin or kills us
"""


FINDER = """
import json, sys, time
from afd_dispatch.config import AFDConfig
from afd_dispatch.integrations.vllm.owner import find_attachment

address, group, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
config = AFDConfig(num_attention_ranks=2, num_ffn_ranks=1, backend="npu",
                   group=group, ray_address=address, startup_timeout_s=timeout)
start = time.monotonic()
try:
    print(json.dumps({"found": find_attachment(config).to_json()}))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                      "waited": time.monotonic() - start}))
"""


def find(address: str, group: str, timeout_s: float) -> dict[str, Any]:
    """`find_attachment` in another process that joins the cluster, as a headless node's
    launcher does."""
    out = subprocess.run(
        [sys.executable, "-c", FINDER, address, group, str(timeout_s)],
        capture_output=True, env=ray_env(), timeout=timeout_s + 120, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


@pytest.mark.ray
@pytest.mark.slow
def test_other_nodes_find_the_published_deployment(tmp_path: Path) -> None:
    group = f"dp{time.monotonic_ns() % 10**9}"
    stderr = tmp_path / "publisher.err"
    with ray_head() as address:
        with open(stderr, "wb") as err:
            publisher = subprocess.Popen(
                [sys.executable, "-c", PUBLISHER, address, group],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=ray_env(),
            )  # fmt: skip
        try:
            assert read_line(publisher, 120.0, stderr) == "published"
            found = find(address, group, 60.0)
        finally:
            publisher.kill()
            publisher.wait(timeout=30)
        # the directory actor belonged to the publisher: gone with it, the lookup times out
        late = find(address, group, 3.0)
    expected = Attachment(4321, {"tokens": 8}, {}, ("10.0.0.7", 29500))
    assert found == {"found": expected.to_json()}, found
    assert late["error"] == "AFDTimeoutError", late
    message = late["message"]
    assert f"no AFD deployment 'deployment.{group}' (Ray namespace '{NAMESPACE}')" in message
    assert "after 3 s (startup_timeout_s)" in message
    assert "data-parallel rank 0" in message
    assert 3.0 <= late["waited"] < 30.0
