"""HTTP routes: the OpenAI API (/v1), health and metrics, and the admin API for adapters."""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import logging

from plural.cpu import cpu_info
from plural.errors import PluralError
from plural.serve import protocol as P
from plural.serve.engine import EngineStopped
from plural.serve.registry import check_model_id
from plural.serve.serving import APIError, not_found
from plural.serve.tenants import ADMIN, Tenant, bearer

ERRORS = {code: {"model": P.ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 500, 503)}
router = APIRouter(responses=ERRORS)
log = logging.getLogger("plural.serve")


def tenant(request: Request) -> Tenant:
    keys = request.app.state.server.keys
    token = bearer(request.headers.get("authorization"))
    t = ADMIN if keys.is_admin(token) else keys.tenant(token)  # the admin key sees every model
    if t is None:
        raise APIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer KEY'.",
                       code="invalid_api_key")
    return t


def admin(request: Request) -> None:
    keys = request.app.state.server.keys
    if not keys.admin_key:
        raise APIError(403, "The admin API is disabled: set admin_key in the server's --config file.",
                       type="permission_error", code="admin_disabled")
    token = bearer(request.headers.get("authorization"))
    if token is None:
        raise APIError(401, "The admin API needs 'Authorization: Bearer ADMIN_KEY'.", code="invalid_api_key")
    if not keys.is_admin(token):
        raise APIError(403, "This key may not use the admin API.", type="permission_error", code="not_admin")


def model_ids(state) -> list[str]:
    return [state.base_id, *state.engine.adapters]


def check_model(state, t: Tenant, model: str, request: Request) -> None:
    request.state.model = model if model in model_ids(state) and t.allows(model) else ""
    if model not in model_ids(state) or not t.allows(model):
        raise not_found(model)


