"""Where a serving step's time goes: torch profiler on one decode step (1 and 16 rows) and one prefill.

SmolLM2-135M through plural's fused runner, 16 LoRA adapters resident (r=8, q_proj+v_proj), each
row on its own adapter. Prints, per configuration, the wall time of the step and its time by
category: the projection matmuls (by shape), the output layer, attention, LoRA deltas, norms/RoPE/
activations, and what is left (Python and dispatch: the wall time no kernel accounts for).

To see an AVX2-only machine's kernels on a CPU that has more, cap them for the run:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/profile_step.py --dtype float32 [--quantize int4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from torch.profiler import ProfilerActivity, profile

from _report import command, cpu_flags


def categorise(name: str, shapes: str, hidden: int, vocab: int) -> str:
    n = name.lower()
    if "int4pack" in n or "int8pack" in n or "_linear_pointwise" in n or n in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear"):
        if str(vocab) in shapes:
            return "output layer"
        return f"projections {shapes}"
    if n == "aten::bmm":
        return "LoRA deltas (bmm)"
    if "scaled_dot_product" in n or "flash_attention" in n or "_efficient_attention" in n:
        return "attention"
    if n in ("aten::index_put_", "aten::index", "aten::copy_", "aten::index_select", "aten::cat", "aten::slice"):
        return "KV cache / indexing / copies"
    if n in ("aten::rms_norm", "aten::_fused_rms_norm", "aten::mul", "aten::add", "aten::add_", "aten::silu", "aten::neg"):
        return "norms, RoPE, activations, residuals"
    return "other ops"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from plural.serve.app import pick_dtype
    from plural.serve.fused import FusedRunner
    from plural.serve.lora import AdapterWeights
    from plural.store.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok, _ = load_model(None)
    dtype = pick_dtype(args.dtype, torch.device("cpu"))
    cfg = model.config
    runner = FusedRunner(model, rows=16, max_len=512, dtype=dtype, device=torch.device("cpu"), quantize=args.quantize,
                         max_loras=16, max_lora_rank=8)
    g = torch.Generator().manual_seed(0)
    d = cfg.hidden_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    for slot in range(1, 17):
        a = {(l, m): torch.randn(8, d, generator=g) / d ** 0.5 for l in range(cfg.num_hidden_layers) for m in ("q_proj", "v_proj")}
        b = {(l, m): torch.randn(d if m == "q_proj" else kv, 8, generator=g) * 0.02 for l, m in a}
        runner.write_slot(slot, AdapterWeights(8, 2.0, a, b))
    print(f"# {command()}\n# CPU flags: {', '.join(cpu_flags())}; torch kernels: {torch.backends.cpu.get_cpu_capability()}; "
          f"dtype {str(dtype).removeprefix('torch.')}, quantize {args.quantize}")
    prompt = 40
    ids = torch.randint(100, 1000, (16, prompt), generator=g)
    runner.prefill(ids, torch.full((16,), prompt), torch.arange(16), list(range(1, 17)))  # fill the KV rows

    def decode(n):
        return lambda: runner.decode(torch.randint(100, 1000, (n,), generator=g), torch.full((n,), prompt), list(range(1, n + 1)))

    def prefill(n):
        return lambda: runner.prefill(ids[:n], torch.full((n,), prompt), torch.arange(n), list(range(1, n + 1)))

    for label, fn in [("decode, 1 row", decode(1)), ("decode, 16 rows", decode(16)),
                      ("prefill, 1 x 40 tokens", prefill(1)), ("prefill, 16 x 40 tokens", prefill(16))]:
        fn(), fn()  # warm
        walls = []
        for _ in range(args.runs):
            t = time.perf_counter()
            fn()
            walls.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t = time.perf_counter()
            fn()
            wall_prof = time.perf_counter() - t
        cats = defaultdict(float)
        for ev in prof.key_averages(group_by_input_shape=True):
            cats[categorise(ev.key, str(ev.input_shapes), d, cfg.vocab_size)] += ev.self_cpu_time_total / 1e3
        total_ops = sum(cats.values())
        wall = sorted(walls)[len(walls) // 2] * 1e3
        print(f"\n## {label}: {wall:.1f} ms (median of {args.runs}; {wall_prof * 1e3:.1f} ms under the profiler)")
        for k, v in sorted(cats.items(), key=lambda kv_: -kv_[1])[:9]:
            print(f"  {v:7.2f} ms  {100 * v / (wall_prof * 1e3):5.1f}%  {k}")
        print(f"  {max(0.0, wall_prof * 1e3 - total_ops):7.2f} ms  {100 * max(0.0, 1 - total_ops / (wall_prof * 1e3)):5.1f}%  "
              "not in any kernel (Python, dispatch)")


if __name__ == "__main__":
    main()
