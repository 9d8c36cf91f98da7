"""What the console shows of a runs folder: training runs, federated runs and eval reports, read
from the files `plural tune`, `plural federate` and `plural eval` write.

Every reader is tolerant: a run is read while it is being written (the last log line may be
half-written), may have been killed before its first checkpoint, and a report may come from an
older plural. Whatever cannot be read becomes a `problems` entry the page shows, never an error.

`serve` does not import `tune` or `federate` (they pull in trainers and Flower), so the few file
names of their run folders are spelled here.

    train run:      config.yaml, log.jsonl, checkpoints/step-NNNNNNN/state.json, adapter/
    federated run:  config.yaml, progress.jsonl, checkpoints/round-NNNN/state.json, adapter/
    eval report:    report.json, report.html, <suite>.png
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

CONFIG = "config.yaml"
TRAIN_LOG = "log.jsonl"
FED_LOG = "progress.jsonl"
CHECKPOINTS = "checkpoints"
REPORT = "report.json"
REPORT_HTML = "report.html"
# A run whose log changed this recently is shown as in progress (a trainer writes a line per step).
LIVE_SECONDS = 120
MAX_DEPTH = 3  # how deep under runs_dir to look for runs and reports
MAX_LOG_LINES = 20_000  # the page plots at most this many steps (the newest)


class Problem(BaseModel):
    file: str
    line: int | None = None
    message: str


class Checkpoint(BaseModel):
    name: str
    step: int | None = None  # optimizer step (train) or round (federated)
    modified: float


class RoundRow(BaseModel):
    round: int
    participants: list[str]
    failed: list[Any] = []
    bytes_sent: int
    bytes_received: int
    train_loss: float | None = None  # token-weighted mean over the participants
    # the global adapter's held-out loss on the nodes' eval data before local training,
    # token-weighted (what the server aggregated from the round's replies)
    eval_loss: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    seconds: float | None = None


class RunSummary(BaseModel):
    id: str  # path relative to runs_dir, "/"-separated
    kind: Literal["train", "federated"]
    status: Literal["done", "in progress", "stopped", "not started"]
    method: str | None = None
    model: str | None = None
    steps: int = 0  # log records (train steps or federated rounds)
    total: int | None = None  # planned rounds (federated), when known
    last_loss: float | None = None
    checkpoints: int = 0
    has_adapter: bool = False
    modified: float
    problems: int = 0


class RunDetail(RunSummary):
    config: str | None = None  # the resolved config.yaml as written
    log: list[dict[str, Any]] = []  # train: {step, loss, eval_loss?, lr?}
    rounds: list[RoundRow] = []
    final_eval: dict[str, Any] | None = None  # federated: the closing held-out evaluation
    checkpoint_list: list[Checkpoint] = []
    problems_list: list[Problem] = []


class Finding(BaseModel):
    suite: str
    metric: str
    variant: str
    verdict: Literal["better", "worse"]
    difference: float | None = None
    lo: float | None = None
    hi: float | None = None


class ReportSummary(BaseModel):
    id: str
    model: str | None = None
    created: str | None = None
    plural_version: str | None = None
    reference: str | None = None
    variants: list[str] = []
    suites: list[str] = []
    compared: list[str] = []  # suites whose metrics carry differences against the reference
    findings: list[Finding] = []  # significant differences against the reference
    has_html: bool = False
    old_format: bool = False
    problems: list[Problem] = []


class Prompt(BaseModel):
    suite: str
    prompt: str


# ----------------------------------------------------------------------------- files


def read_jsonl(path: Path, rel: str) -> tuple[list[dict[str, Any]], list[Problem]]:
    """The JSON objects of a log, and a Problem per line that is not one. A last line without its
    newline that does not parse is the trainer's write in progress (or a kill mid-line)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return [], [Problem(file=rel, message=f"cannot read ({e.strerror})")]
    lines = raw.split(b"\n")
    unfinished = lines[-1] != b""  # the file does not end with a newline
    if not unfinished:
        lines = lines[:-1]
    records, problems = [], []
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            if unfinished and no == len(lines):
                problems.append(Problem(file=rel, line=no, message="half-written last line (being written, or the run was killed mid-line); not shown"))
            else:
                problems.append(Problem(file=rel, line=no, message="not valid JSON; line skipped"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(file=rel, line=no, message=f"expected a JSON object, got {type(obj).__name__}; line skipped"))
            continue
        records.append(obj)
    return records, problems


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _rel(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix()


def _walk(root: Path, depth: int = MAX_DEPTH):
    """Folders under root (root excluded), breadth first, not into checkpoints or adapters."""
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for c in children:
                if c.name in (CHECKPOINTS, "adapter"):
                    continue
                yield c
                nxt.append(c)
        level = nxt


def is_run(d: Path) -> bool:
    return (d / TRAIN_LOG).is_file() or (d / FED_LOG).is_file() or ((d / CONFIG).is_file() and not (d / REPORT).is_file())


def find_runs(root: Path) -> list[Path]:
    return [d for d in _walk(root) if is_run(d)]


def find_reports(root: Path) -> list[Path]:
    return [d for d in _walk(root) if (d / REPORT).is_file()]


def lookup(root: Path, rel: str, found: list[Path]) -> Path | None:
    """The listed folder named `rel`, or None: only what discovery found is ever opened, so a
    crafted id ("../..") cannot reach outside runs_dir."""
    for d in found:
        if _rel(root, d) == rel:
            return d
    return None


# ----------------------------------------------------------------------------- runs


def _checkpoints(d: Path, prefix: str) -> list[Checkpoint]:
    out = []
    ck = d / CHECKPOINTS
    if not ck.is_dir():
        return out
    for p in sorted(ck.iterdir()):
        # a checkpoint is complete once its state.json exists (tune.loop / federate.checkpoint
        # write it last, inside a folder renamed into place)
        if p.name.startswith(prefix) and (p / "state.json").is_file():
            try:
                step = int(p.name.removeprefix(prefix))
            except ValueError:
                step = None
            out.append(Checkpoint(name=p.name, step=step, modified=_mtime(p / "state.json")))
    return out


def _config(d: Path, rel: str, problems: list[Problem]) -> tuple[str | None, dict[str, Any]]:
    p = d / CONFIG
    if not p.is_file():
        problems.append(Problem(file=f"{rel}/{CONFIG}", message="no resolved config (config.yaml missing)"))
        return None, {}
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problems.append(Problem(file=f"{rel}/{CONFIG}", message=f"not valid YAML ({str(e).splitlines()[0]})"))
        return text, {}
    return text, data if isinstance(data, dict) else {}


def _round_row(rec: dict[str, Any]) -> RoundRow:
    nodes = [n for n in rec.get("nodes") or [] if isinstance(n, dict)]
    tok = [int(_num(n.get("tokens")) or 0) for n in nodes]

    def weighted(key: str) -> float | None:
        pairs = [(_num(n.get(key)), t) for n, t in zip(nodes, tok) if _num(n.get(key)) is not None]
        if not pairs:
            return None
        w = sum(t for _, t in pairs)
        return sum(v * t for v, t in pairs) / w if w else sum(v for v, _ in pairs) / len(pairs)

    priv = rec.get("privacy") if isinstance(rec.get("privacy"), dict) else {}
    return RoundRow(
        round=int(_num(rec.get("round")) or 0), participants=[str(n.get("org", n.get("node", "?"))) for n in nodes],
        failed=list(rec.get("failed") or []),
        bytes_sent=sum(int(_num(n.get("bytes_sent")) or 0) for n in nodes),
        bytes_received=sum(int(_num(n.get("bytes_received")) or 0) for n in nodes),
        train_loss=weighted("train_loss"), eval_loss=weighted("eval_loss_global"),
        epsilon=_num(priv.get("epsilon")), delta=_num(priv.get("delta")), seconds=_num(rec.get("seconds")),
    )


def read_run(root: Path, d: Path, detail: bool = False) -> RunSummary | RunDetail:
    rel = _rel(root, d)
    problems: list[Problem] = []
    federated = (d / FED_LOG).is_file()
    config_text, cfg = _config(d, rel, problems)
    log_name = FED_LOG if federated else TRAIN_LOG
    log_path = d / log_name
    records, log_problems = read_jsonl(log_path, f"{rel}/{log_name}") if log_path.is_file() else ([], [])
    problems += log_problems
    ckpts = _checkpoints(d, "round-" if federated else "step-")
    has_adapter = (d / "adapter").is_dir()
    modified = max(_mtime(log_path), _mtime(d / CONFIG), _mtime(d))
    log: list[dict[str, Any]] = []
    rounds: list[RoundRow] = []
    final_eval = None
    if federated:
        for i, rec in enumerate(records):
            if rec.get("event") == "round":
                try:
                    rounds.append(_round_row(rec))
                except (TypeError, ValueError) as e:
                    problems.append(Problem(file=f"{rel}/{log_name}", message=f"round record {i + 1} not understood ({e})"))
            elif rec.get("event") == "evaluate":
                final_eval = {k: v for k, v in rec.items() if k != "event"}
        steps, last = len(rounds), (rounds[-1].train_loss if rounds else None)
    else:
        for rec in records:
            step, loss = _num(rec.get("step")), _num(rec.get("loss"))
            if step is None or loss is None:
                continue
            row = {"step": int(step), "loss": loss}
            for k in ("eval_loss", "lr"):
                if _num(rec.get(k)) is not None:
                    row[k] = _num(rec.get(k))
            log.append(row)
        log = log[-MAX_LOG_LINES:]
        steps, last = len(log), (log[-1]["loss"] if log else None)
    if has_adapter:
        status = "done"
    elif not records and not ckpts:
        status = "not started"
    else:
        status = "in progress" if time.time() - _mtime(log_path) < LIVE_SECONDS else "stopped"
    if not ckpts and status != "not started":
        problems.append(Problem(file=f"{rel}/{CHECKPOINTS}", message="no checkpoints" + (
            "" if status == "done" else ": a restart begins from the start (set save_every to checkpoint)")))
    total = _num(cfg.get("rounds")) if federated else None
    base = dict(id=rel, kind="federated" if federated else "train", status=status,
                method="federated" if federated else (str(cfg.get("method", "sft")) if cfg else None),
                model=str(cfg["model"]) if cfg.get("model") else None, steps=steps,
                total=int(total) if total else None, last_loss=last, checkpoints=len(ckpts),
                has_adapter=has_adapter, modified=modified, problems=len(problems))
    if not detail:
        return RunSummary(**base)
    return RunDetail(**base, config=config_text, log=log, rounds=rounds, final_eval=final_eval,
                     checkpoint_list=ckpts, problems_list=problems)


# ----------------------------------------------------------------------------- reports


def read_report(root: Path, d: Path) -> tuple[ReportSummary, dict[str, Any]]:
    """The summary of a report folder and the parsed report.json ({} when unreadable)."""
    rel = _rel(root, d)
    where = f"{rel}/{REPORT}"
    out = ReportSummary(id=rel, has_html=(d / REPORT_HTML).is_file())
    try:
        data = json.loads((d / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        out.problems.append(Problem(file=where, message=f"cannot be read as JSON ({e})"))
        return out, {}
    if not isinstance(data, dict):
        out.problems.append(Problem(file=where, message="not a JSON object"))
        return out, {}
    model = data.get("model")
    out.model = str(model.get("name")) if isinstance(model, dict) else (str(model) if model else None)
    out.created = str(data["created"]) if data.get("created") else None
    out.plural_version = str(data["plural_version"]) if data.get("plural_version") else None
    out.reference = str(data["reference"]) if data.get("reference") else None
    out.variants = [str(v.get("name")) for v in data.get("variants") or [] if isinstance(v, dict)]
    missing = [k for k in ("plural_version", "reference", "variants", "suites") if k not in data]
    if missing:
        out.old_format = True
        out.problems.append(Problem(file=where, message=f"an older report format (no {', '.join(missing)}); summary from what it holds"))
    for s in data.get("suites") or []:
        if not isinstance(s, dict):
            continue
        name = str(s.get("name", "?"))
        out.suites.append(name)
        for m in s.get("metrics") or []:
            if not isinstance(m, dict):
                continue
            diffs = m.get("diffs")
            if not isinstance(diffs, dict):
                out.old_format = True
                out.problems.append(Problem(file=where, message=f"suite {name!r}, metric {m.get('name')!r}: no differences against the reference (older format)"))
                continue
            if name not in out.compared:
                out.compared.append(name)
            for variant, diff in diffs.items():
                if isinstance(diff, dict) and diff.get("significant"):
                    out.findings.append(Finding(
                        suite=name, metric=str(m.get("name", "?")), variant=str(variant),
                        verdict="better" if diff.get("better") else "worse",
                        difference=_num(diff.get("value")), lo=_num(diff.get("lo")), hi=_num(diff.get("hi"))))
    return out, data


def report_prompts(data: dict[str, Any], limit: int = 50) -> list[Prompt]:
    """Prompts of a report's suites (its side-by-side samples), for the compare view's picker."""
    out = []
    for s in data.get("suites") or []:
        if not isinstance(s, dict):
            continue
        for row in s.get("samples") or []:
            p = row.get("prompt") if isinstance(row, dict) else None
            if isinstance(p, str) and p.strip():
                out.append(Prompt(suite=str(s.get("name", "?")), prompt=p))
                if len(out) >= limit:
                    return out
    return out


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total
