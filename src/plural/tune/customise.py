"""Did a domain customisation work? Scores of answers to held-out questions, shared by `plural demo`
and benchmarks/customise_bench.py.

A held-out record is a chat record whose `metadata` holds the key `facts` an answer must contain
and the house `style` markers (greeting, sign-off) it must carry, in the question's language
(examples/support/eval.jsonl, examples/customise/*/test.jsonl).
"""

from __future__ import annotations

import re
import unicodedata


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def contains(answer: str, phrase: str) -> bool:
    """`phrase` in `answer`, case-folded, not inside a longer word or number ("4" is not in "40" or "4:00")."""
    return re.search(r"(?<![\w:.])" + re.escape(_norm(phrase)) + r"(?!\w|[:.]\d)", _norm(answer)) is not None


def facts_score(answer: str, facts: list[str]) -> float:
    """Fraction of the key facts the answer contains."""
    return sum(contains(answer, f) for f in facts) / len(facts)


def style_ok(answer: str, markers: list[str]) -> bool:
    return all(_norm(m) in _norm(answer) for m in markers)


def loops(answer: str, max_n: int = 12) -> bool:
    """A degenerate answer: a run of 1..max_n words repeated three times back to back ("Ride on! Ride on! Ride on!")."""
    w = re.findall(r"\w+", _norm(answer))
    return any(w[i:i + n] == w[i + n:i + 2 * n] == w[i + 2 * n:i + 3 * n]
               for n in range(1, max_n + 1) for i in range(len(w) - 3 * n + 1))


def score(answers: list[str], records: list[dict]) -> dict[str, float]:
    """Means over the records: facts (fraction contained), all_facts (answers with every fact), style, loops."""
    meta = [r["metadata"] for r in records]
    n = len(records)
    f = [facts_score(a, m["facts"]) for a, m in zip(answers, meta)]
    return {
        "facts": sum(f) / n,
        "all_facts": sum(x == 1.0 for x in f) / n,
        "style": sum(style_ok(a, m["style"]) for a, m in zip(answers, meta)) / n,
        "loops": sum(loops(a) for a in answers) / n,
    }
