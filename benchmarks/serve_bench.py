"""Serving many LoRA adapters: plural serve vs transformers + PEFT vs llama.cpp, one workload, one run.

Workload: N chat requests (default 64), 128 new tokens each (end-of-turn ignored so every system
generates the same count), concurrency 16 (a closed loop: each of 16 clients sends its next request
when its previous one finishes), request i uses adapter i mod 16 (PEFT-default LoRA: r=8 on
q_proj, v_proj, random weights) on SmolLM2-135M-Instruct.

- plural: `plural serve` process, a lean httpx SSE client (as vLLM's benchmark_serving), streaming (TTFT per request).
  Also: the same workload on the base model only (alternating with the 16-adapter runs), with 1 distinct adapter, and with 64.
- transformers + PEFT, sequential: one request at a time, switching adapters (`set_adapter`).
- PEFT mixed-adapter batch: 16 requests in one `generate(adapter_names=...)` call (static batch).
- llama.cpp (llama-cpp-python, the bundled Q4_1 GGUF, adapters converted to GGUF LoRA and switched
  per request with llama_set_adapters_lora; one request at a time, as llama-cpp-python serves).

The sequential baselines are measured on a subset of requests (they are slow); their TTFT under the
16-client closed loop is computed exactly from the measured per-request times (FIFO single server).

    PLURAL_HOME=/tmp/ph python benchmarks/serve_bench.py [--requests 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

from _report import command, write_section

NEW_TOKENS = 128
# The label says the dtype the server reports in /health (fp32 where the CPU has no fast bf16), never a guess.
WEIGHTS = {"none": "{dtype}", "int4": "int4 (`--quantize int4`), {dtype} elsewhere"}
CONCURRENCY = 16
TOPICS = ["a refund", "a late delivery", "a password reset", "roaming fees", "a broken screen", "an invoice",
          "a contract change", "a new SIM card"]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a short, friendly reply to a customer asking about {TOPICS[i % len(TOPICS)]} (case {i})."}]
            for i in range(n)]


# ---- adapters ---------------------------------------------------------------------------------

def make_adapters(n: int) -> list[Path]:
    """n PEFT-default LoRA adapters (r=8, q_proj+v_proj) with random B, saved in the store."""
    from peft import LoraConfig, get_peft_model

    from plural.store.adapters import build_manifest, save_adapter
    from plural.store.models import get_model, load_model
    from plural.store.paths import adapters_dir

    paths = [adapters_dir() / f"bench-{i:02d}" for i in range(n)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    model, _, stored = load_model()
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    for i, p in enumerate(paths):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, prm in peft_model.named_parameters():
                if "lora_A" in name:
                    prm.normal_(0, 1 / prm.shape[1] ** 0.5)
                elif "lora_B" in name:
                    prm.normal_(0, 0.02)
        save_adapter(peft_model, p, build_manifest(stored, "bench", {"seed": 1000 + i}))
    return paths


# ---- statistics -------------------------------------------------------------------------------

def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def closed_loop(records, n_total):
    """FIFO single server, 16 clients: request j arrives when request j-16 ended. records: per request
    (service_seconds, ttft_from_start_of_service). Cycles the measured records up to n_total requests."""
    ends, ttfts, t = [], [], 0.0
    for j in range(n_total):
        service, first = records[j % len(records)]
        arrival = ends[j - CONCURRENCY] if j >= CONCURRENCY else 0.0
        start = max(t, arrival)
        ttfts.append(start + first - arrival)
        t = start + service
        ends.append(t)
    return ttfts


# ---- plural -----------------------------------------------------------------------------------

class PluralServer:
    def __init__(self, adapters: list[Path], workdir: Path, quantize: str = "none", extra: list[str] = ()):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [str(Path(sys.executable).with_name("plural")), "serve", "--port", str(self.port), "--quantize", quantize, *extra]
        for p in adapters:
            args += ["--adapter", f"{p.name}={p}"]
        self.log = open(workdir / f"plural-serve-{quantize}.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        for _ in range(600):
            try:
                r = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1)
                if r.status_code == 200:
                    self.health = r.json()  # runner, family, dtype actually used
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("plural serve did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


async def stream_chat(client, body: dict):
    """The parsed SSE chunks of one streamed /chat/completions request (httpx.AsyncClient with the
    server's /v1 as base URL); a non-200 answer raises with the start of its body."""
    import json

    async with client.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def plural_workload(port, models, msgs, concurrency):
    """A closed loop of streaming chat requests. The load generator shares the 2 cores with the
    server, so it is kept lean, as vLLM's benchmark_serving is: raw SSE lines over one httpx
    client and json.loads per event (the official openai client's per-chunk pydantic parsing
    would take CPU from the server; the tests use that client for compatibility)."""
    import httpx

    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", timeout=600,
                               limits=httpx.Limits(max_connections=concurrency + 4))
    sem = asyncio.Semaphore(concurrency)
    ttfts, tokens, decode_rates = [], [], []

    async def one(model, m):
        async with sem:
            t0 = time.perf_counter()
            first = last = None
            n = 0
            body = {"model": model, "messages": m, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
            async for ch in stream_chat(client, body):
                if ch.get("choices") and ch["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                if ch.get("usage"):
                    n = ch["usage"]["completion_tokens"]
            ttfts.append(first - t0)
            tokens.append(n)
            if last > first:
                decode_rates.append((n - 1) / (last - first))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(model, m) for model, m in zip(models, msgs)))
    wall = time.perf_counter() - t0
    await client.aclose()
    return {"tok_s": sum(tokens) / wall, "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
            "decode": statistics.median(decode_rates), "tokens": sum(tokens), "wall": wall}


