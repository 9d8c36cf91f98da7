"""Loading the default model from the store vs from the bundled GGUF (transformers dequantising).

Each load runs in a fresh process (imports excluded from the timed span, since every plural
command pays them once anyway); medians over several runs.

    python benchmarks/store_bench.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch, transformers
from plural.store.models import load_model, bundled_gguf
t = time.perf_counter()
if sys.argv[1] == "store":
    model, tok, _ = load_model()
else:
    g = bundled_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
print("RESULT", json.dumps({"seconds": time.perf_counter() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _report import command, write_section

    print(f"$ {command()}")
    times: dict[str, list[float]] = {"store": [], "gguf": []}
    for r in range(a.runs):
        for kind in ("store", "gguf") if r % 2 == 0 else ("gguf", "store"):
            p = subprocess.run([sys.executable, "-c", CHILD, kind], capture_output=True, text=True, check=True)
            line = next(l for l in p.stdout.splitlines() if l.startswith("RESULT"))
            times[kind].append(json.loads(line.split(" ", 1)[1])["seconds"])
            print(kind, f"{times[kind][-1]:.2f}s", flush=True)
    s, g = statistics.median(times["store"]), statistics.median(times["gguf"])
    md = f"""Command: `{command()}`

| load of SmolLM2-135M-Instruct (model + tokenizer, fp32) | median seconds ({a.runs} runs, fresh process each) |
|---|---:|
| `plural.store.models.load_model()` from the store (safetensors) | {s:.2f} |
| transformers from the bundled GGUF (dequantised at load) | {g:.2f} |

Target: the store load under 2 s ({'met' if s < 2 else 'NOT met'}); {g / s:.1f}× faster than loading the GGUF.
"""
    print(md)
    write_section("store", md)


if __name__ == "__main__":
    main()
