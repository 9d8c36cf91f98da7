"""`plural models add|list|show|remove`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from plural.errors import PluralError

app = typer.Typer(help="The model store: import base models once, load them fast.", no_args_is_help=True)
out = Console()


@app.command("add")
def add(
    path: Optional[Path] = typer.Argument(None, help="A Hugging Face model folder (safetensors) or a .gguf file."),
    default: bool = typer.Option(False, "--default", help="Import the bundled SmolLM2-135M-Instruct."),
    name: Optional[str] = typer.Option(None, "--name", help="Name in the store (default: from the path)."),
    force: bool = typer.Option(False, "--force", help="Replace a model of the same name."),
) -> None:
    """Import a model into the store (converted once to safetensors)."""
    from plural.store.models import import_model

    if (path is None) == (not default):
        raise PluralError("give either PATH or --default")
    with out.status("importing (converting to safetensors)…"):
        m = import_model(None if default else path, name=name, overwrite=force)
    out.print(f"imported [bold]{m.name}[/] ({m.manifest['parameters'] / 1e6:.1f}M parameters, {m.fingerprint[:19]}…) → {m.path}")


@app.command("list")
def list_() -> None:
    """List the models in the store."""
    from plural.store.models import list_models
    from plural.store.paths import models_dir

    ms = list_models()
    if not ms:
        out.print(f"no models in {models_dir()}. Import the default with: plural models add --default")
        return
    t = Table("name", "architecture", "parameters", "dtype", "fingerprint")
    for m in ms:
        t.add_row(m.name, m.manifest.get("architecture", "?"), f"{m.manifest.get('parameters', 0) / 1e6:.1f}M", m.manifest.get("dtype", "?"), m.fingerprint[:19] + "…")
    out.print(t)


@app.command("show")
def show(name: str = typer.Argument(..., help="Model name in the store.")) -> None:
    """Print a model's manifest."""
    from plural.store.models import get_model

    m = get_model(name)
    out.print_json(json.dumps({**m.manifest, "path": str(m.path)}))


@app.command("remove")
def remove(name: str = typer.Argument(..., help="Model name in the store.")) -> None:
    """Delete a model from the store."""
    from plural.store.models import remove_model

    p = remove_model(name)
    out.print(f"removed {name} ({p})")
