"""`plural tune` vs a plain TRL `SFTTrainer` with its default settings, side by side.

Same model (SmolLM2-135M-Instruct from the store), same data (examples/support), same LoRA
settings (r 16, alpha 32, dropout 0, all linear projections), same number of epochs (TRL's
default, 3). Each system trains in its own process (so peak RAM is its own), alternating order
over several runs; figures are medians.

Throughput is measured two ways, both over the training loop only (model loading excluded):
- data tokens/s: non-padding tokens of the data set passed through training per second;
- loss tokens/s: tokens that carried loss per second (plural: assistant turns only, its
  default; TRL defaults: every non-padding token).
The held-out loss of both adapters is computed by one function (mean cross-entropy per assistant
token of examples/support/eval.jsonl, fp32), so it is comparable.

    python benchmarks/tune_bench.py [--runs 3] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples/support/train.jsonl"
EVAL = ROOT / "examples/support/eval.jsonl"
CONFIG = ROOT / "examples/support/tune.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_plural(out: Path, epochs: float) -> dict:
    from plural import tune
    from plural.cli.tune import load_tune_config

    # Packing on and the old demo's lr/warm-up, as measured before the defaults were sized to the
    # data: this benchmark compares throughput, which packing decides.
    cfg = load_tune_config(CONFIG, [f"train.epochs={epochs}", "train.save_every=0", "data.eval=null", "train.eval_every=0",
                                    "data.packing=true", "train.lr=1e-3", "train.warmup_ratio=0.05", f"output={out}"])
    adapter = tune.run(cfg)
    hist = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    m = json.loads((adapter / "plural.json").read_text())["metrics"]
    return {"seconds": m["seconds"], "data_tokens": sum(h["input_tokens"] for h in hist),
            "loss_tokens": m["trained_tokens"], "adapter": str(adapter), "precision": m["precision"]}


def worker_trl(out: Path, epochs: float) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from plural.store.models import get_model

    path = get_model().path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = load_dataset("json", data_files=str(TRAIN), split="train")
    from plural.cpu import cpu_info

    # TRL's defaults, except on a CPU without native bf16 (AVX2, issue 19): there its default bf16
    # autocast is emulated, and a user of that CPU trains in fp32, as plural's `precision: auto` does.
    fp32 = {} if torch.cuda.is_available() or cpu_info().fast_bf16 else {"bf16": False}
    args = SFTConfig(output_dir=str(out / "trainer"), num_train_epochs=epochs, report_to=[], save_strategy="no",
                     use_cpu=not torch.cuda.is_available(), disable_tqdm=True, **fp32)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    # count what the trainer will see: non-padding tokens and loss-carrying tokens per epoch
    data_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.model.save_pretrained(str(out / "adapter"))
    return {"seconds": seconds, "data_tokens": int(data_tokens * epochs), "loss_tokens": int(data_tokens * epochs),
            "adapter": str(out / "adapter"), "precision": "bf16" if args.bf16 else "fp32",
            "settings": {"batch_size": args.per_device_train_batch_size, "lr": args.learning_rate, "gradient_checkpointing": args.gradient_checkpointing,
                         "packing": args.packing, "max_length": args.max_length, "bf16": args.bf16}}


def heldout_loss(adapter: str) -> float:
    """Mean CE per assistant token on the held-out split, fp32, one function for both systems."""
    import torch

    from plural.data.chat import encode_chat
    from plural.data.packing import unpacked
    from plural.data.records import load_records
    from plural.generation import load_for_inference
    from plural.tune.loop import TokenLoss, evaluate

    model, tok, _ = load_for_inference(None, adapter)
    _, recs = load_records(EVAL, "chat")
    rows = unpacked([encode_chat(tok, r.data["messages"]) for r in recs])
    return evaluate(TokenLoss(model), rows, tok.pad_token_id, torch.device("cpu"), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--worker", choices=["plural", "trl"])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.worker:
        res = (worker_plural if a.worker == "plural" else worker_trl)(a.out, a.epochs)
        res["peak_rss_mb"] = peak_rss_mb()
        print("RESULT " + json.dumps(res))
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _report import command, write_section

    print(f"$ {command()}", flush=True)
    results: dict[str, list[dict]] = {"plural": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.runs):
            order = ["trl", "plural"] if r % 2 == 0 else ["plural", "trl"]
            for name in order:
                out = Path(tmp) / f"{name}-{r}"
                p = subprocess.run([sys.executable, __file__, "--worker", name, "--out", str(out), "--epochs", str(a.epochs)],
                                   capture_output=True, text=True)
                line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
                if p.returncode != 0 or line is None:
                    sys.exit(f"{name} run {r} failed:\n{p.stderr[-3000:]}")
                res = json.loads(line[7:])
                res["heldout_loss"] = heldout_loss(res["adapter"])
                results[name].append(res)
                print(f"run {r} {name}: {res['data_tokens'] / res['seconds']:.0f} data tok/s, "
                      f"{res['loss_tokens'] / res['seconds']:.0f} loss tok/s, {res['seconds']:.0f}s, "
                      f"peak {res['peak_rss_mb']:.0f} MB, held-out loss {res['heldout_loss']:.3f}", flush=True)

    med = lambda name, f: statistics.median(f(x) for x in results[name])
    rows = {}
    for name in results:
        rows[name] = {
            "data": med(name, lambda x: x["data_tokens"] / x["seconds"]),
            "loss": med(name, lambda x: x["loss_tokens"] / x["seconds"]),
            "rss": med(name, lambda x: x["peak_rss_mb"]),
            "heldout": med(name, lambda x: x["heldout_loss"]),
            "secs": med(name, lambda x: x["seconds"]),
            "precision": results[name][0]["precision"],
        }
    ratio = rows["plural"]["data"] / rows["trl"]["data"]
    s = results["trl"][0]["settings"]
    md = f"""Command: `{command()}`

| system | data tokens/s | loss tokens/s | train time (s) | peak RAM (MB) | held-out loss |
|---|---:|---:|---:|---:|---:|
| plural tune (packing, bf16 autocast where native, loss on assistant tokens; {rows['plural']['precision']}) | {rows['plural']['data']:.0f} | {rows['plural']['loss']:.0f} | {rows['plural']['secs']:.0f} | {rows['plural']['rss']:.0f} | {rows['plural']['heldout']:.3f} |
| TRL SFTTrainer defaults (batch {s['batch_size']}, lr {s['lr']}, gradient checkpointing {s['gradient_checkpointing']}, packing {s['packing']}, bf16 {s['bf16']}) | {rows['trl']['data']:.0f} | {rows['trl']['loss']:.0f} | {rows['trl']['secs']:.0f} | {rows['trl']['rss']:.0f} | {rows['trl']['heldout']:.3f} |

Medians of {a.runs} runs each, {a.epochs:g} epochs of examples/support/train.jsonl, SmolLM2-135M-Instruct, LoRA r 16 on all linear
projections. **Throughput ratio (data tokens/s): {ratio:.2f}×** (target ≥ 2×); held-out loss
{'lower or equal' if rows['plural']['heldout'] <= rows['trl']['heldout'] else 'HIGHER'} for plural
({rows['plural']['heldout']:.3f} vs {rows['trl']['heldout']:.3f}).
"""
    print(md)
    from plural.cpu import cpu_info

    kind = cpu_info().kind  # one section per CPU kind: the AMX figures and the AVX2 ones side by side
    write_section("tune" if kind in ("amx", "avx512_bf16") else f"tune-{kind}", md)


if __name__ == "__main__":
    main()
