"""The outermost layer of every HTTP request: an id, the body-size limit, refusal while shutting
down, and the last word on errors.

A plain ASGI middleware rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware
relays every chunk of a stream through an extra in-memory channel. It sits inside Starlette's
ServerErrorMiddleware, so an unexpected exception stops here: the client gets a 500 that says only
"internal error" and the request id (the traceback goes to the server log under that id), and the
exception never reaches uvicorn, which closes the keep-alive connection of a request that raised
(the client's next request on it then fails).
"""

from __future__ import annotations

import json
import logging
import uuid

log = logging.getLogger("plural.serve")

# Paths that still answer while the server drains: health checks must see "stopping".
ALWAYS = ("/health", "/metrics")


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:20]


class Guard:
    def __init__(self, app, state):
        # state: the ServerState (settings, metrics, stopping, in_flight: HTTP requests not yet
        # answered in full, which the shutdown drain waits for)
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        async def answer(status: int, message: str, type_: str, code: str, headers: dict[str, str] = {}):
            body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
            self.state.metrics.requests.labels("", str(status)).inc()
            await send_with_id({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in headers.items())]})
            await send_with_id({"type": "http.response.body", "body": body})

        if self.state.stopping and scope["path"] not in ALWAYS:
            return await answer(503, "the server is shutting down", "server_error", "shutting_down",
                                {"Retry-After": "5"})
        limit = self.state.settings.max_body_bytes
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        too_large = f"request body is larger than {limit} bytes (max_body_bytes)"
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await answer(413, too_large, "invalid_request_error", "request_too_large")
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # A chunked body: read it here up to the limit, then hand it on as one message.
            body = b""
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > limit:
                    return await answer(413, too_large, "invalid_request_error", "request_too_large")
                if not message.get("more_body"):
                    break
            receive = _replay(body, receive)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s %s %s failed", rid, scope["method"], scope["path"])
            if not started:
                await answer(500, f"internal server error (request id {rid})", "server_error", "internal_error")
            # Else the response is under way; a stream reports its own errors as an SSE event.
        finally:
            self.state.in_flight -= 1


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real channel: a disconnect still reaches the app

    return replay
