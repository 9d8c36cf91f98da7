"""`plural eval`: the base and its adapters side by side on the same suites."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from plural.errors import PluralError

out = Console()


def eval_cmd(
    config: Optional[Path] = typer.Argument(None, help="Eval config (YAML): model, adapters, suites, output ..."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model in the store (default: the bundled SmolLM2)."),
    adapter: List[str] = typer.Option([], "--adapter", "-a", help="Adapter folder or name; NAME=PATH sets its label (repeatable)."),
    suite: List[str] = typer.Option([], "--suite", "-s", help="Suite file, or KIND:FILE for a file without a header (repeatable; default: the bundled suites)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder (default: runs/eval/<UTC time>)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many items per suite."),
    no_base: bool = typer.Option(False, "--no-base", help="Do not score the base model (differences are then against the first adapter)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key: --set bootstrap=2000 (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report folder."),
    require_signed: Optional[Path] = typer.Option(None, "--require-signed", help="Trust file (or public key PEM): refuse any adapter that is unsigned or not signed by a trusted signer."),
) -> None:
    """Evaluate the base model and each adapter on every suite; write report.json, report.html and plots."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from plural.config import apply_overrides, load_config, validate
    from plural.evaluate.report import rich_table, write_report
    from plural.evaluate.run import AdapterSpec, EvalConfig, evaluate

    if config is not None:
        cfg = load_config(EvalConfig, config, set_)
    else:
        cfg = validate(EvalConfig, apply_overrides({}, set_, EvalConfig), "--set")
    upd: dict = {}
    if model:
        upd["model"] = model
    if adapter:
        specs = []
        for a in adapter:
            name, sep, path = a.partition("=")
            specs.append(AdapterSpec(path=path, name=name) if sep and name and path else AdapterSpec(path=a))
        upd["adapters"] = list(cfg.adapters) + specs
    if suite:
        upd["suites"] = list(cfg.suites) + list(suite)
    if output:
        upd["output"] = output
    if limit:
        upd["limit"] = limit
    if no_base:
        upd["base"] = False
    cfg = validate(EvalConfig, {**cfg.model_dump(), **upd}, str(config or "command line"))
    if require_signed is not None:
        from plural.share.trust import load_policy, require_trusted
        from plural.store.adapters import resolve_adapter

        policy = load_policy(require_signed)
        for spec in cfg.adapters:
            require_trusted(resolve_adapter(spec.path if isinstance(spec, AdapterSpec) else spec), policy)
    out_dir = cfg.output or Path("runs/eval") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if out_dir.exists() and not force:
        raise PluralError(f"{out_dir} already exists. Fix: --output OTHER or --force to replace it")

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=out, transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def on_step(variant: str, suite_name: str, done: int, total: int) -> None:
            bar.update(task, description=f"{variant} · {suite_name}" if variant else "report", completed=done, total=total)

        report = evaluate(cfg, on_step)
        write_report(report, out_dir, overwrite=force)
    out.print(rich_table(report))
    out.print(f"report: {out_dir / 'report.html'}  ({out_dir / 'report.json'}; {report['seconds']['total']:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
