"""The HTTP face of an AFD server's health: `/health`, and requests failed with a reason.

vLLM's engine must never die of an AFD fault (`server.AttentionServer.moe` reports it on
the deployment's health board and returns zeros), so the front end is where a fault
becomes visible. `AFDHealthMiddleware`, an ASGI middleware every API server process of an
AFD server runs (`install_middleware` adds it to vLLM's `--middleware` list):

- `GET /health` answers 503 with the reason while any FFN rank is not up (stalled,
  restarting, failed) or an attention session stopped exchanging; vLLM's own check
  decides otherwise.
- A request under `/v1/` while the deployment cannot serve (an FFN rank FAILED, a session
  broken) gets 503 at once, naming AFD, the rank and why.
- A request during which an attention session reported an AFD error gets 503 with that
  error instead of its (zero-filled, meaningless) result; a streamed one gets the error as
  its last event.

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
        self._looked = False

    def board(self) -> HealthBoard | None:
        # Looked up at the first request: the owner publishes the attachment when the
        # engines start, after vLLM built this app.
        if not self._looked:
            attachment = Attachment.from_env()
            if attachment is not None:
                self._looked = True
                self._board = attachment.health_board()
        return self._board

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        board = self.board() if scope["type"] == "http" else None
        if board is None:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == "/health":
            reason = board.unhealthy()
            if reason is None:
                await self.app(scope, receive, send)
            else:
                await _json(send, 503, f"AFD: {reason}", "/health")
            return
        if not path.startswith("/v1/") or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        failed = board.failed()
        if failed is not None:
            await _json(send, 503, f"AFD: the deployment cannot serve: {failed}", path)
            return
        await self._guarded(board, board.session_error_counts(), scope, receive, send)

    async def _guarded(
        self, board: HealthBoard, before: list[int], scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Run the request; replace its response if an AFD error was reported meanwhile."""
        start: Message | None = None
        body: list[bytes] = []
        streaming = False

        async def guarded_send(message: Message) -> None:
            nonlocal start, streaming
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
                error = _error_since(board, before) if last else None
                if error is not None:
                    event = json.dumps({"error": _error_body(503, error)})
                    await send(
                        {
                            "type": "http.response.body",
                            "body": f"data: {event}\n\n".encode(),
                            "more_body": True,
                        }
                    )
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
    failed = board.failed()
    if failed is not None:
        return f"AFD: the deployment failed during this request: {failed}"
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
