"""Serving every family: the fused runner, the generic runner and transformers + PEFT, side by side.

For each family, a model of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads,
MLP 1536, vocabulary 49152; random weights: speed does not depend on them) with 16 LoRA adapters
(r=8 on the attention input projections, random B). Workload: 48 requests of 128 new tokens,
16 concurrent (a closed loop: a finished request is replaced by the next), request i on adapter
i mod 16, in plural's engine in-process (no HTTP: the runners are what differ). Systems:

- fused runner (families it computes), generic runner (all), both through the same engine;
- transformers + PEFT, sequential (one request at a time, `set_adapter` per request; measured on
  4 requests, its tok/s does not depend on the count).

Targets (issue 12): each fused family within 15% of Llama's tok/s at equal parameter count; the
generic runner at least 3x sequential transformers + PEFT. Median of `--repeats` runs, families and
runners alternating within each repeat.

    python benchmarks/family_bench.py [--families llama,mistral,qwen2,qwen3,gemma2,phi3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _report import command, write_section

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=2048, vocab_size=49152, tie_word_embeddings=True,
             rms_norm_eps=1e-5)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=4096),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=64),
    "gemma2": dict(model_type="gemma2", head_dim=64, query_pre_attn_scalar=64, sliding_window=4096,
                   hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False),
}
ADAPTERS, CONCURRENCY, NEW_TOKENS = 16, 16, 128


def build(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**SHAPE, **FAMILIES[family]}
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def adapter_weights(model, out: Path) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in ("q_proj", "v_proj", "qkv_proj") if t in names]
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    paths = []
    for i in range(ADAPTERS):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        pm.save_pretrained(out / f"a{i:02d}", safe_serialization=True)
        paths.append(out / f"a{i:02d}")
    return paths


def prompts(tok, n):
    topics = ["a refund", "a late delivery", "a password reset", "roaming fees", "a broken screen", "an invoice"]
    return [tok(f"Write a short, friendly reply to a customer asking about {topics[i % len(topics)]} (case {i}).",
                add_special_tokens=False)["input_ids"] for i in range(n)]


def engine_tok_s(model, tok, adapters, runner: str, dtype, n_requests: int) -> float:
    """Aggregate generated tok/s of the closed-loop workload through plural's engine."""
    from plural.serve.engine import Engine, SamplingParams, Sequence
    from plural.serve.registry import make_adapter

    eng = Engine(copy.deepcopy(model), tok, max_batch=CONCURRENCY, max_len=512, max_queue=64, max_loras=ADAPTERS,
                 max_lora_rank=8, cache_bytes=1 << 30, dtype=dtype, device=torch.device("cpu"), runner=runner,
                 threads=os.cpu_count() or 1)
    for i, p in enumerate(adapters):
        eng.add_adapter(make_adapter(f"a{i:02d}", p, None, eng.runner, 8))
    eng.start()
    ids = prompts(tok, n_requests)
    done = threading.Semaphore(0)
    tokens = [0]

    def submit(i):
        def emit(ev):
            if ev.finish_reason:
                tokens[0] += ev.completion_tokens
                done.release()
        eng.submit([Sequence("m", eng.adapters[f"a{i % ADAPTERS:02d}"], ids[i],
                             SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True), emit)])

    # Warm-up: every adapter resident, kernels primed (not timed).
    for i in range(ADAPTERS):
        submit(i)
    for _ in range(ADAPTERS):
        done.acquire()
    tokens[0] = 0
    t0 = time.perf_counter()
    for i in range(CONCURRENCY):
        submit(i)
    for i in range(CONCURRENCY, n_requests):
        done.acquire()
        submit(i)
    for _ in range(CONCURRENCY):
        done.acquire()
    wall = time.perf_counter() - t0
    eng.stop()
    return tokens[0] / wall


def peft_sequential_tok_s(model, tok, adapters, dtype, n: int = 4) -> float:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(model).to(dtype), str(adapters[0]), adapter_name="a00")
    for i, p in enumerate(adapters[1:n], start=1):
        pm.load_adapter(str(p), adapter_name=f"a{i:02d}")
    ids = prompts(tok, n)
    total, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            pm.set_adapter(f"a{i:02d}")
            x = torch.tensor([ids[i]])
            out = pm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0)
            total += out.shape[1] - x.shape[1]
    return total / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--peft-requests", type=int, default=4, help="requests measured for sequential transformers + PEFT")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU has fast bf16, else fp32), float32, bfloat16")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = ap.parse_args()
    import tempfile

    from transformers import AutoTokenizer

    from plural.serve.app import pick_dtype
    from plural.serve.fused import supports
    from plural.store.models import get_model, import_model

    # As `plural serve` does (cli/serve.py): the main thread stays at one intra-op thread, the engine
    # thread has them all. Once the main thread has run a multi-threaded OpenMP region, the engine
    # thread's run slower (libgomp; docs/serving.md "Threads"), which would slow every runner here.
    torch.set_num_threads(1)
    try:
        tok_path = get_model("smollm2-135m-instruct").path
    except Exception:
        tok_path = import_model(None).path
    tok = AutoTokenizer.from_pretrained(tok_path)
    dtype = pick_dtype(args.dtype, torch.device("cpu"))
    families = args.families.split(",")
    with tempfile.TemporaryDirectory() as d:
        built = {}
        for family in families:
            model = build(family)
            built[family] = (model, adapter_weights(model, Path(d) / family),
                             (["fused"] if supports(model.config) else []) + ["generic"])
        # Families and runners alternate within each repeat, so a change in the machine's load during
        # the run moves every family's figure alike and the ratios to Llama stay comparable.
        runs = {f: {r: [] for r in built[f][2]} for f in families}
        for _ in range(args.repeats):
            for family in families:
                model, adapters, runners = built[family]
                for r in runners:
                    runs[family][r].append(engine_tok_s(model, tok, adapters, r, dtype, args.requests))
        rows = []
        torch.set_num_threads(os.cpu_count() or 1)  # transformers + PEFT runs on the main thread
        for family in families:
            model, adapters, _ = built[family]
            seq = peft_sequential_tok_s(model, tok, adapters, dtype, args.peft_requests)
            params = sum(p.numel() for p in model.parameters())
            med = {r: statistics.median(v) for r, v in runs[family].items()}
            rows.append((family, params, med.get("fused"), med["generic"], seq))
            print(family, f"{params / 1e6:.0f}M", {r: [round(x, 1) for x in v] for r, v in runs[family].items()},
                  f"peft {seq:.1f}", flush=True)
    llama = next((r[2] for r in rows if r[0] == "llama"), None)
    lines = [
        f"`{command()}` — dtype {str(dtype).removeprefix('torch.')}; {ADAPTERS} adapters, {CONCURRENCY} concurrent, "
        f"{args.requests} requests x {NEW_TOKENS} tokens, median of {args.repeats}; engine in-process.",
        "",
        "| family | parameters | fused tok/s | vs Llama (fused) | generic tok/s | transformers + PEFT sequential tok/s | generic / sequential |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for family, params, fused, generic, seq in rows:
        rel = f"{fused / llama:.2f}" if fused and llama else "—"
        lines.append(f"| {family} | {params / 1e6:.0f}M | {f'{fused:.1f}' if fused else '— (generic only)'} | {rel} | "
                     f"{generic:.1f} | {seq:.1f} | {generic / seq:.1f}x |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("families", "### Serving every family (issue 12)\n\n" + body)


if __name__ == "__main__":
    main()
