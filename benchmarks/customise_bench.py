"""Domain customisation, measured: does a tune config learn an organisation's facts and voice?

For each domain folder (examples/customise/kestrel: English + German, examples/customise/orme:
French + Spanish; any folder with train.jsonl and a test.jsonl of scored chat records) it trains
one adapter with `plural tune` (a subprocess, so its seconds are its own) and scores greedy answers
to the *test* questions, unseen paraphrases of the trained ones:

- facts: mean fraction of an answer's key facts it contains (word-bounded, case-folded);
- style: fraction of answers with both house markers (greeting and sign-off, in the question's language);
- loops: fraction of answers that repeat a word 3-gram three times or more (degenerate text);
- bpb: bits per byte on examples/eval/multilingual.jsonl (general text), change against the base, to
  catch forgetting.

The config is the minimal one a new user writes (`method`, `model`, `data.train`); `--set KEY=VALUE`
changes it (repeatable), e.g. `--set train.lr=1e-3`. Each run appends one JSON line to `--log`.

    python benchmarks/customise_bench.py [--domains kestrel orme] [--set train.precision=fp32] [--label NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "customise"
GENERAL = ROOT / "examples" / "eval" / "multilingual.jsonl"
# Every configuration tried, kept with the code (issue 14 asks for all of them on record): a run
# appends here and `--record` turns the whole file into docs/benchmarks.md's table.
LOG = ROOT / "benchmarks" / "results" / "customise.jsonl"
MAX_NEW_TOKENS = 64


def cpu() -> str:
    """The CPU's name and the vector/matrix extensions that decide fp32 vs bf16 speed."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(has) or 'no avx2'}"


# ----------------------------------------------------------------------------- model side

from plural.tune.customise import score  # noqa: E402  (after ROOT: one implementation, shared with `plural demo`)


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(l) for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]


def answer_and_bpb(adapter: Path | None, tests: list[dict]) -> tuple[list[str], float]:
    """Greedy answers to the test questions and bits per byte on the general text."""
    from plural.evaluate.kinds import PERPLEXITY
    from plural.evaluate.scoring import Scorer
    from plural.evaluate.suites import load_suite
    from plural.generation import generate, load_for_inference

    model, tok, _ = load_for_inference(None, adapter)
    answers = generate(model, tok, [t["messages"][:-1] for t in tests], max_new_tokens=MAX_NEW_TOKENS)
    m = PERPLEXITY.score(Scorer(model, tok), load_suite(GENERAL)).metrics["bpb"]
    return answers, sum(m.num) / sum(m.den)


def test_set(domain: Path) -> tuple[Path, list[dict]]:
    """A domain's unseen test questions: test.jsonl, or eval.jsonl for a folder such as examples/support."""
    test_file = domain / "test.jsonl" if (domain / "test.jsonl").is_file() else domain / "eval.jsonl"
    return test_file, read_jsonl(test_file)


def scored(answers: list[str], bpb: float, tests: list[dict], base: dict) -> dict:
    """The log row's scores of one adapter's answers and bits per byte, against the base's."""
    return {**score(answers, tests), "bpb": bpb, "bpb_change": bpb / base["bpb"] - 1,
            "base": {k: base[k] for k in ("facts", "style", "loops", "bpb")},
            "samples": [{"q": t["messages"][0]["content"], "a": a} for t, a in zip(tests, answers)]}


def base_scores(domain: Path, test_file: Path, tests: list[dict], work: Path) -> dict:
    """The base model's scores, cached per domain and test file (they do not depend on the recipe)."""
    import hashlib

    key = hashlib.sha256(test_file.read_bytes()).hexdigest()[:12]
    cache = work / f"base-{domain.name}-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    answers, bpb = answer_and_bpb(None, tests)
    res = {**score(answers, tests), "bpb": bpb, "answers": answers}
    cache.write_text(json.dumps(res, ensure_ascii=False))
    return res


def train(domain: Path, sets: list[str], out: Path) -> tuple[Path, float, float, list[str]]:
    """Runs `plural tune` on the minimal config; returns (adapter, wall seconds, CPU seconds, the chosen-values line).

    CPU seconds (user + system of the child) are reported beside wall seconds because the machines
    these figures come from are shared: on an idle 2-core machine wall ≈ CPU / 2."""
    cfg = out.with_suffix(".yaml")
    cfg.write_text(f"method: sft\nmodel: smollm2-135m-instruct\ndata:\n  train: {domain / 'train.jsonl'}\noutput: {out}\n", encoding="utf-8")
    cmd = [str(Path(sys.executable).with_name("plural")), "tune", str(cfg)] + [a for s in sets for a in ("--set", s)]
    t0, c0 = time.perf_counter(), os.times()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds, c1 = time.perf_counter() - t0, os.times()
    cpu_s = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    (out.parent / f"{out.name}.log").write_text(r.stdout + r.stderr, encoding="utf-8")
    if r.returncode != 0:
        sys.exit(f"plural tune failed for {domain.name}:\n{r.stderr[-3000:]}")
    chosen = [l.strip() for l in r.stdout.splitlines() if "→" in l and "override" in l]
    return out / "adapter", seconds, cpu_s, chosen


