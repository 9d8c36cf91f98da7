"""The CPU matmul kernels torch ships, side by side on SmolLM2-135M's shapes (issue 19: where the
next serving and training speed-ups could come from).

For each weight shape [out, in] and row count, interleaved over `--repeats` rounds (medians):
- fp32: `x @ w.T` (MKL), what the fp32 engine and training run;
- oneDNN: the same fp32 product through a prepacked oneDNN weight (`mkldnn._linear_pointwise`);
- int4: torch's int4 weight-only kernel on llama.cpp's Q4_1 layout (plural.serve.quant.Int4Weight,
  kernel path only), what `quantize: int4` runs for the projections;
- int8 w/o: torch's int8 weight-only kernel (plural.serve.quant.Int8Weight, kernel path only);
- fbgemm w8a8: `quantized::linear_dynamic`, int8 weights per output row and the activations
  quantised to 8 bits on the fly (one scale for the whole input), multiplied in integers by FBGEMM.
The relative error is ‖y − y_fp32‖ / ‖y_fp32‖ on random inputs, so a faster kernel's price shows.

FBGEMM picks its own instruction set (it does not read torch's ATEN_CPU_CAPABILITY); to measure
what an AVX2-only CPU gets, cap it as well: FBGEMM_ENABLE_INSTRUCTIONS=AVX2.

    python benchmarks/matmul_kernels_bench.py [--repeats 15] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from _report import command, write_section  # noqa: E402

# SmolLM2-135M: fused q|k|v, o, gate|up, down, output layer (vocabulary 49152, width 576)
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate|up", 3072, 576), ("down", 576, 1536), ("output", 49152, 576)]
ROWS = (1, 16, 2048)  # one stream's decode step, a 16-stream decode step, a prefill / training micro-batch


def kernels(w: torch.Tensor, rows: int) -> dict:
    from plural.serve.quant import Int4Weight, Int8Weight

    out = {"fp32": lambda x: x @ w.T}
    wp = torch.ops.mkldnn._reorder_linear_weight(w)
    out["oneDNN"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")
    if rows <= 256:  # past that plural multiplies the dequantised weight densely (quant.py)
        q4 = Int4Weight(w, dense=torch.float32)
        out["int4"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), q4.packed, q4.GROUP, q4.scales_zeros).float()
        q8 = Int8Weight(w, dense=torch.float32)
        out["int8 w/o"] = lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q8.q, q8.scale).float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    out["fbgemm w8a8"] = lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    lines = []
    names = ["fp32", "oneDNN", "int4", "int8 w/o", "fbgemm w8a8"]
    for rows in ROWS:
        for label, n, k in SHAPES:
            if rows == 2048 and label == "output":
                continue  # training computes the output layer on the loss tokens only; a prefill on its last row
            w = torch.randn(n, k) * 0.02
            x = torch.randn(rows, k)
            ks = kernels(w, rows)
            ref = ks["fp32"](x)
            err = {m: float((f(x) - ref).norm() / ref.norm()) for m, f in ks.items()}
            times: dict[str, list[float]] = {m: [] for m in ks}
            reps = a.repeats if rows < 2048 else max(3, a.repeats // 3)
            for _ in range(reps):  # interleaved: every kernel sees the same machine state
                for m, f in ks.items():
                    f(x)
                    t0 = time.perf_counter()
                    f(x)
                    times[m].append(time.perf_counter() - t0)
            med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
            cells = []
            for m in names:
                if m not in med:
                    cells.append("—")
                    continue
                cells.append(f"{med[m]:.3g} ms ({med['fp32'] / med[m]:.1f}×, err {err[m]:.0e})" if m != "fp32" else f"{med[m]:.3g} ms")
            lines.append(f"| {rows} | {label} [{n}, {k}] | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    caps = " ".join(f"{v}={os.environ[v]}" for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                                     "FBGEMM_ENABLE_INSTRUCTIONS") if os.environ.get(v))
    body = (f"`{command()}`{' with ' + caps if caps else ''}, {a.threads} threads; medians of interleaved runs; "
            "each cell: time (speed-up over fp32, relative error against fp32).\n\n"
            "| rows | weight | fp32 (MKL) | oneDNN fp32 | int4 kernel | int8 weight-only | FBGEMM w8a8 |\n"
            "|---:|---|---:|---:|---:|---:|---:|\n" + "\n".join(lines))
    if not a.no_write:
        write_section("matmul-kernels", body)


if __name__ == "__main__":
    main()
