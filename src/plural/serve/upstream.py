"""Front mode: plural's tenants, keys, 429s, timeouts and metrics in front of OpenAI-compatible
engines (vLLM, SGLang, llama.cpp's server, another `plural serve`), without a model in this process.

Each upstream is a `Replica`. A background task asks every replica for `/v1/models` each
`health_interval` seconds: that says whether it is up and which model ids it serves. A request
goes to a healthy replica that serves its model: for an adapter, preferably one that served that
adapter recently (so it is likely resident in one of its LoRA slots: S-LoRA's point that a
resident adapter costs nothing and a load costs a copy), else the least loaded one (ties: the one
picked least recently). A replica that refuses the connection is marked down at once and the
request tries the next one; nothing was sent, so nothing runs twice.

Streams are relayed chunk by chunk as they arrive (httpx's raw iterator, no buffering); only when
`model_map` renames a model are the events rewritten one by one. Errors from an upstream become
OpenAI-shaped errors from the front, with the upstream's address scrubbed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Counter, Gauge

from plural.serve import protocol as P
from plural.serve.serving import APIError, not_found
from plural.serve.settings import ServeSettings
from plural.serve.tenants import Tenant

log = logging.getLogger("plural.serve")


def parse_upstream(item: str, index: int) -> tuple[str, str]:
    """'URL' or 'NAME=URL' -> (name, base URL without a trailing /v1)."""
    name, sep, url = item.partition("=")
    if not sep or "://" in name:
        name, url = f"upstream-{index + 1}", item
    url = url.rstrip("/")
    return name, url.removesuffix("/v1")


@dataclass
class Replica:
    name: str
    url: str  # base URL: the routes are url + /v1/...
    key: str | None = None
    healthy: bool = False
    error: str | None = "not checked yet"
    in_flight: int = 0
    picked: int = 0  # when it was last picked (a counter): ties go to the one picked least recently
    models: dict[str, dict] = field(default_factory=dict)  # upstream model id -> its /v1/models card
    # adapters it served recently, most recent last: the affinity set (bounded like LoRA slots)
    recent: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def headers(self, request_id: str = "") -> dict[str, str]:
        h = {"X-Request-Id": request_id} if request_id else {}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    def scrub(self, text: str) -> str:
        """The upstream's address never reaches a client: replace every spelling of it by its name."""
        parts = urlsplit(self.url)
        for s in sorted({self.url, parts.netloc, parts.hostname or ""}, key=len, reverse=True):
            if s:
                text = text.replace(s, f"<{self.name}>")
        return text


