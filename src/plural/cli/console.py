"""`plural console`: `plural serve` on the stored base model and every stored adapter made for it,
with the runs folder the console shows, for a person to open in a browser."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from plural.errors import PluralError

err = Console(stderr=True)


def stored_adapters(base: str) -> list[str]:
    """NAME=PATH for each adapter in the store whose manifest names `base` (others would be refused)."""
    from plural.store.adapters import CONFIG, read_manifest
    from plural.store.paths import adapters_dir

    root = adapters_dir()
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not (d / CONFIG).is_file():
            continue
        try:
            about = read_manifest(d).get("base")
        except PluralError as e:  # a damaged manifest: say so, serve the rest
            err.print(f"[yellow]skipped[/] {d.name}: {e}", highlight=False)
            continue
        if isinstance(about, dict) and about.get("name") == base:
            out.append(f"{d.name}={d}")
    return out


def console(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="Stored base model (default: the bundled SmolLM2)."),
    runs: Optional[Path] = typer.Option(None, "--runs", help="Runs folder: training and federated runs, eval reports (default: the --config file's runs_dir, else ./runs)."),
    port: int = typer.Option(8000, "--port", help="Port on 127.0.0.1."),
    config: Optional[Path] = typer.Option(None, "--config", help="Server settings (YAML) as for `plural serve`: keys, tenants, profiles."),
) -> None:
    """Open the console: serve the stored models on 127.0.0.1 and print the page's address."""
    from plural.store.models import get_model

    from plural.serve.settings import load_settings

    file = load_settings(config) if config else None
    base = get_model(model or (file.model if file else None)).name  # a missing model fails here, with the fix
    adapters = [a for a in stored_adapters(base) if not file or a.partition("=")[0] not in file.adapters]
    runs_dir = str(runs.resolve()) if runs else (file.runs_dir if file and file.runs_dir else str(Path("runs").resolve()))
    err.print(f"[bold]console[/] http://127.0.0.1:{port}/console  ({base} + {len(adapters)} stored adapter(s), "
              f"runs: {runs_dir})", highlight=False)
    # `plural serve` itself, through click so that every option not given here keeps its default
    serve = ctx.find_root().command.get_command(ctx, "serve")
    ctx.invoke(serve, model=base, adapter=adapters, port=port, config=config, runs_dir=runs_dir)


def register(app: typer.Typer) -> None:
    app.command("console")(console)
