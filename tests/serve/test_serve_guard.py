"""The Guard middleware under a real uvicorn server: an unexpected exception is a 500 with a request
id and nothing else, and the client's keep-alive connection stays usable."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from plural.serve.guard import Guard
from plural.serve.metrics import Metrics
from server import free_port


@pytest.fixture(scope="module")
def url():
    app = FastAPI()
    app.state.settings = SimpleNamespace(max_body_bytes=1000)
    app.state.metrics = Metrics()
    app.state.stopping = False
    app.state.in_flight = 0

    @app.get("/port")
    async def port(request: Request):  # the client's port: the same one means the same connection
        return {"port": request.scope["client"][1], "id": request.state.request_id}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret detail at /srv/plural/private")

    @app.post("/echo")
    async def echo(request: Request):
        return {"n": len(await request.body())}

    app.add_middleware(Guard, state=app.state)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    t.join(10)


def test_unexpected_exception_is_a_bare_500_and_keeps_the_connection(url, caplog):
    base, _ = url
    with httpx.Client(base_url=base) as http:
        first = http.get("/port").json()
        with caplog.at_level("ERROR", logger="plural.serve"):
            r = http.get("/boom")
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "internal_error"
        assert "secret" not in r.text and "/srv" not in r.text and "RuntimeError" not in r.text
        rid = r.headers["x-request-id"]
        assert rid in err["message"]
        assert rid in caplog.text and "secret detail" in caplog.text  # the operator's log has it all
        second = http.get("/port").json()
        assert second["port"] == first["port"]  # the same connection served the next request
        assert second["id"] != first["id"]


def test_body_limit_for_sized_and_chunked_bodies(url):
    base, _ = url
    assert httpx.post(base + "/echo", content=b"x" * 1000).json() == {"n": 1000}
    r = httpx.post(base + "/echo", content=b"x" * 1001)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks(n):
        for _ in range(n):
            yield b"x" * 100

    assert httpx.post(base + "/echo", content=chunks(10)).json() == {"n": 1000}
    assert httpx.post(base + "/echo", content=chunks(11)).status_code == 413


def test_refuses_new_requests_while_stopping(url):
    base, app = url
    app.state.stopping = True
    try:
        r = httpx.get(base + "/port")
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and r.headers["retry-after"]
    finally:
        app.state.stopping = False
