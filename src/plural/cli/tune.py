"""`plural tune`, `plural generate`, `plural chat`, `plural demo`."""

from __future__ import annotations

import os
import subprocess
import sys
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
    from plural.config import load_config
    from plural.tune.config import TuneConfig

    if resume is not None:
        if config is not None:
            raise PluralError("--resume RUN_DIR uses the run's saved config.yaml; do not also give CONFIG")
        cfg_path = resume / tune_core.CONFIG_NAME
        if not cfg_path.is_file():
            raise PluralError(f"{resume}: not a run folder (no {tune_core.CONFIG_NAME})")
        cfg = load_config(TuneConfig, cfg_path, set_)
        cfg = cfg.model_copy(update={"output": resume})
    else:
        if config is None:
            raise PluralError("give a CONFIG file or --resume RUN_DIR")
        cfg = load_config(TuneConfig, config, set_)
    run_dir = Path(cfg.output)

    if nproc > 1:
        tune_core.check_inputs(cfg)
        tune_core.prepare_run_dir(cfg, resume=resume is not None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "plural.tune.launch", str(run_dir)] + (["--resume"] if resume else [])
        out.print(f"[dim]{' '.join(cmd)}[/]")
        with tune_core.undo_failed_start(run_dir, resume is not None):
            rc = subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))})
            if rc != 0:
                raise PluralError(f"training failed in one of the {nproc} processes (exit {rc}); see the messages above")
        adapter = run_dir / "adapter"
    else:
        adapter = tune_core.run(cfg, resume=resume is not None)
    _summary(run_dir, adapter)


def _summary(run_dir: Path, adapter: Path) -> None:
    from plural.store.adapters import read_manifest

    m = read_manifest(adapter).get("metrics", {})
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
) -> None:
    """The main job end to end: import the default model, fine-tune the example adapter, compare answers."""
    from plural.demo import run_demo

    run_demo(config, output, out)


def register(app: typer.Typer) -> None:
    app.command("tune")(tune)
    app.command("generate")(generate)
    app.command("chat")(chat)
    app.command("demo")(demo)
