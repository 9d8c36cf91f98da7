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
import re
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "customise"
GENERAL = ROOT / "examples" / "eval" / "multilingual.jsonl"
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


# ----------------------------------------------------------------------------- scoring (pure)

def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def contains(answer: str, phrase: str) -> bool:
    """`phrase` in `answer`, case-folded, not inside a longer word or number ("4" is not in "40")."""
    return re.search(r"(?<![\w:.])" + re.escape(_norm(phrase)) + r"(?![\w]|[:.]\d)", _norm(answer)) is not None


def facts_score(answer: str, facts: list[str]) -> float:
    return sum(contains(answer, f) for f in facts) / len(facts)


def style_ok(answer: str, markers: list[str]) -> bool:
    return all(_norm(m) in _norm(answer) for m in markers)


def loops(answer: str) -> bool:
    words = re.findall(r"\w+", _norm(answer))
    grams = Counter(zip(words, words[1:], words[2:]))
    return bool(grams) and max(grams.values()) >= 3


def score_answers(answers: list[str], tests: list[dict]) -> dict[str, float]:
    meta = [t["metadata"] for t in tests]
    n = len(tests)
    return {
        "facts": sum(facts_score(a, m["facts"]) for a, m in zip(answers, meta)) / n,
        "style": sum(style_ok(a, m["style"]) for a, m in zip(answers, meta)) / n,
        "loops": sum(loops(a) for a in answers) / n,
    }


# ----------------------------------------------------------------------------- model side

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


def base_scores(domain: Path, tests: list[dict], work: Path) -> dict:
    """The base model's scores, cached per domain and test file (they do not depend on the recipe)."""
    import hashlib

    key = hashlib.sha256((domain / "test.jsonl").read_bytes()).hexdigest()[:12]
    cache = work / f"base-{domain.name}-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    answers, bpb = answer_and_bpb(None, tests)
    res = {**score_answers(answers, tests), "bpb": bpb, "answers": answers}
    cache.write_text(json.dumps(res, ensure_ascii=False))
    return res


def train(domain: Path, sets: list[str], out: Path) -> tuple[Path, float, list[str]]:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(f"method: sft\nmodel: smollm2-135m-instruct\ndata:\n  train: {domain / 'train.jsonl'}\noutput: {out}\n", encoding="utf-8")
    cmd = [str(Path(sys.executable).with_name("plural")), "tune", str(cfg)] + [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (out.parent / f"{out.name}.log").write_text(r.stdout + r.stderr, encoding="utf-8")
    if r.returncode != 0:
        sys.exit(f"plural tune failed for {domain.name}:\n{r.stderr[-3000:]}")
    chosen = [l.strip() for l in r.stdout.splitlines() if "→" in l and "override" in l]
    return out / "adapter", seconds, chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domains", nargs="+", default=["kestrel", "orme"], help="folders under examples/customise, or paths")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="tune config override KEY=VALUE (repeatable)")
    ap.add_argument("--label", default=None, help="name of this configuration in the log")
    ap.add_argument("--work", type=Path, default=Path("/tmp/customise_bench"))
    ap.add_argument("--log", type=Path, default=None, help="append results here (default: WORK/results.jsonl)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    label = args.label or (" ".join(args.sets) or "defaults")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {cpu()}")

    rows = []
    for d in args.domains:
        domain = Path(d) if Path(d).is_dir() else DATA / d
        tests = read_jsonl(domain / "test.jsonl")
        base = base_scores(domain, tests, args.work)
        out = args.work / f"{domain.name}-{time.strftime('%H%M%S')}"
        adapter, seconds, chosen = train(domain, args.sets, out)
        answers, bpb = answer_and_bpb(adapter, tests)
        s = score_answers(answers, tests)
        metrics = json.loads((adapter / "plural.json").read_text())["metrics"]
        row = {"label": label, "sets": args.sets, "domain": domain.name, "cpu": cpu(), **s, "bpb": bpb,
               "bpb_change": bpb / base["bpb"] - 1, "base": {k: base[k] for k in ("facts", "style", "loops", "bpb")},
               "seconds": round(seconds, 1), "train_seconds": metrics.get("seconds"), "steps": metrics.get("steps"),
               "precision": metrics.get("precision"), "chosen": chosen, "run": str(out),
               "samples": [{"q": t["messages"][0]["content"], "a": a} for t, a in zip(tests[:4], answers[:4])]}
        rows.append(row)
        with open(args.log or args.work / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    print(f"\nconfiguration: {label}")
    print("| domain | facts (base) | style (base) | loops | bpb change | steps | precision | tune seconds |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        b = r["base"]
        print(f"| {r['domain']} | {r['facts']:.2f} ({b['facts']:.2f}) | {r['style']:.2f} ({b['style']:.2f}) | {r['loops']:.2f} | "
              f"{100 * r['bpb_change']:+.1f}% | {r['steps']} | {r['precision']} | {r['seconds']:.0f} |")
    for r in rows:
        for c in r["chosen"]:
            print(f"{r['domain']}: {c}")


if __name__ == "__main__":
    main()
