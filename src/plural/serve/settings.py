"""Server settings: one validated model, from a YAML file (`--config`) and CLI flags.

Example `serve.yaml`::

    model: smollm2-135m-instruct
    adapters: {legal: /srv/adapters/legal}     # model id -> adapter folder (or store name)
    adapter_dirs: [/srv/adapters]              # admin API may load adapters only from here (+ the store)
    admin_key: adm-...                         # enables /admin/*
    api_keys:
      - {key: sk-acme-..., tenant: acme, models: [smollm2-135m-instruct, legal]}
      - {key: sk-ops-..., tenant: ops, models: ["*"]}
    system_prompts: {legal: "You answer as the legal team's assistant."}

Relative paths in the file (adapters, adapter_dirs, a model folder) are relative to its folder;
those given as flags to the working directory (plural.config's path rule).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from plural.config import PathField, Strict, load_config, validate
from plural.errors import PluralError


class ApiKey(Strict):
    key: str = Field(min_length=8)
    tenant: str
    # Model ids this key may see and use; "*" = all. Others answer 404 as if absent.
    models: list[str] = ["*"]


class ShareSettings(Strict):
    """Adapters this server lets peers pull over the OCI distribution API (`/v2/...`)."""

    keys: list[str] = []  # keys that may pull (the admin key always may)
    adapters: dict[str, str] = {}  # "REPOSITORY:TAG" -> a served adapter's model id

    @field_validator("adapters")
    @classmethod
    def _refs(cls, v: dict[str, str]) -> dict[str, str]:
        for ref in v:
            repo, sep, tag = ref.rpartition(":")
            if not sep or not repo or not tag or "/" in tag:
                raise ValueError(f"{ref!r}: expected REPOSITORY:TAG, e.g. acme/support:v1")
        return v


class ServeSettings(Strict):
    model: Annotated[str, PathField(name_ok=True)] | None = None  # stored base model (default: the bundled SmolLM2)
    adapters: dict[str, Annotated[str, PathField(name_ok=True)]] = {}  # model id -> adapter path or store name, registered at start
    adapter_dirs: list[Annotated[str, PathField()]] = []  # folders the admin API may load adapters from (besides the store)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[ApiKey] = []
    admin_key: str | None = Field(None, min_length=8)
    system_prompts: dict[str, str] = {}  # model id -> system prompt used when a request has none

    dtype: str = "auto"  # auto (bf16 where the CPU/GPU has fast bf16, else fp32), float32, bfloat16
    # none, or int4 (CPU): projection and output weights as 4-bit groups of 32 (llama.cpp's Q4_1
    # layout: a model imported from a Q4_1 GGUF keeps its codes). Outputs then differ slightly from PEFT's.
    quantize: Literal["none", "int4"] = "none"
    max_model_len: int | None = Field(None, ge=16)  # prompt + completion tokens; default min(context, 2048)
    max_batch: int = Field(16, ge=1, le=256)  # sequences decoded together (rows of the KV cache)
    max_queue: int = Field(256, ge=0)  # waiting sequences beyond the batch before 429
    # prompt tokens one prefill step may take (vLLM's max_num_batched_tokens; a longer prompt is
    # prefilled alone): a burst is prefilled in groups, decode steps between them. 0: no budget;
    # default by device (serve.app.prefill_budget).
    max_prefill_tokens: int | None = Field(None, ge=0)
    max_loras: int = Field(16, ge=1, le=256)  # adapters resident at once (LoRA slots)
    max_lora_rank: int = Field(64, ge=1, le=1024)
    adapter_cache_mb: float = Field(1024.0, gt=0)  # bytes bound of the resident-adapter LRU
    request_timeout: float = Field(600.0, gt=0)  # seconds per request, queueing included
    max_body_bytes: int = Field(4_000_000, ge=1024)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads for the engine
    # On SIGTERM/SIGINT: seconds for in-flight requests to finish (new ones get 503 shutting_down).
    shutdown_timeout: float = Field(30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # the server log on stderr
    # auto: the fused runner for the families it computes (serve/families.py), else the generic one
    runner: Literal["auto", "fused", "generic"] = "auto"
    # A trust file (or one public key PEM): every adapter must carry a trusted signature
    # (plural adapters sign) to be registered, at start and through the admin API.
    require_signed: Annotated[str, PathField()] | None = None
    share: ShareSettings = ShareSettings()
    # Training, federation and eval-report folders the console (/console) shows; admin key only
    # when the server has keys.
    runs_dir: Annotated[str, PathField()] | None = None

    # Front mode (serve/upstream.py): no model is loaded here; chat and completions go to these
    # OpenAI-compatible servers (vLLM, SGLang, llama.cpp's server, another plural serve), each
    # "URL" or "NAME=URL" (the name is what /health shows; the address is never shown to clients).
    upstream: list[str] = []
    upstream_key: str | None = None  # the bearer key the upstreams expect, if any
    # front model id -> the upstream's name for it (ids not listed keep the upstream's name)
    model_map: dict[str, str] = {}
    upstream_max_in_flight: int = Field(64, ge=1)  # requests per replica before the front answers 429
    health_interval: float = Field(2.0, gt=0)  # seconds between upstream health checks
    # vllm: start vLLM's OpenAI server from `vllm_python` (its own environment) on the HF export of
    # `model` with `adapters` as LoRA modules, and front it (serve/vllm.py)
    engine: Literal["plural", "vllm"] = "plural"
    vllm_python: Annotated[str, PathField()] | None = None
    vllm_args: list[str] = []  # extra vLLM flags, e.g. [--gpu-memory-utilization, "0.85"]
    vllm_start_timeout: float = Field(900.0, gt=0)  # seconds for vLLM to load and answer /health

    @field_validator("upstream")
    @classmethod
    def _upstreams(cls, v: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        names = set()
        for i, item in enumerate(v):
            name, sep, url = item.partition("=")
            if not sep or "://" in name:
                name, url = f"upstream-{i + 1}", item
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{item!r}: expected URL or NAME=URL with an http(s) URL, e.g. http://10.0.0.5:8000")
            if name in names:
                raise ValueError(f"upstream name {name!r} is used twice")
            names.add(name)
        return v

    @property
    def front(self) -> bool:
        """A front server: requests go to upstream engines, no model is loaded in this process."""
        return bool(self.upstream) or self.engine == "vllm"

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("must be auto, float32, bfloat16 or float16")
        return v

    @field_validator("api_keys")
    @classmethod
    def _unique_keys(cls, v: list[ApiKey]) -> list[ApiKey]:
        seen = set()
        for k in v:
            if k.key in seen:
                raise ValueError(f"key of tenant {k.tenant!r} is listed twice")
            seen.add(k.key)
        return v

    def check_binding(self) -> None:
        """With no API keys the server is open to anyone who can reach it: allow loopback only."""
        if self.api_keys:
            return
        host = "127.0.0.1" if self.host == "localhost" else self.host
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise PluralError(
                f"--host {self.host}: without API keys the server binds 127.0.0.1 only. "
                "Fix: add api_keys to the --config file, or drop --host"
            )


def load_settings(path: str | Path | None = None, **overrides) -> ServeSettings:
    """Settings from a YAML file (optional), then CLI values that are not None on top."""
    base = load_config(ServeSettings, path).model_dump() if path else {}
    for k, v in overrides.items():
        if v is None or v == {} or v == []:
            continue
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return validate(ServeSettings, base, str(path) if path else "serve settings")
