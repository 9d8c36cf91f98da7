"""`plural demo` / `make demo`: the main job end to end on the bundled default model.

1. import SmolLM2-135M-Instruct into the store (once);
2. fine-tune the Velora support adapter (examples/support, EN/DE/FR) with a progress bar;
3. answer held-out questions (phrasings never seen in training) with the base and the adapter,
   side by side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from plural.errors import PluralError

DEFAULT_CONFIG = Path("examples/support/tune.yaml")


def run_demo(config: Path | None, output: Path, out: Console, n_prompts: int = 6) -> Path:
    from plural import tune
    from plural.config import load_config
    from plural.store.models import DEFAULT_MODEL, get_model, import_model
    from plural.tune.config import TuneConfig

    config = config or DEFAULT_CONFIG
    if not config.is_file():
        raise PluralError(f"{config}: demo config not found; run from the repository root or pass --config")
    t0 = time.perf_counter()
    try:
        get_model(DEFAULT_MODEL)
        out.print(f"[1/3] {DEFAULT_MODEL} is already in the store")
    except PluralError:
        with out.status("[1/3] importing the bundled SmolLM2-135M-Instruct (GGUF → safetensors, once)…"):
            m = import_model(None)
        out.print(f"[1/3] imported {m.name} ({m.manifest['parameters'] / 1e6:.0f}M parameters) in {time.perf_counter() - t0:.0f}s")

    cfg = load_config(TuneConfig, config)
    run_dir = output if not (output.exists() and any(output.iterdir())) else output.with_name(f"{output.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = cfg.model_copy(update={"output": run_dir})
    out.print(f"[2/3] fine-tuning a LoRA adapter on {', '.join(p.name for p in cfg.data.train)} → {run_dir}")
    adapter = tune.run(cfg)
    man = json.loads((adapter / "plural.json").read_text())["metrics"]
    out.print(f"      done: {man['steps']} steps, train loss {man['train_loss']:.3f}, held-out loss {man['eval_loss']:.3f}, "
              f"{man['trained_tokens_per_second']:.0f} trained tokens/s ({man['precision']})")

    out.print("[3/3] held-out questions (never seen in training): base vs adapter")
    compare(adapter, cfg.data.eval, out, n_prompts)
    out.print(f"total {time.perf_counter() - t0:.0f}s. Try it: plural chat --adapter {adapter}")
    return adapter


def pick_prompts(eval_file: Path, n: int) -> list[tuple[str, str]]:
    """Round-robin over languages so every language shows up: (question, reference answer)."""
    rows = [json.loads(l)["messages"] for l in eval_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    by_open: dict[str, list] = {}
    for m in rows:
        by_open.setdefault(m[-1]["content"].split()[0], []).append((m[0]["content"], m[-1]["content"]))
    picked, groups = [], list(by_open.values())
    while len(picked) < n and any(groups):
        for g in groups:
            if g and len(picked) < n:
                picked.append(g.pop(0))
    return picked


def compare(adapter: Path, eval_file: Path, out: Console, n: int) -> None:
    from plural.generation import generate, load_for_inference

    model, tok, _ = load_for_inference(None, adapter)
    prompts = pick_prompts(eval_file, n)
    qs = [q for q, _ in prompts]
    with model.disable_adapter():
        base = generate(model, tok, qs, max_new_tokens=48)
    tuned = generate(model, tok, qs, max_new_tokens=48)
    t = Table("question", "base SmolLM2", "with the Velora adapter", "reference", show_lines=True)
    for (q, ref), b, a in zip(prompts, base, tuned):
        t.add_row(q, b, a, ref)
    out.print(t)
