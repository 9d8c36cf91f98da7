"""What the server's parts share, as one typed object (`app.state.server`), built by `app.build_state`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from plural.serve.adapter_cache import Adapter
from plural.serve.engine import Engine
from plural.serve.metrics import Metrics
from plural.serve.settings import ServeSettings
from plural.serve.tenants import Keys


@dataclass
class ServerState:
    settings: ServeSettings
    keys: Keys
    metrics: Metrics
    tokenizer: Any
    base_id: str
    base_path: Path
    created: int
    engine: Engine | None  # None in front mode (upstream engines answer)
    system_prompts: dict[str, str]
    # (model id, path or store name, confined to the allowed folders?) -> a checked Adapter
    register_adapter: Callable[[str, str, bool], Adapter]
    # model id -> what the adapter's registration established for /v1/models' `plural` field
    # (content digest, signer when --require-signed is on)
    adapter_info: dict[str, dict] = field(default_factory=dict)
    serving: Any = None  # serving.Serving, made last (it needs the rest)
    stopping: bool = False  # set when a shutdown drain starts: new requests get 503 shutting_down
    in_flight: int = 0  # HTTP requests being answered (counted by the Guard middleware)
    upstream: Any = None  # upstream.Upstreams in front mode (--upstream / --engine vllm), else None
