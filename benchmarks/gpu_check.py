"""Plural's own engine and a LoRA training step on a GPU (issue 18), with only PyTorch, transformers
and peft installed (plural itself from `src/`, nothing else: no model files, no tokenizer files).

Model: SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocabulary
49152), random weights (speed does not depend on them), a word-level tokenizer over the same ids
built in-process. Adapters: r=8 on q/v/o and the MLP, random B (so they change the output).

1. Greedy equality: plural's engine (runner auto = fused for Llama) against transformers + PEFT
   `generate`, for the base and 3 adapters, mixed in one batch; float32 with TF32 off (where both
   compute the same sums, tokens must be identical), and bf16 reported as agreement (bf16 rounding
   differs between kernels, so a long continuation may part ways at a near-tie).
2. Throughput: aggregate generated tok/s, closed loop (a finished request is replaced at once),
   at 16 and 64 concurrent requests spread over 16 and 64 adapters, against the base alone at the
   same concurrency (target: >= 90% of base-only, as S-LoRA reports for its batched kernels).
3. One LoRA SFT step (PEFT, batch 4 x 256 tokens, bf16 autocast, AdamW): seconds and peak memory.

    bash benchmarks/gpu_check.sh                       # on the GPU machine, <= 8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny # the same code paths on a CPU, tiny sizes

Writes gpu_check.json and gpu_check.md to --out (default: $OUT or .), prints the markdown.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, vocab_size=49152, tie_word_embeddings=True,
            rms_norm_eps=1e-5)
TINY = dict(SMOL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512)
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EOS = 0


def word_tokenizer(vocab: int):
    """A tokenizer for ids 0..vocab-1 (token i is the word "t<i>"): the engine detokenises with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token=f"t{EOS}", unk_token="t1", pad_token=f"t{EOS}")


def build_model(shape: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, bos_token_id=1, eos_token_id=EOS, pad_token_id=EOS)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # sharper logits than 0.02: greedy ties are rarer
    return model


def make_adapters(model, out: Path, n: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                          init_lora_weights=False))
    paths = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.05)
        pm.save_pretrained(out / f"a{i:02d}", safe_serialization=True)
        paths.append(out / f"a{i:02d}")
    return paths


def prompts(vocab: int, n: int, length: int, seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (length + i % 5,), generator=g).tolist() for i in range(n)]


def make_engine(model, tok, adapters, *, rows: int, dtype, device, max_len: int, slots: int):
    from plural.serve.engine import Engine
    from plural.serve.registry import make_adapter

    eng = Engine(copy.deepcopy(model), tok, max_batch=rows, max_len=max_len, max_queue=4096, max_loras=max(1, slots),
                 max_lora_rank=8, cache_bytes=8 << 30, dtype=dtype, device=device)
    for i, p in enumerate(adapters):
        eng.add_adapter(make_adapter(f"a{i:02d}", p, None, eng.runner, 8))
    eng.start()
    return eng


def run_all(eng, jobs: list[tuple[str | None, list[int]]], new_tokens: int, concurrency: int) -> tuple[list[list[int]], float]:
    """Closed loop: `concurrency` requests in flight; returns each job's tokens and the wall time."""
    from plural.serve.engine import SamplingParams, Sequence

    outs: list[list[int] | None] = [None] * len(jobs)
    done = threading.Semaphore(0)

    def submit(i: int) -> None:
        name, ids = jobs[i]
        got: list[int] = []

        def emit(ev, i=i, got=got):
            got.extend(ev.token_ids)
            if ev.finish_reason:
                if ev.error:
                    raise RuntimeError(ev.error)
                outs[i] = got
                done.release()

        adapter = eng.adapters[name] if name else None
        eng.submit([Sequence(name or "base", adapter, ids, SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                                          ignore_eos=True), emit)])

    t0 = time.perf_counter()
    for i in range(min(concurrency, len(jobs))):
        submit(i)
    for i in range(concurrency, len(jobs)):
        done.acquire()
        submit(i)
    for _ in range(min(concurrency, len(jobs))):
        done.acquire()
    return outs, time.perf_counter() - t0


def peft_greedy(model, adapters, jobs, new_tokens: int, dtype, device) -> list[list[int]]:
    from peft import PeftModel

    base = copy.deepcopy(model).to(device=device, dtype=dtype)
    pm = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a00")
    for i, p in enumerate(adapters[1:], start=1):
        pm.load_adapter(str(p), adapter_name=f"a{i:02d}")
    pm.eval()
    out = []
    with torch.inference_mode():
        for name, ids in jobs:
            x = torch.tensor([ids], device=device)
            kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=EOS)
            if name is None:
                with pm.disable_adapter():
                    y = pm.generate(x, **kw)
            else:
                pm.set_adapter(name)
                y = pm.generate(x, **kw)
            out.append(y[0, x.shape[1]:].tolist())
    return out


def greedy_check(model, tok, adapters, device, dtype, new_tokens: int, per_model: int, vocab: int) -> dict:
    names = [None, "a00", "a01", "a02"]
    ps = prompts(vocab, per_model * len(names), 12)
    jobs = [(names[i % len(names)], ps[i]) for i in range(len(ps))]  # base and 3 adapters in one batch
    eng = make_engine(model, tok, adapters[:3], rows=len(jobs), dtype=dtype, device=device, max_len=256, slots=3)
    try:
        ours, _ = run_all(eng, jobs, new_tokens, len(jobs))
    finally:
        eng.stop()
    ref = peft_greedy(model, adapters[:3], jobs, new_tokens, dtype, device)
    same = [a == b for a, b in zip(ours, ref)]
    prefix = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(ours, ref)]
    per = {str(n or "base"): all(s for (m, _), s in zip(jobs, same) if m == n) for n in names}
    # The adapters must matter: their tokens differ from the base's for the same prompt.
    return {"dtype": str(dtype).removeprefix("torch."), "sequences": len(jobs), "new_tokens": new_tokens,
            "identical": sum(same), "all_identical": all(same), "per_model": per,
            "mean_matching_prefix": statistics.mean(prefix)}