async def watch_disconnect(request: Request, job) -> None:
    """Cancel a non-streamed request's generation when its client goes away."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            for s in job.seqs:
                s.cancel()
            return


async def respond(request: Request, job, make, stream_fn, req) -> Response:
    state = request.app.state.server
    if req.stream:
        async def counted():
            try:
                async for item in stream_fn(req, job):
                    yield item
            except Exception:  # the response is under way: end the stream with an error event, log the rest
                log.exception("request %s: stream failed", job.seqs[0].request_id if job.seqs else "")
                job.status = 500
                yield ('data: {"error": {"message": "internal server error (request id %s)", "type": "server_error", '
                       '"param": null, "code": "internal_error"}}\n\ndata: [DONE]\n\n' % request.state.request_id)
            finally:
                state.metrics.requests.labels(req.model, str(job.status)).inc()

        # Starlette cancels the generator when the client disconnects; `events` then cancels the sequences.
        return StreamingResponse(counted(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(watch_disconnect(request, job))
    try:
        result = await make(req, job)
    finally:
        watcher.cancel()
    state.metrics.requests.labels(req.model, "200").inc()
    return JSONResponse(result.model_dump())


@router.post("/v1/chat/completions", response_model=P.ChatCompletion)
async def chat_completions(req: P.ChatCompletionRequest, request: Request, t: Tenant = Depends(tenant)):
    state = request.app.state.server
    if state.upstream is not None:  # front mode: an upstream engine answers
        return await state.upstream.proxy(request, t, "/v1/chat/completions", state.system_prompts)
    check_model(state, t, req.model, request)
    serving = state.serving
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens differ; send one of them", param="max_tokens")
    max_tokens = req.max_completion_tokens or req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    grammar, param = serving.chat_grammar(req)
    await serving.compile(grammar, param)  # before any generation: a schema it cannot enforce is a 400
    job = serving.submit(req.model, [await serving.chat_prompt(req)], req, max_tokens, logprobs, request.state.request_id,
                         grammar=grammar)
    return await respond(request, job, serving.chat, serving.stream_chat, req)


@router.post("/v1/completions", response_model=P.Completion)
async def completions(req: P.CompletionRequest, request: Request, t: Tenant = Depends(tenant)):
    state = request.app.state.server
    if state.upstream is not None:  # front mode: an upstream engine answers
        return await state.upstream.proxy(request, t, "/v1/completions", state.system_prompts)
    check_model(state, t, req.model, request)
    serving = state.serving
    prompts = await serving.completion_prompts(req)
    # echo with logprobs: the prompt's own logprobs, computed before its completion starts (an
    # error there is a plain error response, not a broken stream).
    echo_lps = await serving.prompt_logprobs(req.model, prompts, req.logprobs) if req.echo and req.logprobs is not None \
        else None
    job = serving.submit(req.model, prompts, req, req.max_tokens, req.logprobs, request.state.request_id)
    if req.echo:  # the prompt as sent (token-id prompts decoded), once per choice
        texts = [req.prompt] if isinstance(req.prompt, str) else (
            [state.tokenizer.decode(req.prompt)] if isinstance(req.prompt[0], int) else list(req.prompt))
        job.echo = [texts[k // req.n] for k in range(len(job.seqs))]
        job.echo_logprobs = [echo_lps[k // req.n] for k in range(len(job.seqs))] if echo_lps is not None else None
    return await respond(request, job, serving.completion, serving.stream_completion, req)


@router.post("/v1/embeddings", response_model=P.EmbeddingList)
async def embeddings(req: P.EmbeddingRequest, request: Request, t: Tenant = Depends(tenant)):
    state = request.app.state.server
    if state.upstream is not None:  # front mode: an upstream engine answers
        return await state.upstream.proxy(request, t, "/v1/embeddings", state.system_prompts)
    check_model(state, t, req.model, request)
    inputs = await asyncio.to_thread(state.serving.embedding_inputs, req)
    vectors = await state.serving.embed(req.model, inputs)
    if req.dimensions is not None and req.dimensions != vectors.shape[1]:
        raise APIError(400, f"dimensions: this model's embeddings have {vectors.shape[1]} dimensions and cannot be "
                            "shortened", param="dimensions")
    if req.encoding_format == "base64":  # little-endian float32, as OpenAI's client decodes it
        data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = vectors.tolist()
    n = sum(len(x) for x in inputs)
    state.metrics.requests.labels(req.model, "200").inc()
    return P.EmbeddingList(data=[P.EmbeddingData(index=i, embedding=e) for i, e in enumerate(data)], model=req.model,
                           usage=P.EmbeddingUsage(prompt_tokens=n, total_tokens=n))


@router.get("/v1/models", response_model=P.ModelList, response_model_exclude_none=True)
async def list_models(request: Request, t: Tenant = Depends(tenant)):
    state = request.app.state.server
    if state.upstream is not None:
        return P.ModelList(data=[c for c in state.upstream.cards(state.created) if t.allows(c.id)])
    # Server paths are the operator's business: only the admin key sees where each model lives.
    paths = state.keys.is_admin(bearer(request.headers.get("authorization")))
    cards = [P.ModelCard(id=state.base_id, created=state.created, owned_by="plural",
                         root=str(state.base_path) if paths else None)]
    for name, a in state.engine.adapters.items():
        cards.append(P.ModelCard(id=name, created=state.created, owned_by="plural", parent=state.base_id,
                                 root=str(a.path) if paths else None, plural=state.adapter_info.get(name)))
    return P.ModelList(data=[c for c in cards if t.allows(c.id)])


@router.get("/v1/models/{model_id:path}", response_model=P.ModelCard, response_model_exclude_none=True)
async def get_model(model_id: str, request: Request, t: Tenant = Depends(tenant)):
    listing = await list_models(request, t)
    for c in listing.data:
        if c.id == model_id:
            return c
    raise not_found(model_id)


@router.get("/health")
async def health(request: Request):
    eng = request.app.state.server.engine
    if request.app.state.server.stopping:
        return JSONResponse({"status": "stopping"}, status_code=503)
    if eng is None:  # front mode: which upstreams answer
        body, code = request.app.state.server.upstream.health()
        return JSONResponse(body, status_code=code)
    return {"status": "ok", "running": eng.running(), "waiting": eng.queue_depth(),
            "runner": eng.runner.kind, "family": eng.runner.family, "dtype": str(eng.dtype).removeprefix("torch."),
            "cpu": cpu_info().kind}


@router.get("/metrics")
async def metrics(request: Request):
    state = request.app.state.server
    if state.keys.required:
        admin(request)  # per-adapter labels would tell tenants about each other's models
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def engine_call(state, fn):
    try:
        return await asyncio.to_thread(state.engine.call, fn)
    except EngineStopped as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down", headers={"Retry-After": "5"}) from e


@router.get("/admin/adapters", response_model=list[P.AdapterInfo], dependencies=[Depends(admin)])
async def admin_list(request: Request):
    if request.app.state.server.upstream is not None:
        return await request.app.state.server.upstream.admin_list()
    return [P.AdapterInfo(name=a.name, path=str(a.path), rank=a.rank, resident=a.resident,
                          running=a.users) for a in request.app.state.server.engine.adapters.values()]


@router.post("/admin/adapters", response_model=P.AdapterInfo, dependencies=[Depends(admin)])
async def admin_load(body: P.LoadAdapterRequest, request: Request):
    state = request.app.state.server
    if state.upstream is not None:  # --engine vllm: export it, then vLLM's /v1/load_lora_adapter
        return await state.upstream.admin_load(body.name, body.path)
    if body.name == state.base_id:
        raise APIError(400, f"name: {body.name!r} is the base model's id", param="name")
    try:
        check_model_id(body.name)
    except PluralError as e:
        raise APIError(400, f"name: {e}", param="name") from e
    try:
        a = await asyncio.to_thread(state.register_adapter, body.name, body.path, True)
    except PluralError as e:
        raise APIError(400, f"path: {e}", param="path") from e
    await engine_call(state, lambda: state.engine.add_adapter(a))
    return P.AdapterInfo(name=a.name, path=str(a.path), rank=a.rank, resident=False, running=0)


@router.delete("/admin/adapters/{name:path}", dependencies=[Depends(admin)])
async def admin_unload(name: str, request: Request):
    state = request.app.state.server
    if state.upstream is not None:
        return await state.upstream.admin_unload(name)
    if name not in state.engine.adapters:
        raise APIError(404, f"no adapter {name!r} is loaded", param="name", code="model_not_found")
    await engine_call(state, lambda: state.engine.remove_adapter(name))
    state.adapter_info.pop(name, None)
    return {"id": name, "object": "model", "deleted": True}
