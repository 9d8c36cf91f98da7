"""The `plural` command: one Typer sub-app per verb group, each in its own module.

Every command is thin: parse, call the core, print. A `PluralError` anywhere becomes a one-line
message (what is wrong and where) and exit code 1, never a traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# peft probes the deprecated `is_gradient_checkpointing` on every adapter it wraps (peft 0.21,
# transformers 5); the warning is theirs to fix and says nothing to a plural user.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

import typer
from rich.console import Console

from plural.errors import PluralError

app = typer.Typer(
    name="plural",
    help="Own your language model: customise, federate, evaluate and serve LoRA adapters on your own hardware.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)


def _register() -> None:
    from plural.cli import data, eval as eval_cli, federate, models, serve, tune, values

    app.add_typer(models.app, name="models")
    app.add_typer(data.app, name="data")
    tune.register(app)  # tune, generate, chat, demo
    eval_cli.register(app)  # eval
    app.add_typer(values.app, name="values")
    serve.register(app)  # serve
    from plural.cli import console

    console.register(app)  # console
    federate.register(app)  # federate, node
    from plural.cli import export as export_cli

    app.add_typer(export_cli.app, name="export")  # export gguf-lora, gguf, ollama, hf
    from plural.cli import adapters, keys

    app.add_typer(keys.app, name="keys")
    app.add_typer(adapters.app, name="adapters")


_register()


def main() -> None:
    try:
        # Under standalone_mode=False click *returns* a command's `typer.Exit(code)` instead of
        # exiting with it, so the code must be passed on here or every command would exit 0.
        rc = app(standalone_mode=False)
    except PluralError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's own usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
