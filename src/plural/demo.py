"""`plural demo` / `make demo`: the main job end to end on the bundled default model.

1. import SmolLM2-135M-Instruct into the store (once);
2. fine-tune the Velora support adapter (examples/support, EN/DE/FR) with a progress bar;
3. answer held-out questions (phrasings never seen in training) with the base and the adapter,
   side by side, and count the answers that carry Velora's key facts and house style
   (tune.customise; the facts are each record's `metadata` in examples/support/eval.jsonl).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from plural.errors import PluralError

DEFAULT_CONFIG = Path("examples/support/tune.yaml")
# Velora's longest held-out answer is ~50 tokens: room for it and its end-of-turn, no more (time).
MAX_NEW_TOKENS = 64


def run_demo(config: Path | None, output: Path, out: Console, n_prompts: int = 6, overrides: list[str] = ()) -> Path:
    from plural import tune
    from plural.config import load_config
    from plural.store.adapters import load_manifest
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

    cfg = load_config(TuneConfig, config, list(overrides))
    run_dir = output if not (output.exists() and any(output.iterdir())) else output.with_name(f"{output.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = cfg.model_copy(update={"output": run_dir})
    out.print(f"[2/3] fine-tuning a LoRA adapter on {', '.join(p.name for p in cfg.data.train)} → {run_dir}")
    adapter = tune.run(cfg)
    m = load_manifest(adapter).metrics
    held = f", held-out loss {m.base_eval_loss:.3f} (base) → {m.eval_loss:.3f}" if m.eval_loss is not None else ""
    out.print(f"      done: {m.steps} steps in {m.seconds:.0f}s{held}, {m.trained_tokens_per_second:.0f} trained tokens/s ({m.precision})")
    if cfg.data.eval is None:
        raise PluralError(f"{config}: data.eval: the demo compares answers to held-out questions; give a held-out file")

    out.print("[3/3] held-out questions (never seen in training): base vs adapter")
    compare(adapter, cfg.data.eval, out, n_prompts, model=cfg.model)
    out.print(f"total {time.perf_counter() - t0:.0f}s. Try it: plural chat --adapter {adapter}")
    return adapter


def pick_prompts(eval_file: Path, n: int) -> list[tuple[str, str]]:
    """(question, reference answer) of the records `pick_records` picks."""
    return [(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in pick_records(eval_file, n)]


def pick_records(eval_file: Path, n: int) -> list[dict]:
    """Round-robin over languages so every language shows up: the held-out records (question, reference, metadata)."""
    rows = [json.loads(l) for l in eval_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    by_open: dict[str, list] = {}
    for r in rows:
        by_open.setdefault(r["messages"][-1]["content"].split()[0], []).append(r)
    picked, groups = [], list(by_open.values())
    while len(picked) < n and any(groups):
        for g in groups:
            if g and len(picked) < n:
                picked.append(g.pop(0))
    return picked


def compare(adapter: Path, eval_file: Path, out: Console, n: int, model: str | None = None) -> dict[str, float]:
    """Greedy answers of the base (`model`) and the adapter to `n` held-out questions; returns the adapter's scores."""
    from plural.generation import generate, load_for_inference
    from plural.tune.customise import facts_score, score

    model, tok, _ = load_for_inference(model, adapter)
    recs = pick_records(eval_file, n)
    qs = [r["messages"][0]["content"] for r in recs]
    # Base and adapter answers in one mixed-adapter batch: one pass of decode steps instead of two
    # (the base's rambling answers run to the token limit while the adapter's stop; docs/benchmarks.md#make-demo).
    k = len(qs)
    both = generate(model, tok, qs + qs, max_new_tokens=MAX_NEW_TOKENS, batch_size=2 * k,
                    adapter_names=["__base__"] * k + [model.active_adapter] * k)
    base, tuned = both[:k], both[k:]
    t = Table("question", "base SmolLM2", "with the Velora adapter", "reference", "facts", show_lines=True)
    scored = "metadata" in recs[0]
    for r, b, a in zip(recs, base, tuned):
        mark = f"{facts_score(a, r['metadata']['facts']):.0%}" if scored else "-"
        t.add_row(r["messages"][0]["content"], b, a, r["messages"][-1]["content"], mark)
    out.print(t)
    if not scored:
        return {}
    sa, sb = score(tuned, recs), score(base, recs)
    k = len(recs)
    out.print(f"held-out answers with all key facts: {sa['all_facts'] * k:.0f}/{k} (base {sb['all_facts'] * k:.0f}/{k}); "
              f"house style: {sa['style'] * k:.0f}/{k} (base {sb['style'] * k:.0f}/{k}); repetition loops: {sa['loops'] * k:.0f}/{k}")
    return sa
