"""Fine-tuning recipes, one file per method. `run(cfg)` is the one entry point: it picks the recipe
by `cfg.method`, prepares (or resumes) the run folder, and trains in this process or, with
`nproc > 1`, in torchrun processes that each call `run_rank` (tune/launch.py is their module).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from plural.config import dump_yaml
from plural.errors import PluralError

# method -> module with `run(cfg, run_dir, resume) -> adapter path`
RECIPES = {"sft": "plural.tune.sft", "text": "plural.tune.text", "dpo": "plural.tune.dpo", "orpo": "plural.tune.orpo"}
CONFIG_NAME = "config.yaml"
# What a run folder holds once its first optimizer step is done (tune.loop writes them).
STARTED = ("log.jsonl", "checkpoints", "adapter")


def check_inputs(cfg) -> None:
    """Fail before anything is written when a data file is missing."""
    for f in list(cfg.data.train) + ([cfg.data.eval] if cfg.data.eval else []):
        if Path(f).is_dir():
            raise PluralError(f"data file {f} is a folder; give the JSONL files in it")
        if not Path(f).is_file():
            raise PluralError(f"data file {f} not found (relative paths in a config file are relative to its folder)")


def write_config(run_dir: Path, cfg) -> None:
    """The run's config.yaml (temporary file, then rename), every value spelled out."""
    tmp = Path(run_dir) / f".{CONFIG_NAME}.tmp"
    tmp.write_text(dump_yaml(cfg), encoding="utf-8")
    os.replace(tmp, Path(run_dir) / CONFIG_NAME)


def started(run_dir: Path) -> bool:
    return any((Path(run_dir) / n).exists() for n in STARTED)


def prepare_run_dir(cfg, resume: bool) -> Path:
    """Create the run folder (refusing to overwrite a finished or unrelated one).

    A folder holding only config.yaml is a start that failed or was killed before its first step
    (loading, data, batch size): it is reused, so a corrected retry is never refused."""
    run_dir = Path(cfg.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise PluralError(f"output: {run_dir} is a file, not a run folder")
    if not resume and run_dir.exists() and any(p.name != CONFIG_NAME for p in run_dir.iterdir()):
        raise PluralError(f"run folder {run_dir} exists and is not empty: use `plural tune --resume {run_dir}` or set output: to a new folder")
    if not resume and int(os.environ.get("RANK", "0")) == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(run_dir, cfg)
        except OSError as e:  # a read-only or missing parent, a full disk
            raise PluralError(f"output: cannot write the run folder {run_dir} ({e.strerror})") from e
    return run_dir


@contextmanager
def undo_failed_start(run_dir: Path, resume: bool) -> Iterator[None]:
    """If training fails before its first optimizer step, remove what the start wrote (config.yaml,
    the folder if it is then empty), so the retry finds no run folder in its way."""
    existed = run_dir.exists() and any(p.name != CONFIG_NAME for p in run_dir.iterdir())
    try:
        yield
    except BaseException:
        if not resume and not existed and not started(run_dir):
            (run_dir / CONFIG_NAME).unlink(missing_ok=True)
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                shutil.rmtree(run_dir, ignore_errors=True)
        raise


def resume_config(run_dir: Path, overrides: list[str] = ()):
    """The saved config of the run in `run_dir` (with `--set` overrides), to continue it there."""
    from plural.config import load_config
    from plural.tune.config import TuneConfig

    cfg_path = Path(run_dir) / CONFIG_NAME
    if not cfg_path.is_file():
        raise PluralError(f"{run_dir}: not a run folder (no {CONFIG_NAME})")
    cfg = load_config(TuneConfig, cfg_path, list(overrides))
    return cfg.model_copy(update={"output": Path(run_dir)})


def _recipe(method: str):
    if method not in RECIPES:
        raise PluralError(f"method: {method!r} is not one of {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[method])


def run(cfg, resume: bool = False, nproc: int = 1) -> Path:
    """Train per `cfg` into its run folder (continuing its last checkpoint if `resume`); returns the
    adapter folder. `nproc > 1`: that many torchrun processes (DDP: gloo on CPU, nccl on GPUs)."""
    _recipe(cfg.method)
    check_inputs(cfg)
    run_dir = prepare_run_dir(cfg, resume)
    from plural.tune.loop import writing

    with undo_failed_start(run_dir, resume), writing(run_dir, run_dir):  # a full disk anywhere else in the run
        if nproc == 1:
            return _recipe(cfg.method).run(cfg, run_dir, resume=resume)
        # Every rank reads the config.yaml written above, so all processes train on identical settings.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "plural.tune.launch", str(run_dir)] + (["--resume"] if resume else [])
        print(" ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))})
        if rc != 0:
            raise PluralError(f"training failed in one of the {nproc} processes (exit {rc}); see the messages above")
        return run_dir / "adapter"


def run_rank(run_dir: Path, resume: bool) -> Path:
    """One torchrun process of `run(cfg, nproc=N)`: the recipe on the run folder's config.yaml."""
    from plural.config import load_config
    from plural.tune.config import TuneConfig

    cfg = load_config(TuneConfig, Path(run_dir) / CONFIG_NAME)
    return _recipe(cfg.method).run(cfg, Path(run_dir), resume=resume)
