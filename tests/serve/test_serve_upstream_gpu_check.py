"""benchmarks/gpu_check.py's steps on the CPU with tiny sizes (the GPU run uses the same code):
greedy tokens of plural's engine equal transformers + PEFT's for the base and 3 adapters in one
batch, the throughput rows and the SFT step are measured, and the report files are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_cpu_with_tiny_sizes(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    [g] = res["greedy"]
    assert g["dtype"] == "float32" and g["all_identical"] and g["per_model"] == {
        "base": True, "a00": True, "a01": True, "a02": True}
    assert [row["concurrency"] for row in res["throughput"]] == [4, 8]
    assert all(row[k] > 0 for row in res["throughput"] for k in ("base_tok_s", "lora4_tok_s", "lora8_tok_s"))
    assert res["sft"]["loss_finite"] and res["sft"]["seconds"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "identical to transformers + PEFT" in md and "LoRA SFT step" in md


def test_gpu_check_without_cuda_says_so(tmp_path):
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, on any machine
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and "no CUDA device" in r.stderr
    assert not (tmp_path / "gpu_check.json").exists()
