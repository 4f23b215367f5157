"""Suite-wide pytest set-up: the markers, and what several vLLM modules share.

Markers (`MARKERS`): `e2e` starts `vllm serve` (a server, or the command refusing a
config); `ray` starts a Ray of its own outside a server; `slow` takes more than about ten
seconds on a 2-core host (the servers, the Ray modules, the full-size rows of the hardware
team's golden grids, see tests/test_golden_*.py). CI runs everything; the quick local run
is `pytest -m "not e2e and not slow"`.

`model`, `logs` and `colocated` are session-scoped: the colocated reference server runs
once for every module that compares against it. `local_ray` and `tiny` are module-scoped:
each Ray module starts one local Ray and saves one tiny checkpoint for all its tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray_cluster
from vllm_scenarios import LOAD, LONG, Record, complete, concurrently, run_server, spread

from afd_dispatch.fixtures.tiny_hf import build_tiny_model
from afd_dispatch.fixtures.tiny_moe import TinyMoEConfig, TinyMoEModel
from afd_dispatch.integrations.vllm.launch import Server

MARKERS = {
    "e2e": "starts `vllm serve` (deselect: -m 'not e2e')",
    "ray": "starts a Ray of its own, outside a vLLM server (deselect: -m 'not ray')",
    "slow": "over about 10 s on a 2-core host (deselect: -m 'not slow')",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Qwen3-MoE checkpoint (float32, random weights, built offline)."""
    path = tmp_path_factory.mktemp("dp") / "tiny-qwen3_moe"
    build_tiny_model("qwen3_moe", str(path), seed=0, dtype="float32")
    return str(path)


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def colocated(vllm_model: str, logs: Path) -> dict[str, list[int]]:
    """The reference: a colocated DP = 1 server's tokens of every prompt."""

    def scenario(server: Server, record: Record) -> None:
        record.tokens = concurrently(server, spread())
        record.tokens["long"] = complete(server, LONG)
        record.tokens |= {f"decode/{k}": v for k, v in concurrently(server, spread(LOAD)).items()}

    tokens = run_server(vllm_model, logs / "colocated.log", None, (), scenario).tokens
    assert len({tuple(t) for t in tokens.values()}) == len(tokens)  # the prompts differ
    return tokens


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for all of a module's tests: starting one costs seconds."""
    with ray_cluster.local_ray():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyMoEModel, Path]:
    """The tiny model (8 experts, shared expert, 3 MoE layers) and its checkpoint dir."""
    model = TinyMoEModel(TinyMoEConfig())
    path = tmp_path_factory.mktemp("tiny_moe")
    model.save_pretrained(path)
    return model, path
