#!/usr/bin/env bash
# Plural's engine and a LoRA SFT step on one GPU, in at most 8 minutes (issue 18). Needs only
# PyTorch, transformers and peft in $PYTHON (default python3); plural itself comes from src/.
# Results: gpu_check.json and gpu_check.md in $OUT (or the current folder), and on stdout.
#   bash benchmarks/gpu_check.sh            # figures for docs/benchmarks.md ("GPU" section)
# Exit status: 0 when fp32 greedy tokens equal transformers + PEFT's, 1 when not, 124 on timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" - <<'PY'
import torch, transformers, peft
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}")
print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# 420 s of work at most (later steps are skipped and say so), killed at 480 s.
exec timeout 480 "$PY" benchmarks/gpu_check.py --device cuda --budget 420 "$@"
