"""The HTTP face of AFD faults (`integrations/vllm/health.py`) on a real Starlette app.

The middleware wraps a small ASGI app with the routes it treats differently (a JSON
completion, a streamed one, `/health`, `/ping`, `/v1/models`), over a real shared-memory
health board found through `AFD_ATTACHMENT`, as in `vllm serve`:

- a healthy board passes everything through untouched;
- FFN ranks not up: `/health` and `/ping` answer 503 naming AFD and the rank;
- a rank FAILED: every model request 503 at once, naming it; the model list still answers;
- a session error reported while a request runs: a JSON response becomes 503 with that
  error; a stream is cut with the error as its last event, before `[DONE]`;
- an attachment whose board token is malformed: 503, never unguarded. (A well-formed
  token whose file is absent means the board is on another host, an NPU deployment
  across nodes: that front end passes requests through.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest
import torch
from afd_threads import config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from afd_dispatch.fixtures.tiny_moe import TinyMoEConfig, TinyMoEModel
from afd_dispatch.integrations.vllm.health import AFDHealthMiddleware
from afd_dispatch.integrations.vllm.owner import ENV, Attachment
from afd_dispatch.runtime.deployment import Deployment
from afd_dispatch.runtime.health import HealthBoard, RankState


@pytest.fixture
def board(monkeypatch: pytest.MonkeyPatch) -> Iterator[HealthBoard]:
    """A shared-memory board of A = 1, F = 2, published as the owner publishes it."""
    dep = Deployment(config(1, 2), TinyMoEModel(TinyMoEConfig()).spec, torch.float32)
    made = HealthBoard.create(dep.topology, "shm")
    for rank in dep.topology.ffn_ranks:
        made.set_state(rank, RankState.UP, 0, answered=True)
    attachment = Attachment(owner_pid=0, params=dep.params().to_dict(), health=made.token)
    monkeypatch.setenv(ENV, attachment.to_json())
    try:
        yield made
    finally:
        made.close()


def client(board: HealthBoard) -> TestClient:
    async def completion(request: Request) -> Response:
        if request.query_params.get("fault"):  # the forward hit an AFD error meanwhile
            board.report_session_error(0, "AFDTimeoutError: late", broken=True)
        return JSONResponse({"choices": [{"text": "zeros' tokens"}]})

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'data: {"text": "one"}\n\n'
            await asyncio.sleep(0)
            board.report_session_error(0, "AFDPeerError: FFN rank 1 failed", broken=True)
            yield b'data: {"text": "garbage"}\n\n'
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route("/v1/completions", completion, methods=["POST"]),
            Route("/v1/stream", stream, methods=["POST"]),
            Route("/invocations", completion, methods=["POST"]),
            Route("/health", ok),
            Route("/ping", ok, methods=["GET", "POST"]),
            Route("/v1/models", ok),
        ]
    )
    return TestClient(AFDHealthMiddleware(app))


def error_of(response: Response | object) -> str:
    return str(json.loads(response.text)["error"]["message"])  # type: ignore[attr-defined]


def test_a_healthy_board_passes_everything_through(board: HealthBoard) -> None:
    http = client(board)
    assert http.get("/health").text == "ok"
    response = http.post("/v1/completions", json={})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "zeros' tokens"
    streamed = http.post("/v1/stream", json={})  # the stream reports no error before its end
    assert streamed.status_code == 200


def test_health_and_ping_say_503_while_a_rank_is_down(board: HealthBoard) -> None:
    board.set_state(1, RankState.RESTARTING, 1, "killed after no answer for 8.0 s")
    http = client(board)
    for path in ("/health", "/ping"):
        response = http.get(path)
        assert response.status_code == 503
        assert "AFD: FFN rank 1 restarting" in error_of(response)
        assert "killed after no answer" in error_of(response)
    board.set_state(1, RankState.UP, 1, answered=True)
    assert http.get("/health").status_code == 200  # healthy again once it is back


def test_a_failed_rank_fails_model_requests_at_once(board: HealthBoard) -> None:
    board.set_state(0, RankState.FAILED, 3, "Ray will not restart it (ffn_max_restarts 3, 3 used)")
    http = client(board)
    for path in ("/v1/completions", "/invocations"):
        response = http.post(path, json={})
        assert response.status_code == 503
        message = error_of(response)
        assert message.startswith("AFD: the deployment cannot serve: FFN rank 0 failed")
        assert "ffn_max_restarts 3" in message
    assert http.get("/v1/models").status_code == 200  # runs no model


def test_a_request_that_ran_into_an_afd_error_gets_the_error(board: HealthBoard) -> None:
    response = client(board).post("/v1/completions?fault=1", json={})
    assert response.status_code == 503
    assert "zeros' tokens" not in response.text
    assert "attention session 0 stopped exchanging: AFDTimeoutError: late" in error_of(response)


def test_a_stream_is_cut_before_done_with_the_error(board: HealthBoard) -> None:
    response = client(board).post("/v1/stream", json={})
    events = [line for line in response.text.split("\n\n") if line]
    assert events[0] == 'data: {"text": "one"}'
    assert len(events) == 2 and "garbage" not in response.text and "[DONE]" not in response.text
    last = json.loads(events[1].removeprefix("data: "))
    assert last["error"]["code"] == 503
    assert "FFN rank 1 failed" in last["error"]["message"]


def test_a_board_that_cannot_be_mapped_guards_everything(
    board: HealthBoard, monkeypatch: pytest.MonkeyPatch
) -> None:
    attachment = Attachment.from_env()
    assert attachment is not None
    bad = Attachment(attachment.owner_pid, attachment.params, health="../../etc/passwd")
    monkeypatch.setenv(ENV, bad.to_json())
    http = client(board)
    for response in (http.get("/health"), http.post("/v1/completions", json={})):
        assert response.status_code == 503
        assert error_of(response).startswith("AFD: the health board cannot be mapped")
