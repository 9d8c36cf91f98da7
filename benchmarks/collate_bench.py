"""Padded against flat micro-batches (data.packing.collate's flat_max) on the demo's data.

One training step (forward, backward; no optimizer) of SmolLM2-135M-Instruct with the sft recipe's
LoRA on examples/support/train.jsonl + the 16 replayed documents, unpacked, batch 4: the same
batches laid out padded to the longest row, then as one row. Alternates the two `--repeats` times
and prints the median seconds per step of each, the ratio, the relative gradient difference, and the CPU.

    python benchmarks/collate_bench.py [--steps 8] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from _report import machine

    from plural.config import load_config
    from plural.data.packing import FLAT_MAX, collate
    from plural.store.models import load_model
    from plural.tune import loop, sft
    from plural.tune.config import TuneConfig

    cfg = load_config(TuneConfig, ROOT / "examples/support/tune.yaml", ["data.packing=false", "data.replay=16", "lora.rslora=true"])
    model, tok, _ = load_model(cfg.model)
    rows = sft.to_rows(sft.encode_files(tok, cfg.data.train, cfg) + sft.replay_docs(tok, cfg), cfg)
    model = sft.add_lora(model, cfg)
    model.train()
    lm = loop.TokenLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(s: int, flat_max: int) -> torch.Tensor:
        (m,) = loop.step_batches(rows, cfg, s, loop.Dist())
        total, _ = lm(**collate(m, tok.pad_token_id, flat_max))
        total.backward()
        g = torch.cat([p.grad.flatten() for p in params])
        for p in params:
            p.grad = None
        return g

    g_pad, g_flat = step(0, 0), step(0, FLAT_MAX)
    diff = float((g_pad - g_flat).norm() / g_pad.norm())
    times: dict[str, list[float]] = {"padded": [], "flat": []}
    for _ in range(args.repeats):
        for name, limit in (("padded", 0), ("flat", FLAT_MAX)):
            t0 = time.perf_counter()
            for s in range(1, 1 + args.steps):
                step(s, limit)
            times[name].append((time.perf_counter() - t0) / args.steps)
    pad, flat = statistics.median(times["padded"]), statistics.median(times["flat"])
    print(f"machine: {machine()}")
    print(f"padded {pad:.2f} s/step, flat {flat:.2f} s/step (medians of {args.repeats}, {args.steps} steps each, "
          f"{args.threads} threads): flat/padded {flat / pad:.2f}; gradient relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
