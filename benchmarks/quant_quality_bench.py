"""How far each CPU quantisation scheme moves SmolLM2-135M's next-token distribution (issue 19).

A faster kernel is only worth taking if the answers stay the model's. Teacher-forced over the
bundled held-out prose (examples/eval/multilingual.jsonl, six languages), every linear layer of
the fp32 model is replaced by one scheme and the next-token distributions are compared with the
fp32 model's: mean KL(fp32 ‖ scheme) per token and top-1 agreement. Schemes:

- int4: what `quantize: int4` serves (plural.serve.quant: Q4_1-layout projections through torch's
  int4 kernel, int8 output layer);
- int8 weight-only: every matrix int8 with one scale per row (torch's int8 kernel);
- w8a8 per row: FBGEMM's integer GEMM (`quantized::linear_dynamic`) made batch-invariant, each
  activation row scaled by its own absmax (8 bits) and weights at 7 bits per row so that AVX2's
  `vpmaddubsw` never saturates (2.4-5.7× the fp32 GEMM at 16 rows: matmul_kernels_bench.py);
- its halves: 7-bit weights alone (activations exact), 8-bit activations alone (weights exact);
- the same with SmoothQuant's per-channel migration (Xiao et al. 2023, arXiv:2211.10438): input
  channel j of every matrix divided by s_j = max|X_j|^α / max|W_j|^(1−α), the weight's column
  multiplied by it, max|X_j| calibrated on text disjoint from the test text (README, docs/tuning.md,
  the demo's training answers).

    python benchmarks/quant_quality_bench.py [--docs 12] [--tokens 256] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "src"))

from _report import command, write_section  # noqa: E402


class W8A8:
    """FBGEMM's dynamic int8 GEMM with a fixed activation grid: rows divided by their own absmax and
    one pinning row (+1, −1) appended, so the per-call range is always [−1, 1] and a row's result
    does not depend on its neighbours; weights at ±63 so no u8·s8 pair sum exceeds 32767."""

    def __init__(self, w: torch.Tensor):
        w = w.detach().float()
        self.inp = w.shape[1]
        self.scale = (w.abs().amax(dim=1) / 63).clamp(min=1e-12)
        self.q = (w / self.scale[:, None]).round().clamp(-63, 63).to(torch.int8)
        with warnings.catch_warnings():  # torch's quantised tensors are deprecated, its FBGEMM kernels are not gone
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(self.q, self.scale.double(), torch.zeros(w.shape[0], dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.pin = torch.zeros(1, self.inp)
        self.pin[0, 0], self.pin[0, 1] = 1.0, -1.0

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.inp).float()
        a = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        y = torch.ops.quantized.linear_dynamic(torch.cat([x2 / a, self.pin]), self.packed, False)[:-1] * a
        return y.view(*x.shape[:-1], -1)


def act8(x: torch.Tensor) -> torch.Tensor:
    """Activations on W8A8's grid (each row's absmax, step 2/255), back to float."""
    a = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30)
    step = 2.0 / 255
    return ((x / a / step).round().clamp(-128, 127)) * step * a


def scheme(name: str, w: torch.Tensor, is_head: bool, amax: torch.Tensor):
    from plural.serve.quant import Int4Weight, Int8Weight

    if name.startswith("smoothquant"):  # "smoothquant α=0.5 w8a8" / "... activations alone"
        alpha = float(name.split("=")[1].split()[0])
        wf = w.detach().float()
        s = amax.clamp(min=1e-5) ** alpha / wf.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha)
        if name.endswith("w8a8"):
            q = W8A8(wf * s)
            return lambda x: q.matmul(x / s)
        ws = wf * s
        return lambda x: act8(x / s) @ ws.T

    if name == "int4":
        q = Int8Weight(w, torch.float32) if is_head else Int4Weight(w, torch.float32)
        return q.matmul
    if name == "int8 weight-only":
        return Int8Weight(w, torch.float32).matmul
    if name == "w8a8 per row":
        return W8A8(w).matmul
    if name == "7-bit weights alone":
        wd = W8A8(w)
        wq = wd.q.float() * wd.scale[:, None]
        return lambda x: x @ wq.T
    if name == "8-bit activations alone":
        wf = w.detach().float()
        return lambda x: act8(x) @ wf.T
    raise ValueError(name)


SCHEMES = ["int4", "int8 weight-only", "w8a8 per row", "7-bit weights alone", "8-bit activations alone",
           "smoothquant α=0.5 w8a8", "smoothquant α=0.8 w8a8", "smoothquant α=0.8 activations alone"]


def calibration_texts() -> list[str]:
    answers = [json.loads(l)["messages"][-1]["content"] for l in (ROOT / "examples/support/train.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    return [(ROOT / "README.md").read_text(encoding="utf-8")[:4000], (ROOT / "docs/tuning.md").read_text(encoding="utf-8")[:4000], *answers[:40]]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plural.store.models import DEFAULT_MODEL, get_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    path = get_model(DEFAULT_MODEL).path
    tok = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(l) for l in (ROOT / "examples/eval/multilingual.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    texts = [r["text"] for r in rows if "text" in r][: a.docs]
    batches = [tok(t, return_tensors="pt").input_ids[:, : a.tokens] for t in texts]

    # Per input channel, the largest |activation| each matrix sees on the calibration text.
    amax: dict[str, torch.Tensor] = {}
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for mod_name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_mod, inp, _out, n=mod_name):
                a = inp[0].reshape(-1, inp[0].shape[-1]).abs().amax(dim=0)
                amax[n] = torch.maximum(amax[n], a) if n in amax else a
            mod.register_forward_hook(hook)
    with torch.no_grad():
        for t in calibration_texts():
            m(tok(t, return_tensors="pt").input_ids[:, :512])
    del m

    def logprobs(name: str | None) -> list[torch.Tensor]:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if name:
            for mod_name, mod in list(m.named_modules()):
                if isinstance(mod, torch.nn.Linear):
                    mod.forward = scheme(name, mod.weight, mod_name.endswith("lm_head"), amax[mod_name])
        with torch.no_grad():
            return [m(ids).logits[0].float().log_softmax(-1) for ids in batches]

    ref = logprobs(None)
    lines = []
    for name in SCHEMES:
        got = logprobs(name)
        kl = torch.cat([(r.exp() * (r - g)).sum(-1) for r, g in zip(ref, got)])
        top1 = torch.cat([(r.argmax(-1) == g.argmax(-1)).float() for r, g in zip(ref, got)])
        lines.append(f"| {name} | {kl.mean():.4f} | {top1.mean():.1%} |")
        print(lines[-1], flush=True)
    n = sum(b.shape[1] for b in batches)
    body = (f"`{command()}`: {len(batches)} documents of examples/eval/multilingual.jsonl, {n} tokens teacher-forced, "
            "every linear layer of the fp32 SmolLM2-135M-Instruct replaced by the scheme.\n\n"
            "| scheme | KL(fp32 ‖ scheme) per token | top-1 agreement with fp32 |\n|---|---:|---:|\n" + "\n".join(lines))
    if not a.no_write:
        write_section("quant-quality", body)


if __name__ == "__main__":
    main()
