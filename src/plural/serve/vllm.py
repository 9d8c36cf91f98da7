"""`plural serve --engine vllm`: vLLM's OpenAI server as a managed subprocess behind plural's front.

vLLM pins its own torch and transformers, so it runs from its own environment (`vllm_python`),
never imported here. The base is the HF export (`plural export hf --merged`: generation_config
lists the end-of-turn token, so vLLM stops where plural does) and each adapter the PEFT export
named for the served base (vLLM matches `base_model_name_or_path` against its served name).
vLLM listens on 127.0.0.1 with a random key only the front knows; the front is the only door.

LoRA limits: vLLM accepts `--max-lora-rank` only from a fixed list, and a larger value costs
GPU memory for every slot, so the smallest listed value that fits the largest adapter is used.
Run-time loads go through vLLM's `/v1/load_lora_adapter` (needs
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from plural.errors import PluralError
from plural.serve.registry import check_model_id, confine
from plural.serve.serving import APIError
from plural.serve.settings import ServeSettings

# vLLM's LoRAConfig.max_lora_rank accepts only these (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ENTRY = "vllm.entrypoints.openai.api_server"


def lora_rank_flag(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that fits every adapter's rank."""
    need = max(ranks, default=1)
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise PluralError(f"an adapter has LoRA rank {need}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}")


