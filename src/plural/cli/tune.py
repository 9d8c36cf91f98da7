"""`plural tune`, `plural generate`, `plural chat`, `plural demo`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from plural.errors import PluralError

out = Console()


def load_tune_config(config: Path, overrides: list[str]):
    from plural.config import load_config
    from plural.tune.config import TuneConfig

    return load_config(TuneConfig, config, overrides)


def tune(
    config: Optional[Path] = typer.Argument(None, help="Tune config (YAML)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: --set train.lr=1e-4 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder exactly where its last checkpoint left off."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes (torchrun; DDP on gloo for CPU, nccl for GPUs)."),
) -> None:
    """Train a LoRA adapter (methods: sft, text, dpo, orpo)."""
    from plural import tune as tune_core

    if resume is not None:
        if config is not None:
            raise PluralError("--resume RUN_DIR uses the run's saved config.yaml; do not also give CONFIG")
        cfg = tune_core.resume_config(resume, set_)
    else:
        if config is None:
            raise PluralError("give a CONFIG file or --resume RUN_DIR")
        cfg = load_tune_config(config, set_)
    adapter = tune_core.run(cfg, resume=resume is not None, nproc=nproc)
    _summary(Path(cfg.output), adapter)


def _summary(run_dir: Path, adapter: Path) -> None:
    from plural.store.adapters import load_manifest

    man = load_manifest(adapter)
    m = man.metrics.model_dump() if man else {}
    t = Table("run", "steps", "train loss", "held-out loss", "trained tok/s", "adapter", show_header=True)
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    t.add_row(str(run_dir), fmt(m.get("steps")), fmt(m.get("train_loss")), fmt(m.get("eval_loss")), fmt(m.get("trained_tokens_per_second")), str(adapter))
    out.print(t)
    out.print(f"loss curve: {run_dir / 'loss.png'}")


def generate(
    prompt: str = typer.Argument(..., help="The user message."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model in the store (default: the bundled SmolLM2)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Adapter folder or name."),
    max_tokens: int = typer.Option(128, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    seed: Optional[int] = typer.Option(None, "--seed"),
) -> None:
    """Answer one prompt with the model's own chat template."""
    from plural.generation import generate as gen, load_for_inference

    m, tok, _ = load_for_inference(model, adapter)
    print(gen(m, tok, [prompt], max_new_tokens=max_tokens, temperature=temperature, system=system, seed=seed)[0])


def chat(
    model: Optional[str] = typer.Option(None, "--model"),
    adapter: Optional[str] = typer.Option(None, "--adapter"),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    system: Optional[str] = typer.Option(None, "--system"),
) -> None:
    """Interactive chat (empty line or Ctrl-D to quit; /reset clears the history)."""
    from plural.generation import generate as gen, load_for_inference

    m, tok, stored = load_for_inference(model, adapter)
    out.print(f"[dim]{stored.name}{' + ' + str(adapter) if adapter else ''} — empty line to quit, /reset to start over[/]")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        answer = gen(m, tok, [history], max_new_tokens=max_tokens, temperature=temperature)[0]
        history.append({"role": "assistant", "content": answer})
        out.print(f"[bold cyan]model>[/] {answer}", highlight=False)


def demo(
    config: Path = typer.Option(None, "--config", help="Demo tune config (default: examples/support/tune.yaml)."),
    output: Path = typer.Option(Path("runs/demo"), "--output"),
    set_: List[str] = typer.Option([], "--set", help="Override a key of the demo's tune config: --set train.precision=fp32 (repeatable)."),
) -> None:
    """The main job end to end: import the default model, fine-tune the example adapter, compare answers."""
    from plural.demo import run_demo

    run_demo(config, output, out, overrides=set_)


def register(app: typer.Typer) -> None:
    app.command("tune")(tune)
    app.command("generate")(generate)
    app.command("chat")(chat)
    app.command("demo")(demo)
