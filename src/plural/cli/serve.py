"""`plural serve`: the OpenAI-compatible server for a base model and its LoRA adapters."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from plural.errors import PluralError

err = Console(stderr=True)


def _pairs(items: list[str], flag: str, what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise PluralError(f"{flag} {item!r}: expected NAME={what}")
        out[name] = value
    return out


def profile_prompts(profiles: dict[str, str]) -> dict[str, str]:
    """MODEL_ID -> the value profile's rendered system prompt."""
    if not profiles:
        return {}
    from plural.values.profile import load_profile  # only when asked: serve does not need values otherwise

    return {model_id: load_profile(Path(path)).system_prompt() for model_id, path in profiles.items()}


def serve(
    model: Optional[str] = typer.Option(None, "--model", help="Stored base model (default: the bundled SmolLM2)."),
    adapter: List[str] = typer.Option([], "--adapter", help="Serve an adapter as model id NAME: NAME=PATH or NAME=STORE_NAME (repeatable)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1; other addresses need api_keys in --config)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default 8000; 0 picks a free one)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Server settings (YAML): keys, tenants, admin key, limits."),
    profile: List[str] = typer.Option([], "--profile", help="MODEL_ID=PROFILE.yaml: use the value profile's system prompt for that model id when a request has none (repeatable)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto | float32 | bfloat16 | float16."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="none | int4 (CPU: 4-bit weights in llama.cpp's Q4_1 layout, ~3x less memory traffic per token)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Prompt + completion tokens per request."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Sequences decoded together."),
    max_prefill_tokens: Optional[int] = typer.Option(None, "--max-prefill-tokens", help="Prompt tokens one prefill step may take (a burst is prefilled in groups; 0: no limit)."),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="debug | info | warning | error (the server log on stderr)."),
    runner: Optional[str] = typer.Option(None, "--runner", help="auto | fused | generic (auto: fused for Llama, Mistral, Qwen2/3, Gemma 2; generic otherwise)."),
    require_signed: Optional[str] = typer.Option(None, "--require-signed", help="TRUST.yaml or PUB.pem: refuse adapters without a trusted signature (admin API included)."),
    runs_dir: Optional[str] = typer.Option(None, "--runs-dir", help="Training runs and eval reports the console (/console) shows."),
    upstream: List[str] = typer.Option([], "--upstream", help="Front mode: proxy to this OpenAI-compatible server, URL or NAME=URL (repeatable: replicas). No model is loaded here."),
    model_map: List[str] = typer.Option([], "--model-map", help="Front mode: FRONT_ID=UPSTREAM_ID, the upstream's name for a model id (repeatable)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="plural (default) | vllm: start vLLM's OpenAI server from --vllm-python and front it."),
    vllm_python: Optional[str] = typer.Option(None, "--vllm-python", help="The python executable of vLLM's own environment (--engine vllm)."),
) -> None:
    """Serve the base model and LoRA adapters behind an OpenAI-compatible API (many adapters, one batch)."""
    import uvicorn

    from plural.serve.app import create_app
    from plural.serve.lifecycle import DrainingServer, setup_logging
    from plural.serve.settings import load_settings

    settings = load_settings(
        config, model=model, adapters=_pairs(adapter, "--adapter", "PATH"), host=host, port=port, dtype=dtype, quantize=quantize,
        max_model_len=max_model_len, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens, log_level=log_level, runner=runner, require_signed=require_signed, runs_dir=runs_dir,
        system_prompts=profile_prompts(_pairs(profile, "--profile", "PROFILE.yaml")),
        upstream=upstream, model_map=_pairs(model_map, "--model-map", "UPSTREAM_ID"), engine=engine, vllm_python=vllm_python,
    )
    settings.check_binding()
    setup_logging(settings.log_level)
    if settings.front:
        return _serve_front(settings)
    # Only the engine thread should run parallel torch work. With libgomp, once the main thread has
    # opened a multi-threaded OpenMP team (loading the model does), another thread's parallel
    # regions run about 1.4x slower (measured on SmolLM2 decode steps, 2 cores). So the main thread
    # (HTTP, tokenising) keeps one intra-op thread from the start; the engine thread gets the rest.
    import torch

    from plural.cpu import cpu_info

    settings = settings.model_copy(update={"threads": settings.threads or torch.get_num_threads()})
    torch.set_num_threads(1)
    app = create_app(settings)
    eng = app.state.server.engine
    err.print(f"[green]serving[/] {app.state.server.base_id} + {len(eng.adapters)} adapter(s) "
              f"on http://{settings.host}:{settings.port}/v1 (runner: {eng.runner.describe()}, "
              f"{str(eng.dtype).removeprefix('torch.')}{', int4' if settings.quantize == 'int4' else ''}, "
              f"CPU kernels {cpu_info().describe()}); "
              f"console: http://{settings.host}:{settings.port}/console", highlight=False)
    # The drain is plural's (serve.lifecycle); uvicorn's graceful timeout only bounds the last writes.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5)
    DrainingServer(config, app.state.server, settings.shutdown_timeout).run()


def _serve_front(settings) -> None:
    """Front mode: no torch threads to arrange, no model; the upstreams are checked as it starts."""
    import uvicorn

    from plural.serve.app import create_app
    from plural.serve.lifecycle import DrainingServer

    app = create_app(settings)
    ups = app.state.server.upstream
    what = (f"vLLM ({app.state.server.base_id} + {len(ups.engine.adapters)} adapter(s))" if ups.engine
            else ", ".join(r.name for r in ups.replicas))
    err.print(f"[green]serving[/] front for {what} on http://{settings.host}:{settings.port}/v1", highlight=False)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5)
    DrainingServer(config, app.state.server, settings.shutdown_timeout).run()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