# ---- transformers + PEFT ----------------------------------------------------------------------

class FirstTokenClock:
    """A logits processor that notes when generate asks for the first new token's scores."""

    def __init__(self):
        self.t = None

    def __call__(self, input_ids, scores):
        self.t = self.t or time.perf_counter()
        return scores


def peft_model(adapters):
    from peft import PeftModel

    from plural.store.models import load_model

    model, tok, _ = load_model()
    pm = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=adapters[0].name)
    for p in adapters[1:]:
        pm.load_adapter(str(p), adapter_name=p.name)
    pm.eval()
    return pm, tok


def hf_sequential(pm, tok, adapters, msgs, n_req):
    from transformers import LogitsProcessorList

    records = []
    for i in range(n_req):
        pm.set_adapter(adapters[i % len(adapters)].name)
        ids = tok.apply_chat_template(msgs[i], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        clock = FirstTokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            pm.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                        pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([clock]))
        records.append((time.perf_counter() - t0, clock.t - t0))
    return records


def peft_mixed_batch(pm, tok, adapters, msgs):
    from transformers import LogitsProcessorList

    tok.padding_side = "left"
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs[:CONCURRENCY]]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    names = [adapters[i % len(adapters)].name for i in range(len(texts))]
    clock = FirstTokenClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = pm.generate(**enc, adapter_names=names, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([clock]))
    wall = time.perf_counter() - t0
    n_tok = (out.shape[1] - enc["input_ids"].shape[1]) * len(texts)
    return wall, clock.t - t0, n_tok


# ---- llama.cpp --------------------------------------------------------------------------------

