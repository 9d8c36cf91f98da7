"""`plural values` (filled in by its issue)."""

import typer

app = typer.Typer(help="Value profiles: check, compile, evaluate.", no_args_is_help=True)
