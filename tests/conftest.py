"""Suite-wide pytest set-up: the `slow` marker, and what several vLLM modules share.

Tests marked `slow` (the full-size rows of the hardware team's golden grids, see
tests/test_golden_*.py, and the `vllm serve` scenarios) run with everything else, as CI
runs them; deselect them for a quick local run with `pytest -m "not slow"`.

`model`, `logs` and `colocated` are session-scoped: the colocated reference server runs
once for every module that compares against it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_scenarios import LOAD, LONG, Record, complete, concurrently, run_server, spread

from afd_dispatch.integrations.vllm.launch import Server
from afd_dispatch.tiny_hf import build_tiny_model


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: full-size golden rows (deselect: -m 'not slow')")


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