def llama_build() -> str:
    """The instruction sets this llama.cpp was compiled for (its own system info): a native build on an
    AVX-512 CPU is not what an AVX2-only CPU runs, so the table says which one it measured."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    on = [k.strip() for k, _, v in (f.partition("=") for f in info.replace("CPU :", "").split("|")) if v.strip() == "1"]
    simd = [k for k in on if k.startswith(("AVX", "F16C", "FMA", "AMX"))]
    return f"llama-cpp-python {llama_cpp.__version__}, CPU kernels for {' '.join(simd) or 'no AVX'}"


def llamacpp(adapters, msgs, n_req, workdir):
    import llama_cpp

    from _llama import load_llama

    from plural.export.gguf_lora import export_gguf_lora
    from plural.export.source import open_adapter
    from plural.store.models import bundled_gguf

    ggufs = [workdir / f"{p.name}.gguf" for p in adapters]
    for p, g in zip(adapters, ggufs):
        if not g.exists():
            export_gguf_lora(open_adapter(p), g)
    llm = load_llama(bundled_gguf(), n_ctx=1024, n_threads=os.cpu_count())
    handles = [llama_cpp.llama_adapter_lora_init(llm._model.model, str(g).encode()) for g in ggufs]
    assert all(handles), "llama.cpp refused a converted adapter"
    eos = llm.token_eos()

    def run(i, adapter):
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scale = (ctypes.c_float * 1)(1.0)
        llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, 1, scale)
        llm.reset()  # its prompt cache is not keyed by adapter: never reuse KV across adapters
        t0 = time.perf_counter()
        first, n = None, 0
        for ch in llm.create_chat_completion(messages=msgs[i], max_tokens=NEW_TOKENS, temperature=0, stream=True,
                                             logit_bias={eos: -1e9}):
            if ch["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                n += 1
        return time.perf_counter() - t0, first - t0, n

    records, decode_rates, total_tokens, total_time = [], [], 0, 0.0
    for i in range(n_req):
        service, first, n = run(i, handles[i % len(handles)])
        records.append((service, first))
        total_tokens += NEW_TOKENS
        total_time += service
        decode_rates.append((NEW_TOKENS - 1) / (service - first))
    return records, total_tokens / total_time, statistics.median(decode_rates)


# ---- main -------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs of plural's 16-adapter and base-only workloads, alternating (median of each)")
    ap.add_argument("--baseline-requests", type=int, default=8, help="requests measured for each sequential baseline")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quantize", default="none,int4", help="plural serve configurations to measure (comma-separated: none, int4)")
    ap.add_argument("--max-prefill-tokens", type=int, default=None, help="plural serve's prefill token budget (default: its own)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    global NEW_TOKENS
    NEW_TOKENS = args.new_tokens
    torch.set_num_threads(os.cpu_count())
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    adapters = make_adapters(64)
    a16 = adapters[:16]
    msgs = prompts(args.requests)
    rows = {}

    plural = {}
    for quant in args.quantize.split(","):
        extra = [] if args.max_prefill_tokens is None else ["--max-prefill-tokens", str(args.max_prefill_tokens)]
        srv = PluralServer(adapters, work, quant, extra)
        try:
            run = lambda models: asyncio.run(plural_workload(srv.port, models, msgs, CONCURRENCY))
            asyncio.run(plural_workload(srv.port, [a16[0].name] * 4, msgs[:4], 4))  # warm-up
            single = [asyncio.run(plural_workload(srv.port, [a16[i].name], msgs[i:i + 1], 1))["decode"] for i in range(3)]
            # 16 adapters and base only, alternating (so a slow spell of the machine hits both), median of each.
            pairs = [(run([a16[i % 16].name for i in range(args.requests)]), run(["smollm2-135m-instruct"] * args.requests))
                     for _ in range(args.repeats)]
            r16, rbase = (sorted((p[k] for p in pairs), key=lambda r: r["tok_s"])[len(pairs) // 2] for k in (0, 1))
            r1 = run([a16[0].name] * args.requests)
            # Adapters 16..63 have never been used on this server: every request's adapter is loaded on
            # first use (and evicts an idle one: 16 LoRA slots).
            r64 = run([adapters[16 + (i * 7) % 48].name for i in range(args.requests)])
        finally:
            srv.stop()
        label = WEIGHTS[quant].format(dtype={"bfloat16": "bf16", "float32": "fp32"}.get(srv.health["dtype"], srv.health["dtype"]))
        rows[f"plural serve (16 adapters, {label})"] = (r16["tok_s"], r16["ttft_p50"], r16["ttft_p99"], statistics.median(single))
        plural[quant] = (label, r16, rbase, r1, r64, statistics.median(single))
        print("plural", quant, r16, rbase, r1, r64, single, flush=True)

    pm, tok = peft_model(a16)
    rec = hf_sequential(pm, tok, a16, msgs, args.baseline_requests)
    tt = closed_loop(rec, args.requests)
    svc = [s for s, _ in rec]
    rows["transformers + PEFT, sequential"] = (NEW_TOKENS * len(rec) / sum(svc), pct(tt, 50), pct(tt, 99),
                                               statistics.median((NEW_TOKENS - 1) / (s - f) for s, f in rec))
    wall, first, n_tok = peft_mixed_batch(pm, tok, a16, msgs)
    rows["PEFT mixed-adapter batch (16, static)"] = (n_tok / wall, first, first, float("nan"))
    print("hf", rows, flush=True)
    del pm

    rec, tps, dec = llamacpp(a16, msgs, args.baseline_requests, work)
    tt = closed_loop(rec, args.requests)
    rows["llama.cpp (Q4_1 GGUF + GGUF LoRA), sequential"] = (tps, pct(tt, 50), pct(tt, 99), dec)
    print("llama.cpp", rows, flush=True)

    lc = rows["llama.cpp (Q4_1 GGUF + GGUF LoRA), sequential"]
    lines = [
        f"Workload: {args.requests} chat requests x {NEW_TOKENS} new tokens, concurrency {CONCURRENCY}, request i uses "
        "adapter i mod 16 (PEFT-default LoRA r=8 on q_proj+v_proj) on SmolLM2-135M-Instruct. Sequential baselines: "
        f"{args.baseline_requests} requests measured, closed-loop TTFT computed from their per-request times. "
        f"llama.cpp's build: {llama_build()}.",
        "",
        f"Command: `{command()}`",
        "",
        "| system | aggregate tok/s | TTFT p50 (s) | TTFT p99 (s) | single-stream decode tok/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (tps, p50, p99, ss) in rows.items():
        ss_s = "—" if ss != ss else f"{ss:.1f}"
        lines.append(f"| {name} | {tps:.1f} | {p50:.2f} | {p99:.2f} | {ss_s} |")
    lines += [
        "",
        "plural serve, same workload, by number of distinct adapters:",
        "",
        "| weights | adapters | aggregate tok/s | TTFT p50 (s) | TTFT p99 (s) |",
        "|---|---|---:|---:|---:|",
    ]
    targets = []
    for label, r16, rbase, r1, r64, single in plural.values():
        lines += [
            f"| {label} | base model only (median of {args.repeats}) | {rbase['tok_s']:.1f} | {rbase['ttft_p50']:.2f} | {rbase['ttft_p99']:.2f} |",
            f"| {label} | 1 | {r1['tok_s']:.1f} | {r1['ttft_p50']:.2f} | {r1['ttft_p99']:.2f} |",
            f"| {label} | 16 (median of {args.repeats}) | {r16['tok_s']:.1f} | {r16['ttft_p50']:.2f} | {r16['ttft_p99']:.2f} |",
            f"| {label} | 64 registered; requests on adapters never used before (loaded on first use into 16 LRU slots) | {r64['tok_s']:.1f} | {r64['ttft_p50']:.2f} | {r64['ttft_p99']:.2f} |",
        ]
        targets.append(f"- plural {label}: aggregate vs llama.cpp {r16['tok_s'] / lc[0]:.2f}x (target 3x); 16 adapters vs base-only "
                       f"{r16['tok_s'] / rbase['tok_s']:.0%} (target 90%); single stream vs llama.cpp {single / lc[3]:.2f}x (target 0.5x); "
                       f"TTFT p50 at {CONCURRENCY} concurrent {r16['ttft_p50']:.2f} s (target 1 s).")
    lines += ["", "Targets:", *targets]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        # One section per CPU kind (issue 19): the AMX figures and the AVX2 ones side by side.
        from plural.cpu import cpu_info

        kind = cpu_info().kind
        write_section("serve" if kind in ("amx", "avx512_bf16") else f"serve-{kind}", body)


if __name__ == "__main__":
    main()