def throughput(model, tok, adapters, device, dtype, concurrency: int, n_adapters: int, new_tokens: int,
               rounds: int, vocab: int) -> float:
    ads = adapters[:n_adapters]
    n = concurrency * rounds
    jobs = [(f"a{i % n_adapters:02d}" if n_adapters else None, p) for i, p in enumerate(prompts(vocab, n, 32))]
    eng = make_engine(model, tok, ads, rows=concurrency, dtype=dtype, device=device, max_len=32 + 8 + new_tokens,
                      slots=n_adapters)
    try:
        warm = [(f"a{i:02d}" if n_adapters else None, jobs[0][1]) for i in range(max(1, n_adapters))]
        run_all(eng, warm, 4, concurrency)  # every adapter resident, kernels compiled/primed (not timed)
        outs, wall = run_all(eng, jobs, new_tokens, concurrency)
    finally:
        eng.stop()
    return sum(len(o) for o in outs) / wall


def sft_step(model, device, batch: int, seq: int, vocab: int, steps: int = 5) -> dict:
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(copy.deepcopy(model).to(device), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(2, vocab, (batch, seq), generator=g).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for k in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            loss = m(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k >= 2:  # the first steps allocate and pick kernels
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"batch": batch, "seq": seq, "seconds": s, "tokens_per_s": batch * seq / s, "peak_gib": peak,
            "loss_finite": bool(torch.isfinite(loss).item())}


def machine(device) -> str:
    from _report import machine as describe

    return describe()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model and workload (a CPU smoke run of every step)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; steps that would start later are skipped")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    t_start = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 equality means fp32 sums, not TF32
        torch.backends.cudnn.allow_tf32 = False
    shape = TINY if args.tiny else SMOL
    vocab = shape["vocab_size"]
    conc = (4, 8) if args.tiny else (16, 64)
    counts = (4, 8) if args.tiny else (16, 64)
    new_tokens = 8 if args.tiny else 128
    rounds = 2 if args.tiny else 3
    fast = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = word_tokenizer(vocab)
    model = build_model(shape)
    res: dict = {"machine": machine(device), "device": str(device), "model": "tiny" if args.tiny else "SmolLM2-135M shape",
                 "skipped": []}

    def left() -> float:
        return args.budget - (time.monotonic() - t_start)

    with tempfile.TemporaryDirectory() as d:
        adapters = make_adapters(model, Path(d), max(counts))
        res["greedy"] = [greedy_check(model, tok, adapters, device, torch.float32, 8 if args.tiny else 32, 2, vocab)]
        if fast != torch.float32:
            res["greedy"].append(greedy_check(model, tok, adapters, device, fast, 32, 2, vocab))
        print(json.dumps(res["greedy"]), flush=True)
        res["throughput"] = []
        for c in conc:
            if left() < 60:
                res["skipped"].append(f"throughput at {c} concurrent (time budget)")
                continue
            base = throughput(model, tok, adapters, device, fast, c, 0, new_tokens, rounds, vocab)
            row = {"concurrency": c, "base_tok_s": base}
            for n in counts:
                row[f"lora{n}_tok_s"] = throughput(model, tok, adapters, device, fast, c, n, new_tokens, rounds, vocab)
                row[f"lora{n}_vs_base"] = row[f"lora{n}_tok_s"] / base
            res["throughput"].append(row)
            print(json.dumps(row), flush=True)
    if left() > 20:
        res["sft"] = sft_step(model, device, 2 if args.tiny else 4, 32 if args.tiny else 256, vocab)
    else:
        res["skipped"].append("SFT step (time budget)")
    res["seconds"] = time.monotonic() - t_start
    md = report(res, counts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(res, indent=2)), ("gpu_check.md", md)):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
    print(md)
    return 0 if all(g["all_identical"] for g in res["greedy"] if g["dtype"] == "float32") else 1


def report(res: dict, counts) -> str:
    lines = [f"Machine: {res['machine']}. Model: {res['model']}, random weights; {res['seconds']:.0f} s in all.", ""]
    lines += ["| greedy check | sequences (base + 3 adapters) | identical to transformers + PEFT | mean matching prefix |",
              "|---|---:|---:|---:|"]
    for g in res["greedy"]:
        lines.append(f"| {g['dtype']} | {g['sequences']} x {g['new_tokens']} tokens | {g['identical']} | "
                     f"{g['mean_matching_prefix']:.1f} |")
    if res["throughput"]:
        head = " | ".join(f"{n} adapters tok/s (vs base)" for n in counts)
        lines += ["", f"| concurrent | base-only tok/s | {head} |", "|---:|---:|" + "---:|" * len(counts)]
        for r in res["throughput"]:
            cells = " | ".join(f"{r[f'lora{n}_tok_s']:.0f} ({r[f'lora{n}_vs_base']:.0%})" for n in counts)
            lines.append(f"| {r['concurrency']} | {r['base_tok_s']:.0f} | {cells} |")
    if "sft" in res:
        s = res["sft"]
        peak = f", peak {s['peak_gib']:.2f} GiB" if s["peak_gib"] is not None else ""
        lines += ["", f"LoRA SFT step (r=16, batch {s['batch']} x {s['seq']} tokens): {s['seconds'] * 1000:.0f} ms "
                      f"({s['tokens_per_s']:.0f} tokens/s{peak})."]
    if res["skipped"]:
        lines += ["", "Skipped: " + "; ".join(res["skipped"]) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
