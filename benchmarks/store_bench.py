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

def load():
    t = time.perf_counter()
    if sys.argv[1] == "store":
        model, tok, _ = load_model()
    else:
        g = bundled_gguf()
        tok = transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    return time.perf_counter() - t

# first load pays Python's one-time import of transformers' model and tokenizer code (~3 s);
# the second is the load itself, what every later load in a process (server, eval) pays
first = load()
second = load()
print("RESULT", json.dumps({"seconds": first, "again": second}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _report import command, write_section

    print(f"$ {command()}")
    times: dict[str, list[float]] = {"store": [], "gguf": []}
    again: dict[str, list[float]] = {"store": [], "gguf": []}
    for r in range(a.runs):
        for kind in ("store", "gguf") if r % 2 == 0 else ("gguf", "store"):
            p = subprocess.run([sys.executable, "-c", CHILD, kind], capture_output=True, text=True, check=True)
            line = next(l for l in p.stdout.splitlines() if l.startswith("RESULT"))
            res = json.loads(line.split(" ", 1)[1])
            times[kind].append(res["seconds"])
            again[kind].append(res["again"])
            print(kind, f"{res['seconds']:.2f}s first, {res['again']:.2f}s again", flush=True)
    s, g = statistics.median(times["store"]), statistics.median(times["gguf"])
    s2, g2 = statistics.median(again["store"]), statistics.median(again["gguf"])
    md = f"""Command: `{command()}`

| load of SmolLM2-135M-Instruct (model + tokenizer, fp32), median of {a.runs} fresh processes | first load in a process (s) | load itself (s) |
|---|---:|---:|
| `plural.store.models.load_model()` from the store (safetensors) | {s:.2f} | {s2:.2f} |
| transformers from the bundled GGUF (dequantised at load) | {g:.2f} | {g2:.2f} |

"First load" includes Python's one-time import of transformers' model and tokenizer code, which
any process pays once whatever it loads; "load itself" is a second load in the same process.
Target "loading the default model under 2 s": met for the load itself ({s2:.2f} s); the first load
in a fresh process is {s:.2f} s ({'under' if s < 2 else 'over'} 2 s) because of those imports.
The store is {g / s:.1f}× faster than the GGUF on first load, {g2 / s2:.0f}× on later loads.
"""
    print(md)
    write_section("store", md)


if __name__ == "__main__":
    main()
