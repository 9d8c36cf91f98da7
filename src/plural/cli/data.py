"""`plural data check FILE`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from plural.errors import PluralError

app = typer.Typer(help="Data files: check them before training.", no_args_is_help=True)
out = Console()


@app.command("check")
def check(
    file: Path = typer.Argument(..., help="A JSONL data file (chat, text or preference records)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model whose tokenizer and template to use (default: the config's, else the bundled SmolLM2)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A tune config: its model, max_length and epochs are used."),
    preview: int = typer.Option(0, "--preview", min=0, help="Render N examples, trained tokens highlighted."),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=1),
    no_tokens: bool = typer.Option(False, "--no-tokens", help="Schema checks only (no tokenizer needed)."),
) -> None:
    """Report every problem with its line number and category. Exit 1 if there are errors."""
    from plural.data.check import check_file, estimate_seconds
    from plural.store.models import get_model, load_tokenizer

    epochs = 3.0
    if config is not None:
        from plural.cli.tune import load_tune_config

        cfg = load_tune_config(config, [])
        model = model or cfg.model
        max_length = max_length or cfg.data.max_length
        epochs = cfg.train.epochs
    max_length = max_length or 512
    if not file.exists():  # before the tokenizer: a missing model would hide the real problem
        raise PluralError(f"{file}: no such file")
    tok = None if no_tokens else load_tokenizer(model)
    rep = check_file(file, tok, max_length)

    for i in rep.issues:
        style = "red" if i.severity == "error" else "yellow"
        out.print(Text(i.format(file), style=style))
    t = Table(title=f"{file} ({rep.kind})", show_header=True)
    t.add_column("records", justify="right")
    t.add_column("errors", justify="right")
    t.add_column("warnings", justify="right")
    row = [str(rep.records), str(len(rep.errors)), str(len(rep.warnings))]
    if tok is not None:
        for c in ("tokens", "trained tokens", "max length", "est. training time"):
            t.add_column(c, justify="right")
        n_params = get_model(model).manifest.get("parameters", 135_000_000)
        est = estimate_seconds(rep.tokens, epochs or 1.0, n_params)
        row += [str(rep.tokens), str(rep.trained_tokens), str(max(rep.lengths, default=0)), f"~{est / 60:.1f} min for {epochs:g} epoch(s)"]
    t.add_row(*row)
    out.print(t)
    if rep.issues:
        cats = ", ".join(f"{c}: {n}" for c, n in sorted(rep.by_category().items()))
        out.print(f"by category: {cats}")
    if preview and tok is not None:
        for line, e in rep.encoded[:preview]:
            out.rule(f"line {line}  (trained tokens in green, masked in grey)")
            out.print(render_preview(tok, e))
    raise typer.Exit(1 if rep.errors else 0)


def render_preview(tok, e) -> Text:
    from plural.data.chat import IGNORE

    txt = Text()
    for k, (tid, lab) in enumerate(zip(e.input_ids, e.labels)):
        piece = tok.decode([tid])
        txt.append(piece, style="bold green" if (k > 0 and lab != IGNORE) else "grey50")
    return txt
