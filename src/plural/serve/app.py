"""`create_app(settings)`: the FastAPI server. All state lives in one typed `ServerState` at
`app.state.server` (state.py); nothing is global. The engine owns the model on its own thread;
`Serving` turns requests into sequences and events into OpenAI objects.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plural.errors import PluralError
from plural.serve.engine import Engine
from plural.serve.guard import Guard
from plural.serve.metrics import Metrics
from plural.serve.registry import confine, make_adapter
from plural.serve.routes import router
from plural.serve.serving import APIError, Serving
from plural.serve.settings import ServeSettings
from plural.serve.state import ServerState
from plural.serve.tenants import Keys

DEFAULT_MAX_LEN = 2048


def pick_dtype(name: str, device):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 matmuls are fast only where the CPU has native bf16 (AVX512-BF16 / AMX); else fp32.
    from plural.cpu import cpu_info

    return torch.bfloat16 if cpu_info().fast_bf16 else torch.float32


def prefill_budget(settings: ServeSettings, device) -> int:
    """Prompt tokens per prefill step: the setting, else by device. Measured with serve_bench (16
    concurrent, kernels capped to AVX2, fp32): a budget of 512 gave TTFT p50 1.09 s, 192 gave 0.79 s
    at the same aggregate tok/s (137 against 138); a CPU with native bf16 prefills about 5x faster
    (profile_step; its serve table had TTFT p50 0.40 s with no budget at all); a GPU takes the
    whole burst."""
    if settings.max_prefill_tokens is not None:
        return settings.max_prefill_tokens
    if device.type == "cuda":
        return 8192
    from plural.cpu import cpu_info

    return 512 if cpu_info().fast_bf16 else 192


def build_state(settings: ServeSettings) -> ServerState:
    if settings.front:  # upstream engines answer; no model in this process (serve/upstream.py)
        from plural.serve.upstream import front_state

        return front_state(settings)
    import torch

    from plural.store.models import load_model
    from plural.store.paths import adapters_dir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = None
    if settings.require_signed:
        from plural.share.trust import load_policy

        policy = load_policy(settings.require_signed)
    model, tok, stored = load_model(settings.model)
    ctx = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LEN
    max_len = min(settings.max_model_len or min(ctx, DEFAULT_MAX_LEN), ctx)
    metrics = Metrics()
    engine = Engine(model, tok, max_batch=settings.max_batch, max_len=max_len, max_queue=settings.max_queue,
                    max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
                    cache_bytes=int(settings.adapter_cache_mb * 2**20), dtype=pick_dtype(settings.dtype, device),
                    device=device, threads=settings.threads, metrics=metrics, quantize=settings.quantize,
                    runner=settings.runner, max_prefill_tokens=prefill_budget(settings, device))
    roots = [adapters_dir(), *(Path(d) for d in settings.adapter_dirs)]
    info: dict[str, dict] = {}

    def register_adapter(name: str, ref: str, confined: bool):
        from plural.share.signing import adapter_digest

        # Admin-API paths must lie in the store or adapter_dirs; the operator's own --adapter flags need not.
        path = confine(ref, roots) if confined else ref
        a = make_adapter(name, path, stored, engine.runner, settings.max_lora_rank, roots if confined else None)
        if a.nbytes > engine.cache_bytes:
            raise PluralError(f"adapter {a.path} ({a.nbytes / 2**20:.1f} MiB) is larger than adapter_cache_mb "
                              f"({settings.adapter_cache_mb:g}); raise adapter_cache_mb")
        about = {"digest": adapter_digest(a.path)}
        if policy is not None:
            from plural.share.trust import require_trusted

            signer = require_trusted(a.path, policy)
            about.update(signer=signer.signer, signed_name=signer.name, version=signer.version)
        info[name] = about
        return a

    state = ServerState(settings=settings, keys=Keys(settings.api_keys, settings.admin_key), metrics=metrics,
                        tokenizer=tok, base_id=stored.name, base_path=stored.path, created=int(time.time()),
                        engine=engine, system_prompts=dict(settings.system_prompts), register_adapter=register_adapter,
                        adapter_info=info)
    for name, ref in settings.adapters.items():
        if name == stored.name:
            raise PluralError(f"adapter name {name!r} is the base model's id; pick another name")
        engine.add_adapter(register_adapter(name, ref, False))
    state.serving = Serving(state)
    return state


def create_app(settings: ServeSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.server.upstream is not None:  # front mode: health checks, then a managed engine's stop
            await app.state.server.upstream.start()
            yield
            app.state.server.stopping = True
            await app.state.server.upstream.stop()
            return
        app.state.server.engine.start()
        yield
        # The drain (serve.lifecycle) has let in-flight requests finish, or cancelled them at its
        # deadline; whatever is left (a server stopped without one) is cancelled with a 503 / SSE error.
        app.state.server.stopping = True
        app.state.server.engine.stop(drain_seconds=0)

    app = FastAPI(title="plural serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible server for a base model and its LoRA adapters.")
    app.state.server = state = build_state(settings)
    app.include_router(router)
    from plural.serve.console_routes import console_router

    app.include_router(console_router)  # /console: the browser page and the JSON it reads
    if settings.share.adapters:
        app.include_router(peer_router(state))
    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error(e, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _union_tag(x)]
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":
            msg = f"{param}: this field is not supported by plural serve"
        elif err.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        elif err.get("type") == "missing":
            msg = f"{param}: required field is missing"
        else:
            msg = f"{param or 'body'}: {err.get('msg')}"
        return _error(APIError(400, msg, param=param, code=err.get("type")), request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(APIError(e.status_code, str(e.detail), type=kind), request)

    return app


def peer_router(state: ServerState):
    """The read side of the OCI distribution API (`/v2/...`) for the adapters `share.adapters` names,
    so another organisation can `plural adapters pull` from this server; admin or share keys only."""
    import hmac

    from plural.share.oci_routes import PeerShare, SharedAdapter, oci_router

    shared = []
    for ref, model_id in state.settings.share.adapters.items():
        repo, _, tag = ref.rpartition(":")
        a = state.engine.adapters.get(model_id)
        if a is None:
            raise PluralError(f"share.adapters: {ref!r} names {model_id!r}, which is not a served adapter")
        shared.append(SharedAdapter(repo, tag, a.path))
    keys = [k.encode() for k in (*state.settings.share.keys, *([state.settings.admin_key] if state.settings.admin_key else []))]

    def authorize(key: str | None) -> bool:
        return key is not None and any(hmac.compare_digest(key.encode(), k) for k in keys)

    return oci_router(PeerShare(adapters=shared, authorize=authorize))


def _union_tag(x) -> bool:
    """pydantic names the union member that failed in the error's location ("str", "list[int]",
    "function-after[...]"): not a field of the request, so not part of `param`."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "none") or "[" in x)


def _error(e: APIError, request: Request | None = None) -> JSONResponse:
    if request is not None:
        model = getattr(request.state, "model", "")
        request.app.state.server.metrics.requests.labels(model, str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
