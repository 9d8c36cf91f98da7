"""Structured output under load: aggregate tok/s at 16 concurrent requests, half of them JSON-schema
constrained, against none constrained (issue 13; target: at most 5% lower).

Workload: N streaming chat requests (default 64) to `plural serve` on SmolLM2-135M-Instruct,
concurrency 16 (closed loop), 128 new tokens each. Unconstrained requests ignore end-of-turn so
they generate exactly 128; constrained ones use `response_format: json_schema` with a schema that
cannot be complete before 128 tokens (an array of at least 50 objects), so they generate exactly
128 too and both runs do the same work apart from the grammar. Runs alternate (none, half, none,
half, ...) `--repeats` times; the table shows medians.

    PLURAL_HOME=/tmp/ph python benchmarks/structured_bench.py [--requests 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import command, write_section
from serve_bench import PluralServer, pct, prompts, stream_chat

NEW_TOKENS = 128
CONCURRENCY = 16
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"], "properties": {"items": {
    "type": "array", "minItems": 50, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "qty"],
        "properties": {"name": {"type": "string", "maxLength": 20}, "qty": {"type": "integer", "minimum": 0}}}}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA, "strict": True}}


async def workload(port: int, msgs, constrained: list[bool]) -> dict:
    import httpx

    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", timeout=600,
                               limits=httpx.Limits(max_connections=CONCURRENCY + 4))
    sem = asyncio.Semaphore(CONCURRENCY)
    tokens, ttfts, valid = [], [], []

    async def one(m, grammar: bool):
        async with sem:
            t0 = time.perf_counter()
            first, n, text = None, 0, []
            body = {"model": "smollm2-135m-instruct", "messages": m, "max_tokens": NEW_TOKENS, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            body.update({"response_format": FORMAT} if grammar else {"ignore_eos": True})
            async for ch in stream_chat(client, body):
                if ch.get("choices") and (piece := ch["choices"][0]["delta"].get("content")):
                    first = first or time.perf_counter()
                    text.append(piece)
                if ch.get("usage"):
                    n = ch["usage"]["completion_tokens"]
            ttfts.append(first - t0)
            tokens.append(n)
            if grammar:  # a 128-token prefix of the schema's language: it opens the object as required
                valid.append("".join(text).startswith('{"items": [{"name": "'))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m, c) for m, c in zip(msgs, constrained)))
    wall = time.perf_counter() - t0
    await client.aclose()
    return {"tok_s": sum(tokens) / wall, "ttft_p50": pct(ttfts, 50), "tokens": tokens, "valid": valid}


def engine_runs(msgs, repeats: int) -> dict:
    """The same workload on the engine in-process (16 sequences at a time, no HTTP): what the
    grammar costs the batch, without the load generator and the event loop on the same cores."""
    import threading

    import torch

    from plural.serve.app import pick_dtype
    from plural.serve.engine import Engine
    from plural.serve.grammar import Grammars, json_schema_grammar
    from plural.serve.sampler import SamplingParams
    from plural.serve.sequence import Sequence
    from plural.store.models import load_model

    model, tok, _ = load_model("smollm2-135m-instruct")
    eng = Engine(model, tok, max_batch=CONCURRENCY, max_len=1024, max_queue=len(msgs) + 1, max_loras=1,
                 max_lora_rank=8, cache_bytes=1 << 30, dtype=pick_dtype("auto", torch.device("cpu")), device=torch.device("cpu"))
    eng.start()
    grammars = Grammars(tok, eng.stop_ids)
    grammar = json_schema_grammar(SCHEMA)
    grammars.constraint(grammar)  # compile once (cached by hash), as the server does at request time
    ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ids]

    def run(half: bool) -> dict:
        done, left, tokens = threading.Event(), [len(ids)], [0]
        texts = [[] for _ in ids]

        def sink(i):
            def emit(ev):
                tokens[0] += len(ev.token_ids)
                texts[i].append(ev.text)
                if ev.finish_reason:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
            return emit

        seqs = []
        for i, p in enumerate(ids):
            c = grammars.constraint(grammar) if half and i % 2 == 0 else None
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=c is None)
            seqs.append(Sequence("bench", None, p, params, sink(i), constraint=c))
        t0 = time.perf_counter()
        eng.submit(seqs)  # the scheduler keeps 16 running (max_batch), the rest wait: a closed loop
        done.wait()
        wall = time.perf_counter() - t0
        assert tokens[0] == NEW_TOKENS * len(ids), tokens[0]
        valid = [("".join(texts[i])).startswith('{"items": [{"name": "') for i in range(0, len(ids), 2)] if half else []
        return {"tok_s": tokens[0] / wall, "ttft_p50": float("nan"), "valid": valid}

    run(True)  # warm-up
    runs = {"none": [], "half": []}
    try:
        for _ in range(repeats):
            for name in runs:
                r = run(name == "half")
                assert all(r["valid"]), "a constrained answer did not start as the schema requires"
                runs[name].append(r)
                print("engine", name, f"{r['tok_s']:.1f} tok/s", flush=True)
    finally:
        eng.stop()
    return runs


def main() -> None:
    global NEW_TOKENS
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=["http", "engine"], default="http",
                    help="http: plural serve and a streaming client; engine: the engine in-process")
    ap.add_argument("--tokens", type=int, default=NEW_TOKENS, help="new tokens per request (at most 128)")
    args = ap.parse_args()
    NEW_TOKENS = min(args.tokens, 128)  # the schema cannot be complete before 128 tokens
    msgs = prompts(args.requests)
    msgs = [[{"role": "user", "content": m[0]["content"] + " Then list the items of the order as JSON."}] for m in msgs]
    if args.mode == "engine":
        import torch

        from plural.serve.app import pick_dtype

        report(args, engine_runs(msgs, args.repeats), str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch."))
        return
    with tempfile.TemporaryDirectory() as work:
        srv = PluralServer([], Path(work))
        try:
            # Warm-up (and the grammar compile, cached by hash from then on).
            asyncio.run(workload(srv.port, msgs[:CONCURRENCY], [i % 2 == 0 for i in range(CONCURRENCY)]))
            runs = {"none": [], "half": []}
            for _ in range(args.repeats):
                for name in runs:
                    flags = [name == "half" and i % 2 == 0 for i in range(args.requests)]
                    r = asyncio.run(workload(srv.port, msgs, flags))
                    assert all(t == NEW_TOKENS for t in r["tokens"]), r["tokens"]
                    assert all(r["valid"]), "a constrained answer did not start as the schema requires"
                    runs[name].append(r)
                    print(name, f"{r['tok_s']:.1f} tok/s", flush=True)
        finally:
            srv.stop()
    report(args, runs, srv.health["dtype"])


def report(args, runs: dict, dtype: str) -> None:
    med = {k: statistics.median(x["tok_s"] for x in v) for k, v in runs.items()}
    ttft = {k: statistics.median(x["ttft_p50"] for x in v) for k, v in runs.items()}
    ratio = med["half"] / med["none"]
    rows = []
    for k, label in [("none", "none constrained"), ("half", "half constrained (json_schema)")]:
        each = ", ".join(f"{x['tok_s']:.1f}" for x in runs[k])
        first = "—" if ttft[k] != ttft[k] else f"{ttft[k]:.2f}"  # NaN in engine mode: no client clock
        rows.append(f"| {label} | {med[k]:.1f} | {first} | {each} |")
    rows = "\n".join(rows)
    where = ("`plural serve` process, streaming chat requests from a closed-loop httpx client" if args.mode == "http"
             else "the engine in-process (the server's engine, scheduler, grammar masks and sampler; no HTTP)")
    body = f"""Workload ({args.mode}): {args.requests} chat requests x {NEW_TOKENS} new tokens, {CONCURRENCY} at a time, SmolLM2-135M-Instruct ({dtype}, fused runner), base model; {where}. Constrained requests: json_schema (an array of at least 50 `{{name, qty}}` objects, so every answer runs to {NEW_TOKENS} tokens like the unconstrained ones, which ignore end-of-turn), every other request. Runs alternate, {args.repeats} of each; medians.

Command: `{command()}`

| requests | aggregate tok/s (median) | TTFT p50 (s) | runs (tok/s) |
|---|---:|---:|---|
{rows}

Half constrained vs none: {ratio * 100:.1f}% of the throughput (target: at least 95%, i.e. at most 5% lower)."""
    write_section(f"structured-{args.mode}", body)
    print(body)


if __name__ == "__main__":
    main()