def adapter_rank(cfg: dict) -> int:
    """The largest rank in a PEFT adapter_config (r, and any per-module rank_pattern)."""
    return max([int(cfg.get("r", 8)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


@dataclass
class ServedAdapter:
    name: str
    source: Path  # the adapter as the operator named it
    export: Path  # its PEFT export for vLLM
    rank: int


class VLLM:
    """Exports, the command line, the process and its adapters."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.key = "sk-plural-" + secrets.token_urlsafe(24)  # vLLM's --api-key: only the front holds it
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.adapters: dict[str, ServedAdapter] = {}
        self.base_id = ""
        self.base_export: Path | None = None
        self.max_lora_rank = 0
        self.max_loras = 0
        self.policy = None  # require_signed: every adapter needs a trusted signature, as with plural's engine

    # ---- exports ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Export the base (once per fingerprint) and the start-up adapters."""
        from plural.export.source import open_source

        py = self.settings.vllm_python
        if not py:
            raise PluralError("--engine vllm needs --vllm-python PATH (the python of vLLM's own environment)")
        if not (Path(py).is_file() and os.access(py, os.X_OK)):
            raise PluralError(f"--vllm-python {py}: not an executable file")
        if self.settings.require_signed:
            from plural.share.trust import load_policy

            self.policy = load_policy(self.settings.require_signed)
        from plural.store.models import DEFAULT_MODEL

        src = open_source(self.settings.model or DEFAULT_MODEL)
        if src.adapter is not None:
            raise PluralError(f"model {self.settings.model!r} is an adapter; name the base model")
        self.base_id = src.base.name
        self.base_export = self._export_base(src)
        for name, ref in self.settings.adapters.items():
            check_model_id(name)
            if name == self.base_id:
                raise PluralError(f"adapter name {name!r} is the base model's id; pick another name")
            self.adapters[name] = self._export_adapter(name, ref)
        lora = bool(self.adapters) or bool(self.settings.admin_key)
        ranks = [a.rank for a in self.adapters.values()] or [self.settings.max_lora_rank]
        self.max_lora_rank = lora_rank_flag(ranks) if lora else 0
        self.max_loras = min(self.settings.max_loras, max(1, len(self.adapters))) if lora else 0

    def _exports(self) -> Path:
        from plural.store.paths import plural_home

        out = plural_home() / "exports" / "vllm"
        (out / "adapters").mkdir(parents=True, exist_ok=True)
        return out

    def _export_base(self, src) -> Path:
        from plural.export.hf import PROVENANCE, export_hf_merged

        out = self._exports() / f"{src.base.name}-{src.base.fingerprint[:12]}"
        prov = out / PROVENANCE
        if prov.is_file() and json.loads(prov.read_text()).get("plural.base.fingerprint") == src.base.fingerprint:
            return out  # exported before: same weights
        export_hf_merged(src, out, force=True)
        return out

    def _export_adapter(self, name: str, ref: str) -> ServedAdapter:
        from plural.export.hf import export_hf_adapter
        from plural.export.source import open_adapter

        src = open_adapter(ref)  # checks the adapter's base is this store's model, same weights
        if src.base.name != self.base_id:
            raise PluralError(f"adapter {name!r} ({ref}) is for base {src.base.name!r}, not {self.base_id!r}")
        if self.policy is not None:
            from plural.share.trust import require_trusted

            require_trusted(src.adapter, self.policy)
        out = self._exports() / "adapters" / f"{name.replace('/', '_')}-{(src.adapter_sha256 or '')[:12]}"
        export_hf_adapter(src, out, base_name=self.base_id, force=True)
        return ServedAdapter(name, Path(ref), out, adapter_rank(src.adapter_config))

    # ---- the process --------------------------------------------------------------------------

    def command(self) -> list[str]:
        s = self.settings
        cmd = [str(s.vllm_python), "-m", ENTRY, "--model", str(self.base_export), "--served-model-name", self.base_id,
               "--host", "127.0.0.1", "--port", str(self.port), "--api-key", self.key]
        if self.max_lora_rank:
            cmd += ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]
        if self.adapters:
            cmd += ["--lora-modules", *(f"{a.name}={a.export}" for a in self.adapters.values())]
        if s.max_model_len:
            cmd += ["--max-model-len", str(s.max_model_len)]
        # max_batch is not passed: vLLM's own --max-num-seqs default suits a GPU; set it in vllm_args.
        if s.dtype != "auto":
            cmd += ["--dtype", s.dtype]
        return cmd + list(s.vllm_args)

    def launch(self) -> None:
        """Start vLLM in its own process group and wait until /health answers 200. Called while the
        server is built, before it listens, so a failed start is a one-line error."""
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        # Its own session: the whole group (vLLM's engine-core workers too) is stopped together.
        # And a parent-death signal: if the front is killed outright (SIGKILL, OOM killer) and never
        # runs its shutdown, the kernel sends vLLM SIGTERM, which vLLM answers by shutting down its
        # engine core, instead of leaving it holding the GPU as an orphan.
        self.proc = subprocess.Popen(self.command(), env=env, start_new_session=True, preexec_fn=_die_with_parent)
        atexit.register(self.stop)  # also when the front fails before its lifespan runs
        deadline = time.monotonic() + self.settings.vllm_start_timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise PluralError(f"vLLM exited with status {code} before it was ready (its log is above)")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise PluralError(f"vLLM did not answer /health within {self.settings.vllm_start_timeout:g} s "
                                      "(vllm_start_timeout)")
                time.sleep(0.5)

    def exit_status(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to vLLM's whole process group (its engine-core workers too, even when vLLM itself
        already died), SIGKILL to whatever is left after `timeout`."""
        p = self.proc
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            p.poll()
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p.poll()  # reap the leader, so its zombie does not keep the group alive
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()

    # ---- run-time adapters (the admin API) ----------------------------------------------------

    async def load(self, ups, name: str, path: str) -> ServedAdapter:
        import asyncio

        from plural.store.paths import adapters_dir

        if name == self.base_id:
            raise APIError(400, f"name: {name!r} is the base model's id", param="name")
        if name in self.adapters:
            raise APIError(400, f"name: an adapter {name!r} is already loaded; unload it first", param="name")
        try:
            check_model_id(name)
        except PluralError as e:
            raise APIError(400, f"name: {e}", param="name") from e
        roots = [adapters_dir(), *(Path(d) for d in self.settings.adapter_dirs)]
        try:
            folder = confine(path, roots)
            a = await asyncio.to_thread(self._export_adapter, name, str(folder))
        except PluralError as e:
            raise APIError(400, f"path: {e}", param="path") from e
        if not self.max_lora_rank:
            raise APIError(400, "vLLM was started without LoRA (no adapters and no admin_key)", param="path")
        if a.rank > self.max_lora_rank:
            raise APIError(400, f"path: the adapter's rank {a.rank} exceeds vLLM's --max-lora-rank "
                                f"{self.max_lora_rank} (set at start from the largest adapter); restart with it "
                                "among the adapters", param="path")
        await self._call(ups, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(a.export)}, name)
        self.adapters[name] = a
        return a

    async def unload(self, ups, name: str) -> None:
        if name not in self.adapters:
            raise APIError(404, f"no adapter {name!r} is loaded", param="name", code="model_not_found")
        await self._call(ups, "/v1/unload_lora_adapter", {"lora_name": name}, name)
        del self.adapters[name]

    async def _call(self, ups, path: str, body: dict, name: str) -> None:
        r = ups.replicas[0]
        try:
            resp = await ups.client.post(r.url + path, json=body, headers=r.headers(), timeout=120.0)
        except httpx.HTTPError as e:
            raise APIError(503, f"vLLM did not answer {path}; retry later", type="server_error",
                           code="upstream_unavailable", headers={"Retry-After": "2"}) from e
        if resp.status_code != 200:
            raise ups._upstream_error(r, resp.status_code, resp.content, resp.headers, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGTERM when the parent dies (Linux prctl
    PR_SET_PDEATHSIG; kept across exec). Elsewhere nothing: the shutdown path still stops the group."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
