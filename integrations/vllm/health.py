"""The HTTP face of an AFD server's health: `/health`, and requests failed with a reason.

vLLM's engine must never die of an AFD fault (`server.AttentionServer.moe` reports it on
the deployment's health board and returns zeros), so the front end is where a fault
becomes visible. `AFDHealthMiddleware`, an ASGI middleware every API server process of an
AFD server runs (`install_middleware` adds it to vLLM's `--middleware` list):

- `/health` and `/ping` (SageMaker's) answer 503 with the reason while any FFN rank is
  not up (stalled, restarting, failed) or an attention session stopped exchanging;
  vLLM's own check decides otherwise.
- Every other request but a few that run no model (`PASS_THROUGH`: model list, metrics,
  version, tokenizer) gets 503 at once while the deployment cannot serve (an FFN rank
  FAILED, a session stopped), naming AFD, the rank and why.
- A request during which an attention session reported an AFD error gets 503 with that
  error instead of its (zero-filled, meaningless) result. A streamed one is cut: the error
  is its last event, sent in place of the chunk that would have followed (so before the
  stream's `[DONE]`).
- If the board cannot be mapped (a bad token in the environment), every guarded request
  and `/health` answer 503 saying so: nothing passes unguarded.

The board is found through the `Attachment` the deployment owner left in the environment.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from afd_dispatch.integrations.vllm.owner import Attachment
from afd_dispatch.runtime.health import HealthBoard

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
MIDDLEWARE = f"{__name__}.AFDHealthMiddleware"
HEALTH_PATHS = ("/health", "/ping")
PASS_THROUGH = ("/v1/models", "/metrics", "/version", "/tokenize", "/detokenize", "/load")


def install_middleware(args: Any) -> None:
    """Add the middleware to the parsed `vllm serve` arguments (idempotent)."""
    middleware = list(getattr(args, "middleware", None) or [])
    if MIDDLEWARE not in middleware:
        args.middleware = [*middleware, MIDDLEWARE]


class AFDHealthMiddleware:
    """See the module docstring. Without a deployment in the environment it passes all."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._board: HealthBoard | None = None
        self._board_error: str | None = None
        self._looked = False

    def board(self) -> HealthBoard | None:
        # Looked up at the first request: the owner publishes the attachment when the
        # engines start, after vLLM built this app.
        if not self._looked:
            attachment = Attachment.from_env()
            if attachment is not None:
                self._looked = True
                try:
                    self._board = attachment.health_board()
                except (OSError, ValueError) as exc:
                    self._board_error = f"AFD: the health board cannot be mapped: {exc}"
                    log.error("%s", self._board_error)
        return self._board

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        board = self.board()
        path = scope.get("path", "")
        if (board is None and self._board_error is None) or path in PASS_THROUGH:
            await self.app(scope, receive, send)
            return
        if board is None:
            assert self._board_error is not None
            await _json(send, 503, self._board_error, path)
            return
        if path in HEALTH_PATHS:
            reason = board.unhealthy()
            if reason is None:
                await self.app(scope, receive, send)
            else:
                await _json(send, 503, f"AFD: {reason}", path)
            return
        if board.cannot_serve():
            await _json(send, 503, f"AFD: the deployment cannot serve: {board.failed()}", path)
            return
        await self._guarded(board, board.session_error_counts(), scope, receive, send)

    async def _guarded(
        self, board: HealthBoard, before: list[int], scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Run the request; replace its response if an AFD error was reported meanwhile."""
        start: Message | None = None
        body: list[bytes] = []
        streaming = False
        cut = False  # a stream ended early with an AFD error: drop the rest

        async def guarded_send(message: Message) -> None:
            nonlocal start, streaming, cut
            kind = message["type"]
            if kind == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                streaming = b"text/event-stream" in headers.get(b"content-type", b"")
                if streaming:
                    await send(message)
                else:
                    start = message  # held until we know the result is real
                return
            if kind != "http.response.body":
                await send(message)
                return
            last = not message.get("more_body", False)
            if streaming:
                if cut:
                    return
                error = _error_since(board, before)
                if error is not None:  # this chunk and what follows may carry zeros' tokens
                    cut = True
                    event = json.dumps({"error": _error_body(503, error)})
                    await send(
                        {"type": "http.response.body", "body": f"data: {event}\n\n".encode()}
                    )
                    return
                await send(message)
                return
            body.append(bytes(message.get("body", b"")))
            if not last:
                return
            error = _error_since(board, before)
            if error is not None:
                await _json(send, 503, error, scope.get("path", ""))
            else:
                assert start is not None
                await send(start)
                await send({"type": "http.response.body", "body": b"".join(body)})

        await self.app(scope, receive, guarded_send)


def _error_since(board: HealthBoard, before: list[int]) -> str | None:
    """The AFD errors sessions reported since `before` (their counts), or None."""
    if board.cannot_serve():
        return f"AFD: the deployment failed during this request: {board.failed()}"
    after = board.session_error_counts()
    changed = [s for s, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    if not changed:
        return None
    errors = "; ".join(f"attention session {s}: {board.session(s).error}" for s in changed)
    return f"AFD: this request ran into an AFD error: {errors}"


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"message": message, "type": "ServiceUnavailableError", "param": None, "code": status}


async def _json(send: Send, status: int, message: str, path: str) -> None:
    log.warning("AFD: %s answered %d: %s", path, status, message)
    payload = json.dumps({"error": _error_body(status, message)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
