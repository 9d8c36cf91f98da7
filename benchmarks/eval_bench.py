"""`plural eval` speed: the base plus three adapters on the bundled suites with SmolLM2, and each of
its choices side by side with the naive alternative.

    PLURAL_HOME=/tmp/ph python benchmarks/eval_bench.py [--runs 2] [--repeats 3]

1. Three adapters trained briefly with peft on the demo data (cached in --work).
2. The full evaluation (base + 3 adapters, every bundled suite), `--runs` times: wall time from
   start to report, and whether the runs gave identical numbers.
3. Side by side, medians over `--repeats` runs:
   - variants: one base load + PEFT adapter switching, vs loading base + adapter per variant;
   - log-likelihood suites (perplexity, choice, preference): batched by token budget, vs one item per forward;
   - generation (support-qa): 8 prompts per batch, vs one prompt at a time (one run each: slow).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import command, write_section  # noqa: E402

ADAPTERS = [("support-r8", 8, 1e-3), ("support-r16", 16, 1e-3), ("support-r16-slow", 16, 3e-4)]


def train_adapters(work: Path, steps: int) -> list[Path]:
    """Three LoRA adapters (q/k/v/o, ranks and learning rates above), `steps` AdamW steps each on
    batches of 4 demo conversations, loss on the assistant turns only (plural's chat mask).

    Brief on purpose: the benchmark measures evaluation speed, and `plural tune` on this shared
    2-core machine would take longer than the evaluation itself.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from plural.data.chat import IGNORE, encode_chat
    from plural.data.records import load_records
    from plural.store.adapters import build_manifest, save_adapter
    from plural.store.models import load_model

    data = ROOT / "examples/support/train.jsonl"
    out = []
    for j, (name, r, lr) in enumerate(ADAPTERS):
        final = work / name / "adapter"
        out.append(final)
        if (final / "adapter_model.safetensors").is_file():
            continue
        model, tok, stored = load_model(None)
        _, recs = load_records(data, "chat")
        enc = [encode_chat(tok, rec.data["messages"]) for rec in recs]
        torch.manual_seed(j)
        peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=lr)
        peft.train()
        for step in range(steps):
            batch = [enc[(4 * step + k + j) % len(enc)] for k in range(4)]
            width = max(len(e) for e in batch)
            ids = torch.tensor([e.input_ids + [tok.pad_token_id] * (width - len(e)) for e in batch])
            labels = torch.tensor([e.labels + [IGNORE] * (width - len(e)) for e in batch])
            mask = (torch.arange(width)[None, :] < torch.tensor([len(e) for e in batch])[:, None]).long()
            loss = peft(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            print(f"{name} step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
        peft.eval()
        save_adapter(peft, final, build_manifest(stored, "sft", {"benchmark": True, "r": r, "lr": lr, "steps": steps}, [data]))
    return out


def timed(fn):
    t = time.perf_counter()
    res = fn()
    return time.perf_counter() - t, res


def numbers(report: dict) -> list:
    return [(s["name"], m["name"], v, m["values"][v]["value"], m["values"][v]["lo"], m["values"][v]["hi"])
            for s in report["suites"] for m in s["metrics"] for v in m["values"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="training steps per adapter")
    ap.add_argument("--work", type=Path, default=Path("/tmp/plural-eval-bench"))
    ap.add_argument("--limit", type=int, default=None, help="items per suite in the full evaluation (default: all)")
    ap.add_argument("--sxs-limit", type=int, default=None, help="items per suite in the side-by-side timings (default: all)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    print("$", command(), flush=True)

    import torch

    from plural.evaluate.kinds import score_qa
    from plural.evaluate.run import EvalConfig, Variant, _Active, evaluate, load_suites, load_variants
    from plural.evaluate.scoring import Scorer
    from plural.evaluate.suites import get_kind
    from plural.generation import load_for_inference

    adapters = train_adapters(args.work, args.steps)
    cfg = EvalConfig(adapters=[str(a) for a in adapters], limit=args.limit)

    # 2. the full evaluation
    walls, reports = [], []
    for i in range(args.runs):
        w, rep = timed(lambda: evaluate(cfg))
        walls.append(w)
        reports.append(rep)
        print(f"full run {i + 1}: {w:.1f} s", flush=True)
    identical = all(numbers(r) == numbers(reports[0]) for r in reports[1:])
    rep = reports[0]
    per_suite = {s["name"]: sum(s["seconds"].values()) for s in rep["suites"]}
    (args.work / "report.json").write_text(json.dumps(rep, indent=1))

    # 3a. variants: one load + switching vs a load per variant
    variants = [Variant("base", None)] + [Variant(p.parent.name, p, key=f"v{i}") for i, p in enumerate(adapters)]

    def switching():
        m, tok, _ = load_variants(cfg, variants)
        for v in variants:
            with _Active(m, v):
                pass

    def reloading():
        for v in variants:
            load_for_inference(None, v.adapter)

    sw = [timed(switching)[0] for _ in range(args.repeats)]
    rl = [timed(reloading)[0] for _ in range(args.repeats)]

    # 3b. log-likelihood suites, base model: batched vs one item per forward
    suites = {s.name: s for s in load_suites(cfg.model_copy(update={"limit": args.sxs_limit}))}
    ll_suites = [s for s in suites.values() if s.kind in ("perplexity", "choice", "preference")]
    model, tok, _ = load_variants(EvalConfig(), [Variant("base", None)])

    def score_all(batch_tokens):
        sc = Scorer(model, tok, batch_tokens=batch_tokens)
        with torch.inference_mode():
            return [get_kind(s.kind).score(sc, s) for s in ll_suites]

    bt = [timed(lambda: score_all(cfg.batch_tokens))[0] for _ in range(args.repeats)]
    one = [timed(lambda: score_all(1))[0] for _ in range(args.repeats)]
    a, b = score_all(cfg.batch_tokens), score_all(1)
    max_dev = max(abs(x - y) for ra, rb in zip(a, b) for k in ra.metrics for x, y in zip(ra.metrics[k].num, rb.metrics[k].num))

    # 3c. generation on support-qa: 8 per batch vs 1
    qa = suites["support-qa"]
    g8, r8 = timed(lambda: score_qa(Scorer(model, tok, gen_batch_size=8), qa))
    g1, r1 = timed(lambda: score_qa(Scorer(model, tok, gen_batch_size=1), qa))
    same_answers = sum(x["output"] == y["output"] for x, y in zip(r8.samples, r1.samples))

    med = statistics.median
    n_items = sum(s["items"] for s in rep["suites"])
    load_avg = os.getloadavg()[0]
    body = f"""Command: `{command()}` (adapters: {len(adapters)} LoRA adapters, r = 8/16/16 on q/k/v/o, {args.steps} AdamW steps each on the demo data).

**Base + 3 adapters on every bundled suite** ({len(rep['suites'])} suites, {n_items} items{f" (first {args.limit} of each)" if args.limit else ""}, SmolLM2-135M fp32, greedy):
{', '.join(f'{w:.1f} s' for w in walls)} wall ({'median ' + format(med(walls), '.1f') + ' s; ' if len(walls) > 1 else ''}target: under 300 s);
same numbers in every run: {('**yes**' if identical else '**NO**') if len(walls) > 1 else 'not checked (one run)'}. Load average (1 min) at the end: {load_avg:.1f}; torch threads: {torch.get_num_threads()}.

| suite | kind | items | seconds (4 variants) |
|---|---|---:|---:|
""" + "\n".join(f"| {s['name']} | {s['kind']} | {s['items']} | {per_suite[s['name']]:.1f} |" for s in rep["suites"]) + f"""

**Side by side** (medians of {args.repeats}; generation: one run each{f"; first {args.sxs_limit} items of each suite" if args.sxs_limit else ""}):

| step | plural eval | naive alternative | speed-up |
|---|---:|---:|---:|
| 4 variants ready (base load + 3 adapters) | {med(sw):.2f} s (one load, PEFT set_adapter) | {med(rl):.2f} s (base reloaded per variant) | {med(rl) / med(sw):.1f}× |
| log-likelihood suites, base ({sum(len(s.items) for s in ll_suites)} items) | {med(bt):.2f} s (batched, {cfg.batch_tokens}-token budget) | {med(one):.2f} s (one item per forward) | {med(one) / med(bt):.1f}× |
| support-qa generation, base ({len(qa.items)} prompts × ≤48 tokens) | {g8:.1f} s (8 per batch) | {g1:.1f} s (one at a time) | {g1 / g8:.1f}× |

Batched and one-at-a-time log-likelihoods differ by at most {max_dev:.1e} (float32 summation order);
{same_answers}/{len(qa.items)} generated answers are identical between batch 8 and batch 1.
"""
    print(body)
    if not args.no_write:
        write_section("eval", body)


if __name__ == "__main__":
    main()