def rescore(log: Path, run: Path, scales: list[float], work: Path) -> None:
    """WiSE-FT after the fact: the adapter of a logged run with its B matrices scaled by each of
    `scales` (what `train.wise_ft` does when the adapter is saved, and deterministic training
    would give the same adapter), scored as a run and appended to `log` with the run's training figures."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = next(r for r in read_jsonl(log) if r.get("run") == str(run))
    domain = DATA / src["domain"]
    test_file, tests = test_set(domain)
    base = base_scores(domain, test_file, tests, work)
    for s in scales:
        dst = work / f"{run.name}-wise{s:g}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(run / "adapter", dst)
        w = load_file(dst / "adapter_model.safetensors")
        save_file({k: v * s if ".lora_B." in k else v for k, v in w.items()}, dst / "adapter_model.safetensors")
        answers, bpb = answer_and_bpb(dst, tests)
        row = {**{k: src[k] for k in ("domain", "cpu", "steps", "precision", "seconds", "cpu_seconds", "train_seconds", "run")},
               "label": src["label"].removesuffix(", fp32") + f" + WiSE-FT {s:g} (that adapter's B scaled afterwards)" + (", fp32" if src["label"].endswith(", fp32") else ""),
               "sets": src.get("sets", []) + [f"train.wise_ft={s:g}"], **scored(answers, bpb, tests, base)}
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{src['domain']} WiSE-FT {s:g}: facts {row['facts']:.2f}, style {row['style']:.2f}, bits per byte {100 * row['bpb_change']:+.1f}%")


def record(log: Path) -> None:
    """Every configuration in `log`, one row per (configuration, domain), into docs/benchmarks.md."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _report import write_section

    rows = read_jsonl(log)
    lines = ["| configuration | domain | key facts (base) | all facts | style (base) | loops | bits per byte change | steps | "
             "precision | tune wall s | tune CPU s | CPU |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        b = r["base"]
        lines.append(f"| {r['label']} | {r['domain']} | {r['facts']:.2f} ({b['facts']:.2f}) | {r.get('all_facts', float('nan')):.2f} | "
                     f"{r['style']:.2f} ({b['style']:.2f}) | {r['loops']:.2f} | {100 * r['bpb_change']:+.1f}% | {r['steps']} | "
                     f"{r['precision']} | {r['seconds']:.0f} | {r.get('cpu_seconds', float('nan')):.0f} | {r['cpu']} |")
    body = ("Command per configuration: `python benchmarks/customise_bench.py --threads 1 --set KEY=VALUE ... --label NAME` "
            "(then `--record` writes this table from benchmarks/results/customise.jsonl). Test questions are unseen paraphrases; "
            "bits per byte on examples/eval/multilingual.jsonl.\n\n" + "\n".join(lines))
    write_section("customise", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domains", nargs="+", default=["kestrel", "orme"], help="folders under examples/customise, or paths")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="tune config override KEY=VALUE (repeatable)")
    ap.add_argument("--label", default=None, help="name of this configuration in the log")
    ap.add_argument("--work", type=Path, default=Path("/tmp/customise_bench"))
    ap.add_argument("--log", type=Path, default=LOG, help="append results here (default: the committed benchmarks/results/customise.jsonl)")
    ap.add_argument("--record", action="store_true",
                    help="only rewrite the customise section of docs/benchmarks.md from every run in --log, then exit")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for training and scoring (on a machine shared with other jobs, 1 avoids OpenMP oversubscription)")
    ap.add_argument("--rescore", type=Path, default=None, metavar="RUN",
                    help="score a logged run's adapter at the --scales of train.wise_ft instead of training")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the tune subprocess inherits it
        torch.set_num_threads(args.threads)
        args.sets = args.sets + [f"train.threads={args.threads}"]
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.log
    if args.record:
        record(log)
        return
    if args.rescore:
        rescore(log, args.rescore, args.scales, args.work)
        return
    label = args.label or (" ".join(args.sets) or "defaults")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {cpu()}")

    rows = []
    for d in args.domains:
        domain = Path(d) if Path(d).is_dir() else DATA / d
        test_file, tests = test_set(domain)
        base = base_scores(domain, test_file, tests, args.work)
        out = args.work / f"{domain.name}-{time.strftime('%H%M%S')}"
        adapter, seconds, cpu_s, chosen = train(domain, args.sets, out)
        answers, bpb = answer_and_bpb(adapter, tests)
        metrics = json.loads((adapter / "plural.json").read_text())["metrics"]
        row = {"label": label, "sets": args.sets, "domain": domain.name, "cpu": cpu(), **scored(answers, bpb, tests, base),
               "cpu_seconds": cpu_s, "seconds": round(seconds, 1), "train_seconds": metrics.get("seconds"), "steps": metrics.get("steps"),
               "precision": metrics.get("precision"), "chosen": chosen, "run": str(out)}
        rows.append(row)
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    print(f"\nconfiguration: {label}")
    print("| domain | facts (base) | all facts | style (base) | loops | bpb change | steps | precision | tune wall s | tune CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        b = r["base"]
        print(f"| {r['domain']} | {r['facts']:.2f} ({b['facts']:.2f}) | {r['all_facts']:.2f} | {r['style']:.2f} ({b['style']:.2f}) | {r['loops']:.2f} | "
              f"{100 * r['bpb_change']:+.1f}% | {r['steps']} | {r['precision']} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} |")
    for r in rows:
        for c in r["chosen"]:
            print(f"{r['domain']}: {c}")


if __name__ == "__main__":
    main()