class Upstreams:
    """The replicas, their health, routing, and the proxy. Lives at `ServerState.upstream`."""

    def __init__(self, settings: ServeSettings, metrics, replicas: list[Replica] | None = None, engine=None):
        self.settings = settings
        self.replicas = replicas if replicas is not None else [
            Replica(*parse_upstream(u, i), key=settings.upstream_key) for i, u in enumerate(settings.upstream)]
        self.engine = engine  # a managed engine process (vllm.VLLM) or None
        # front model id <-> upstream model id
        self.to_upstream = dict(settings.model_map)
        self.to_front = {v: k for k, v in settings.model_map.items()}
        self.metrics = metrics
        r = metrics.registry
        self.m_requests = Counter("plural_upstream_requests", "Requests sent to each upstream, by its answer's status.",
                                  ["upstream", "status"], registry=r)
        self.m_up = Gauge("plural_upstream_up", "1 if the upstream answered its last health check.", ["upstream"], registry=r)
        self.m_in_flight = Gauge("plural_upstream_in_flight", "Requests the front has open at each upstream.",
                                 ["upstream"], registry=r)
        self.client: httpx.AsyncClient | None = None
        self._task: asyncio.Task | None = None
        self._picks = 0

    # ---- lifecycle and health -------------------------------------------------------------------

    async def start(self) -> None:
        # 10 s for health checks and admin calls; a generation sets its own (request_timeout).
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=httpx.Limits(max_connections=None,
                                        max_keepalive_connections=64))
        await self.check_all()  # a managed engine was launched (and answered /health) in front_state
        self._task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.client is not None:
            await self.client.aclose()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            try:
                await self.check_all()
            except Exception:  # a bug here must not end health checking for good
                log.exception("upstream health check failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def check(self, r: Replica) -> None:
        """Up = `/v1/models` answers 200 with a model list; it also tells which ids the replica serves."""
        if self.engine is not None and (code := self.engine.exit_status()) is not None:
            self._mark_down(r, f"the engine process exited with status {code}")  # plural does not restart it
            return
        try:
            resp = await self.client.get(r.url + "/v1/models", headers=r.headers(), timeout=5.0)
            if resp.status_code != 200:
                raise _Down(f"/v1/models answered {resp.status_code}")
            cards = resp.json().get("data")
            if not isinstance(cards, list):
                raise _Down("/v1/models did not answer a model list")
            models = {c["id"]: c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str)}
        except (httpx.HTTPError, ValueError, _Down) as e:
            self._mark_down(r, _describe(e))
            return
        if not r.healthy:
            log.info("upstream %s is up (%d models)", r.name, len(models))
        r.models, r.healthy, r.error = models, True, None
        for gone in [m for m in r.recent if m not in models]:
            del r.recent[gone]
        self.m_up.labels(r.name).set(1)

    def _mark_down(self, r: Replica, why: str) -> None:
        if r.healthy or r.error != why:
            log.warning("upstream %s is down: %s", r.name, why)
        r.healthy, r.error = False, why
        self.m_up.labels(r.name).set(0)

    def health(self) -> tuple[dict, int]:
        ups = [{"name": r.name, "healthy": r.healthy, "in_flight": r.in_flight, "models": len(r.models),
                **({"error": r.error} if r.error else {})} for r in self.replicas]
        n = sum(r.healthy for r in self.replicas)
        status = "ok" if n == len(self.replicas) else ("degraded" if n else "unavailable")
        body = {"status": status, "mode": "front", "engine": self.settings.engine, "upstreams": ups}
        return body, 200 if n else 503

    # ---- models and routing ---------------------------------------------------------------------

    def front_id(self, upstream_id: str) -> str:
        return self.to_front.get(upstream_id, upstream_id)

    def upstream_id(self, front_id: str) -> str:
        return self.to_upstream.get(front_id, front_id)

    def cards(self, created: int) -> list[P.ModelCard]:
        """Every model id some replica serves (healthy or last known), as the front names it."""
        seen: dict[str, P.ModelCard] = {}
        for r in sorted(self.replicas, key=lambda r: not r.healthy):
            for uid, c in r.models.items():
                fid = self.front_id(uid)
                if fid in seen:
                    continue
                parent = c.get("parent")
                extra = c.get("plural") if isinstance(c.get("plural"), dict) else None
                # root (a path on the upstream's machine) stays there
                seen[fid] = P.ModelCard(id=fid, created=created, owned_by="plural",
                                        parent=self.front_id(parent) if isinstance(parent, str) else None, plural=extra)
        return list(seen.values())

    def knows(self, front_id: str) -> bool:
        if front_id in self.to_front and front_id not in self.to_upstream:
            return False  # an upstream name that model_map renames: only the front's name exists
        uid = self.upstream_id(front_id)
        return any(uid in r.models for r in self.replicas)

    def pick(self, uid: str, exclude: set[str] = frozenset()) -> Replica:
        serving = [r for r in self.replicas if uid in r.models and r.name not in exclude]
        up = [r for r in serving if r.healthy]
        if not up:
            names = ", ".join(f"{r.name} ({r.error})" for r in serving) or "none"
            raise APIError(503, f"no healthy upstream serves this model now (down: {names}); retry later",
                           type="server_error", code="upstream_unavailable",
                           headers={"Retry-After": str(max(1, round(self.settings.health_interval)))})
        free = [r for r in up if r.in_flight < self.settings.upstream_max_in_flight]
        if not free:
            raise APIError(429, f"every upstream for this model has {self.settings.upstream_max_in_flight} requests "
                                "open (upstream_max_in_flight). Retry later.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})
        warm = [r for r in free if uid in r.recent]
        r = min(warm or free, key=lambda r: (r.in_flight, r.picked))
        self._picks += 1
        r.picked = self._picks
        return r

    def _served(self, r: Replica, uid: str) -> None:
        if r.models.get(uid, {}).get("parent") is None:
            return  # the base: every replica has it loaded
        r.recent[uid] = None
        r.recent.move_to_end(uid)
        while len(r.recent) > self.settings.max_loras:
            r.recent.popitem(last=False)

    # ---- the proxy ------------------------------------------------------------------------------

    async def proxy(self, request: Request, t: Tenant, path: str, system_prompts: dict[str, str]) -> Response:
        """Forward one /v1 request (already validated by the route's model) to a replica."""
        body = json.loads(await request.body())
        model = body.get("model")
        request.state.model = model if isinstance(model, str) and self.knows(model) and t.allows(model) else ""
        if not request.state.model:
            raise not_found(str(model))
        uid = self.upstream_id(model)
        body["model"] = uid
        prompt = system_prompts.get(model)
        if prompt and path == "/v1/chat/completions" and not any(
                m.get("role") in ("system", "developer") for m in body.get("messages", [])):
            body["messages"] = [{"role": "system", "content": prompt}, *body["messages"]]
        if body.get("stream"):
            return await self._forward(request, path, body, model, uid, True)
        # Not streamed: if the client goes away first, drop the upstream request (closing its
        # connection is how vLLM and plural learn to stop generating).
        work = asyncio.create_task(self._forward(request, path, body, model, uid, False))
        gone = asyncio.create_task(_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            gone.cancel()
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        self.metrics.requests.labels(model, "499").inc()  # nginx's "client closed request"
        return Response(status_code=499)

    async def _forward(self, request: Request, path: str, body: dict, model: str, uid: str, stream: bool) -> Response:
        rid = getattr(request.state, "request_id", "")
        start = time.monotonic()
        deadline = start + self.settings.request_timeout
        tried: set[str] = set()
        while True:
            r = self.pick(uid, tried)
            r.in_flight += 1
            self.m_in_flight.labels(r.name).set(r.in_flight)
            try:
                req = self.client.build_request("POST", r.url + path, json=body, headers=r.headers(rid),
                                                timeout=httpx.Timeout(self.settings.request_timeout, connect=5.0))
                resp = await asyncio.wait_for(self.client.send(req, stream=True), max(0.01, deadline - time.monotonic()))
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                # Nothing reached the replica: mark it down and try another one.
                self._release(r)
                self._mark_down(r, _describe(e))
                tried.add(r.name)
            except (httpx.HTTPError, asyncio.TimeoutError) as e:
                self._release(r)
                raise self._transport_error(r, e) from None
            except asyncio.CancelledError:  # the client left
                self._release(r)
                raise
        self.m_requests.labels(r.name, str(resp.status_code)).inc()
        if resp.status_code != 200:
            try:
                raw = await resp.aread()
            finally:
                await resp.aclose()
                self._release(r)
            raise self._upstream_error(r, resp.status_code, raw, resp.headers, model)
        self._served(r, uid)
        if stream:
            return StreamingResponse(self._relay(request, r, resp, model, uid, deadline, start),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            raw = await asyncio.wait_for(resp.aread(), max(0.01, deadline - time.monotonic()))
        except (httpx.HTTPError, asyncio.TimeoutError) as e:
            raise self._transport_error(r, e) from None
        finally:
            await resp.aclose()
            self._release(r)
        try:
            out = json.loads(raw)
        except ValueError:
            raise APIError(502, f"upstream {r.name} answered something that is not JSON", type="server_error",
                           code="upstream_error") from None
        if isinstance(out, dict):
            if out.get("model") == uid:
                out["model"] = model
            self._count(model, out.get("usage"))
        self.metrics.latency.labels(model).observe(time.monotonic() - start)
        self.metrics.requests.labels(model, "200").inc()
        return JSONResponse(out)

    async def _relay(self, request: Request, r: Replica, resp: httpx.Response, model: str, uid: str,
                     deadline: float, start: float) -> AsyncIterator[bytes]:
        status = "200"
        rename = model != uid
        it = (resp.aiter_lines() if rename else resp.aiter_raw()).__aiter__()
        first = True
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(it.__anext__(), max(0.01, deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                if first:
                    self.metrics.ttft.labels(model).observe(time.monotonic() - start)
                    first = False
                yield _rename_line(chunk, uid, model) if rename else chunk
        except (httpx.HTTPError, asyncio.TimeoutError) as e:
            # The response is under way: end the stream with an error event, as plural's engine does.
            err = self._transport_error(r, e)
            status = str(err.status)
            yield ("\n\ndata: " + json.dumps(err.body()) + "\n\ndata: [DONE]\n\n").encode()
        finally:
            await resp.aclose()
            self._release(r)
            self.metrics.latency.labels(model).observe(time.monotonic() - start)
            self.metrics.requests.labels(model, status).inc()

    def _release(self, r: Replica) -> None:
        r.in_flight -= 1
        self.m_in_flight.labels(r.name).set(r.in_flight)

    def _count(self, model: str, usage: Any) -> None:
        if isinstance(usage, dict):
            self.metrics.prompt_tokens.labels(model).inc(usage.get("prompt_tokens") or 0)
            self.metrics.generation_tokens.labels(model).inc(usage.get("completion_tokens") or 0)

    def _transport_error(self, r: Replica, e: Exception) -> APIError:
        if isinstance(e, (asyncio.TimeoutError, httpx.TimeoutException)):
            return APIError(503, f"request timed out after {self.settings.request_timeout:g} s (request_timeout)",
                            type="server_error", code="timeout", headers={"Retry-After": "1"})
        # The connection broke midway (the replica died, or closed it): next health check decides.
        self._mark_down(r, _describe(e))
        return APIError(503, f"upstream {r.name} failed during the request; retry later", type="server_error",
                        code="upstream_unavailable",
                        headers={"Retry-After": str(max(1, round(self.settings.health_interval)))})

    def _upstream_error(self, r: Replica, status: int, raw: bytes, headers, model: str) -> APIError:
        """An upstream's error answer as the front's own OpenAI-shaped error (address scrubbed)."""
        message, type_, param, code = _error_fields(raw)
        message = r.scrub(message or f"status {status}")
        if status == 404 and (code in (None, "model_not_found", "not_found", 404) or "model" in message.lower()):
            return not_found(model)
        if status in (400, 404, 413, 422):
            return APIError(400 if status == 422 else status, message, type=type_ or "invalid_request_error",
                            param=param, code=code if isinstance(code, str) else None)
        if status == 429:
            return APIError(429, message, type="rate_limit_error", code=code if isinstance(code, str) else "rate_limited",
                            headers={"Retry-After": headers.get("retry-after", "1")})
        if status in (401, 403):
            return APIError(502, f"upstream {r.name} refused the front's credentials (upstream_key)",
                            type="server_error", code="upstream_auth")
        if status == 503:
            return APIError(503, message, type="server_error", code=code if isinstance(code, str) else "upstream_unavailable",
                            headers={"Retry-After": headers.get("retry-after", "2")})
        return APIError(502, f"upstream {r.name} failed (status {status}): {message}", type="server_error",
                        code="upstream_error")

    # ---- admin (a managed engine only) ----------------------------------------------------------

    def _managed(self):
        if self.engine is None:
            raise APIError(400, "this front server does not manage its upstreams' adapters: load them on the "
                                "upstream servers (the admin API here works with --engine vllm)",
                           code="admin_unavailable")
        return self.engine

    async def admin_list(self) -> list[P.AdapterInfo]:
        eng = self._managed()
        return [P.AdapterInfo(name=a.name, path=str(a.source), rank=a.rank, resident=True, running=0)
                for a in eng.adapters.values()]

    async def admin_load(self, name: str, path: str) -> P.AdapterInfo:
        a = await self._managed().load(self, name, path)
        await self.check_all()  # the new id is routable at once
        return P.AdapterInfo(name=a.name, path=str(a.source), rank=a.rank, resident=True, running=0)

    async def admin_unload(self, name: str) -> dict:
        await self._managed().unload(self, name)
        await self.check_all()
        return {"id": name, "object": "model", "deleted": True}


class _Down(Exception):
    pass


def _describe(e: Exception) -> str:
    """Why a replica is down, in words that name no address."""
    if isinstance(e, _Down):
        return str(e)
    if isinstance(e, httpx.ConnectError):
        return "connection refused"
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.HTTPError):
        return "connection failed (" + type(e).__name__ + ")"
    return "bad answer (" + type(e).__name__ + ")"


def _error_fields(raw: bytes) -> tuple[str | None, str | None, str | None, Any]:
    """(message, type, param, code) from OpenAI's {"error": {...}}, vLLM's flat {"message", "type",
    "code"} (older versions), or FastAPI's {"detail": ...}."""
    try:
        body = json.loads(raw)
    except ValueError:
        return (raw.decode("utf-8", "replace")[:500] or None), None, None, None
    if not isinstance(body, dict):
        return None, None, None, None
    e = body.get("error") if isinstance(body.get("error"), dict) else body
    msg = e.get("message") or e.get("detail")
    if not isinstance(msg, str):
        msg = json.dumps(msg)[:500] if msg is not None else None
    typ = e.get("type") if isinstance(e.get("type"), str) else None
    param = e.get("param") if isinstance(e.get("param"), str) else None
    return msg, typ, param, e.get("code")


def _rename_line(line: str, uid: str, model: str) -> bytes:
    """One SSE line with the upstream's model name replaced by the front's (model_map)."""
    if line.startswith("data: {"):
        try:
            obj = json.loads(line[6:])
            if obj.get("model") == uid:
                obj["model"] = model
                line = "data: " + json.dumps(obj, separators=(",", ":"))
        except ValueError:
            pass
    return (line + "\n").encode()


def front_state(settings: ServeSettings):
    """The ServerState of a front server: keys, metrics and the upstreams; no model, no engine."""
    from pathlib import Path

    from plural.errors import PluralError
    from plural.serve.metrics import Metrics
    from plural.serve.state import ServerState
    from plural.serve.tenants import Keys

    if settings.engine == "vllm" and settings.upstream:
        raise PluralError("--engine vllm starts its own upstream: drop --upstream (or drop --engine vllm)")
    if settings.share.adapters:
        raise PluralError("share.adapters: a front server holds no adapter files; share them from the upstream servers")
    if settings.require_signed and settings.engine != "vllm":
        raise PluralError("--require-signed: a front server does not see its upstreams' adapters; set it on the upstreams")
    metrics = Metrics()
    engine = None
    replicas = None
    base_id = ""
    if settings.engine == "vllm":
        from plural.serve.vllm import VLLM

        engine = VLLM(settings)
        engine.prepare()
        engine.launch()
        replicas = [Replica("vllm", engine.url, key=engine.key)]
        base_id = engine.base_id
    elif settings.adapters:
        raise PluralError("--adapter: a front server loads no adapters; register them on the upstream servers")
    state = ServerState(settings=settings, keys=Keys(settings.api_keys, settings.admin_key), metrics=metrics,
                        tokenizer=None, base_id=base_id, base_path=Path(), created=int(time.time()), engine=None,
                        system_prompts=dict(settings.system_prompts), register_adapter=_no_register)
    state.upstream = Upstreams(settings, metrics, replicas, engine)
    return state


def _no_register(name: str, ref: str, confined: bool):
    raise APIError(400, "a front server registers no adapters itself", code="admin_unavailable")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
