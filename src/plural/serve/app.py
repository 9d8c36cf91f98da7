"""`create_app(settings)`: the FastAPI server. All state lives on `app.state`; nothing is global.

app.state: settings, keys (tenants), metrics, tokenizer, base_id/base_path, engine (owns the
model on its own thread), serving (request <-> engine logic), system_prompts, register_adapter.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plural.serve.engine import Engine
from plural.serve.guard import Guard
from plural.serve.metrics import Metrics
from plural.serve.registry import confine, make_adapter
from plural.serve.routes import router
from plural.serve.serving import APIError, Serving
from plural.serve.settings import ServeSettings
from plural.serve.tenants import Keys

DEFAULT_MAX_LEN = 2048


def pick_dtype(name: str, device):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 matmuls are fast only where the CPU has native bf16 (AVX512-BF16 / AMX); else fp32.
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def build_state(app: FastAPI, settings: ServeSettings) -> None:
    import torch

    from plural.store.models import load_model
    from plural.store.paths import adapters_dir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, stored = load_model(settings.model)
    ctx = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LEN
    max_len = min(settings.max_model_len or min(ctx, DEFAULT_MAX_LEN), ctx)
    s = app.state
    s.settings = settings
    s.keys = Keys(settings.api_keys, settings.admin_key)
    s.metrics = Metrics()
    s.tokenizer = tok
    s.base_id, s.base_path = stored.name, stored.path
    s.created = int(time.time())
    s.stopping = False  # set when a shutdown drain starts: new requests get 503 shutting_down
    s.in_flight = 0  # HTTP requests being answered (counted by the Guard middleware)
    s.engine = Engine(model, tok, max_batch=settings.max_batch, max_len=max_len, max_queue=settings.max_queue,
                      max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
                      cache_bytes=int(settings.adapter_cache_mb * 2**20), dtype=pick_dtype(settings.dtype, device),
                      device=device, threads=settings.threads, metrics=s.metrics, quantize=settings.quantize)
    roots = [adapters_dir(), *(Path(d) for d in settings.adapter_dirs)]

    def register_adapter(name: str, ref: str, confined: bool):
        # Admin-API paths must lie in the store or adapter_dirs; the operator's own --adapter flags need not.
        path = confine(ref, roots) if confined else ref
        a = make_adapter(name, path, stored, s.engine.runner, settings.max_lora_rank, roots if confined else None)
        if a.nbytes > s.engine.cache_bytes:
            from plural.errors import PluralError

            raise PluralError(f"adapter {a.path} ({a.nbytes / 2**20:.1f} MiB) is larger than adapter_cache_mb "
                              f"({settings.adapter_cache_mb:g}); raise adapter_cache_mb")
        return a

    s.register_adapter = register_adapter
    for name, ref in settings.adapters.items():
        if name == stored.name:
            from plural.errors import PluralError

            raise PluralError(f"adapter name {name!r} is the base model's id; pick another name")
        s.engine.add_adapter(register_adapter(name, ref, False))
    s.system_prompts = dict(settings.system_prompts)
    s.serving = Serving(s)


def create_app(settings: ServeSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine.start()
        yield
        # The drain (serve.lifecycle) has let in-flight requests finish, or cancelled them at its
        # deadline; whatever is left (a server stopped without one) is cancelled with a 503 / SSE error.
        app.state.stopping = True
        app.state.engine.stop(drain_seconds=0)

    app = FastAPI(title="plural serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible server for a base model and its LoRA adapters.")
    build_state(app, settings)
    app.include_router(router)
    app.add_middleware(Guard, state=app.state)

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


def _union_tag(x) -> bool:
    """pydantic names the union member that failed in the error's location ("str", "list[int]",
    "function-after[...]"): not a field of the request, so not part of `param`."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "none") or "[" in x)


def _error(e: APIError, request: Request | None = None) -> JSONResponse:
    if request is not None:
        model = getattr(request.state, "model", "")
        request.app.state.metrics.requests.labels(model, str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
