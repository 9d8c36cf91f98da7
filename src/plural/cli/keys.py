"""`plural keys new|list|export`: EC P-256 signing keys in $PLURAL_HOME/keys."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Signing keys for adapters (EC P-256, private part in $PLURAL_HOME/keys, mode 0600).", no_args_is_help=True)
out = Console()


@app.command("new")
def new(
    name: str = typer.Argument(..., help="Key name."),
    out_pem: Optional[Path] = typer.Option(None, "--out", help="Also write the public key (PEM) here, to give to those who verify."),
) -> None:
    """Make a new signing key."""
    from plural.share.keys import new_key

    k = new_key(name, out_pem)
    out.print(f"key [bold]{k.name}[/] ({k.key_id[:16]}…) → {k.path}" + (f"; public key → {out_pem}" if out_pem else ""))


@app.command("list")
def list_() -> None:
    """List the signing keys."""
    from plural.share.keys import keys_dir, list_keys

    ks = list_keys()
    if not ks:
        out.print(f"no keys in {keys_dir()}. Make one with: plural keys new NAME")
        return
    t = Table("name", "key id", "path")
    for k in ks:
        t.add_row(k.name, k.key_id[:16] + "…", str(k.path))
    out.print(t)


@app.command("export")
def export(name: str = typer.Argument(..., help="Key name.")) -> None:
    """Print the public key (PEM), for a trust file."""
    from plural.share.keys import export_public

    typer.echo(export_public(name), nl=False)
