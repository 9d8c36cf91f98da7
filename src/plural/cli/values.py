"""`plural values check | compile | eval`: value profiles as data, training sets and adherence reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from plural.errors import PluralError

app = typer.Typer(help="Value profiles: check, compile, evaluate.", no_args_is_help=True)
out = Console()


@app.command("check")
def check(profile: Path = typer.Argument(..., help="Value profile (YAML).")) -> None:
    """Validate a profile; report every problem with its file:line."""
    from plural.values.profile import check_profile, _with_ids

    prof, probs = check_profile(profile)
    for p in probs:
        style = "red" if p.severity == "error" else "yellow"
        out.print(f"[{style}]{p.format(profile)}[/]", highlight=False, soft_wrap=True)
    errors = sum(p.severity == "error" for p in probs)
    if errors or prof is None:
        raise PluralError(f"{profile}: {errors} error(s), {len(probs) - errors} warning(s)")
    prof = _with_ids(prof)
    bad = sum(1 for e in prof.examples if e.bad)
    out.print(f"[green]ok[/] {profile}: profile {prof.id} v{prof.version} ({', '.join(prof.languages)}): "
              f"{len(prof.principles)} principles, {len(prof.examples)} examples ({bad} with a bad answer), "
              f"{len(prof.probes)} probes; {len(probs)} warning(s)", highlight=False)


@app.command("compile")
def compile_cmd(
    profile: Path = typer.Argument(..., help="Value profile (YAML)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the data sets and tune configs."),
    heldout: float = typer.Option(0.25, "--heldout", min=0.0, max=0.9, help="Fraction of each principle's and language's prompts held out for evaluation."),
    seed: int = typer.Option(0, "--seed", help="Seed of the deterministic split."),
    system_prompt: bool = typer.Option(False, "--system-prompt/--no-system-prompt", help="Put the rendered system prompt into every record (train with the prompt you serve with)."),
    extra: List[Path] = typer.Option([], "--extra", help="Reviewed examples to add (a teacher_review.yaml with `reviewed: true` entries; repeatable)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Base model named in the generated tune configs."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="OpenAI-compatible endpoint of a teacher model (e.g. http://127.0.0.1:8000/v1)."),
    teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="The teacher's model name at that endpoint."),
    teacher_prompts: int = typer.Option(8, "--teacher-prompts", min=1, help="New prompts per principle and language."),
    teacher_key: Optional[str] = typer.Option(None, "--teacher-key", envvar="PLURAL_TEACHER_KEY", help="Bearer key for the teacher endpoint."),
    replay: bool = typer.Option(True, "--replay/--no-replay", help="Replay plural's bundled general text during SFT (keeps the base model's general language ability)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Turn a profile into SFT and preference JSONL, held-out sets and the `values` eval suite."""
    from plural.values.compile import compile_profile
    from plural.values.profile import load_profile
    from plural.values.teacher import Teacher, expand, read_reviewed, review_yaml

    prof = load_profile(profile)
    if output.exists() and not force:
        raise PluralError(f"{output} already exists. Fix: -o OTHER or --force to replace it")
    if (teacher is None) != (teacher_model is None):
        raise PluralError("--teacher and --teacher-model go together")
    reviewed = [e for f in extra for e in read_reviewed(f, prof)]
    res = compile_profile(prof, output, source=profile, heldout=heldout, seed=seed, system_prompt=system_prompt,
                          extra=reviewed, model=model, overwrite=force, replay=replay)
    for name, n in res.counts.items():
        out.print(f"  {name:20s} {n:5d}" + ("" if n else "  (none: file not written)"))
    if teacher:
        from rich.progress import Progress

        t = Teacher(teacher, teacher_model, api_key=teacher_key)
        total = teacher_prompts * len(prof.principles) * len(prof.languages)
        with Progress(console=out, transient=True) as bar:
            task = bar.add_task("teacher", total=total)
            items = expand(prof, t, teacher_prompts, progress=lambda: bar.advance(task))
        review = output / "teacher_review.yaml"
        review.write_text(review_yaml(items, t), encoding="utf-8")
        out.print(f"teacher: {len(items)} new examples ({t.calls} calls, {t.cached} from cache) written for review to {review}")
        out.print(f"  read them, set `reviewed: true` on the good ones, then: plural values compile {profile} -o DIR --extra {review}")
    out.print(f"[green]compiled[/] {prof.id} -> {output}  (next: plural tune {output / 'tune-sft.yaml'})", highlight=False)


@app.command("eval")
def eval_cmd(
    profile: Path = typer.Argument(..., help="Value profile (YAML)."),
    adapter: List[str] = typer.Option([], "--adapter", "-a", help="Adapter folder or name; NAME=PATH sets its label (repeatable)."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model in the store (default: the bundled SmolLM2)."),
    system: bool = typer.Option(False, "--system", help="Also score every variant with the profile's system prompt (how `plural serve --profile` runs it)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder (default: runs/values/<profile>-<UTC time>)."),
    heldout: float = typer.Option(0.25, "--heldout", min=0.0, max=0.9, help="Must match the compile that trained the adapters."),
    seed: int = typer.Option(0, "--seed", help="Must match the compile that trained the adapters."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", min=1, help="Answer length for the probes."),
    suite: List[Path] = typer.Option([], "--suite", "-s", help="Also run this suite file (e.g. a perplexity text; repeatable)."),
    no_base: bool = typer.Option(False, "--no-base", help="Do not score the base model."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report folder."),
) -> None:
    """Adherence of the base and each adapter: preference accuracy, probe pass rate, over/under-refusal, language."""
    from plural.evaluate.report import rich_table, write_report
    from plural.values.profile import load_profile
    from plural.values.report import evaluate_profile

    prof = load_profile(profile)
    out_dir = output or Path("runs/values") / f"{prof.id}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    if out_dir.exists() and not force:
        raise PluralError(f"{out_dir} already exists. Fix: --output OTHER or --force to replace it")
    with out.status("scoring ...") as status:
        report = evaluate_profile(prof, profile, adapter, model=model, system=system, heldout=heldout, seed=seed,
                                  max_new_tokens=max_new_tokens, base=not no_base, extra_suites=suite,
                                  on_step=lambda v, s, d, t: status.update(f"{v} · {s} ({d}/{t})" if v else "report"))
        write_report(report, out_dir, overwrite=force)
    out.print(rich_table(report))
    out.print(f"report: {out_dir / 'report.html'}  ({out_dir / 'report.json'}; {report['seconds']['total']:.1f} s)")
