"""`plural data check`: every problem of a data file, with its line number and category."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from plural.data.chat import IGNORE, Encoded, encode_chat, encode_text
from plural.data.records import NO_TRAINABLE, TOO_LONG, Issue, completion_text, prompt_messages, read_records

# Measured data-token throughput (median) of `plural tune` for SmolLM2-135M on 2 CPU cores (bf16 autocast,
# packing; docs/benchmarks.md), used to estimate training time. Scaled by parameters and cores.
REF_TOKENS_PER_S = 246.0
REF_PARAMS = 135e6
REF_CORES = 2


@dataclass
class Report:
    path: Path
    kind: str
    records: int = 0
    issues: list[Issue] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    encoded: list[tuple[int, Encoded]] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    def by_category(self) -> Counter:
        return Counter(i.category for i in self.issues)


def encode_record(tok, kind: str, data: dict) -> Encoded:
    if kind == "chat":
        return encode_chat(tok, data["messages"])
    if kind == "text":
        return encode_text(tok, data["text"])
    # preference: the prompt plus the longer of the two answers bounds the length
    msgs = prompt_messages(data)
    longer = max((completion_text(data["chosen"]), completion_text(data["rejected"])), key=len)
    return encode_chat(tok, msgs + [{"role": "assistant", "content": longer}])


def check_file(path: str | Path, tok=None, max_length: int | None = None, kind: str | None = None) -> Report:
    """Schema checks always; token checks (too long, nothing trainable) when a tokenizer is given."""
    kind_found, records, issues = read_records(path, kind)
    rep = Report(Path(path), kind_found, len(records), issues)
    if tok is None:
        return rep
    for rec in records:
        if max_length and _rough_chars(rec.data) > max_length * 32:
            # No tokenizer produces fewer than one token per 32 characters: skip the work.
            rep.issues.append(Issue(rec.line, TOO_LONG, f"far over data.max_length={max_length} tokens ({_rough_chars(rec.data)} characters)"))
            continue
        e = encode_record(tok, rec.kind, rec.data)
        n_tr = sum(1 for x in e.labels[1:] if x != IGNORE)
        if max_length and len(e) > max_length:
            kept = sum(1 for x in e.labels[1:max_length] if x != IGNORE)
            sev = "error" if kept == 0 else "warning"
            rep.issues.append(Issue(rec.line, TOO_LONG, f"{len(e)} tokens, over data.max_length={max_length}; "
                                    + ("nothing trainable is left after truncation" if kept == 0 else f"truncation keeps {kept} of {n_tr} trained tokens"), sev))
        if n_tr == 0:
            rep.issues.append(Issue(rec.line, NO_TRAINABLE, "no token carries loss (all assistant turns masked or empty after rendering)"))
        rep.tokens += len(e)
        rep.trained_tokens += n_tr
        rep.lengths.append(len(e))
        rep.encoded.append((rec.line, e))
    rep.issues.sort(key=lambda i: (i.line, i.category))
    return rep


def _rough_chars(obj) -> int:
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_rough_chars(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_rough_chars(v) for v in obj)
    return 0


def estimate_seconds(tokens: int, epochs: float, n_params: int, cores: int | None = None) -> float:
    """Rough training time: all tokens (prompt included) pass forward and backward."""
    cores = cores or os.cpu_count() or 1
    rate = REF_TOKENS_PER_S * (REF_PARAMS / max(n_params, 1)) * (cores / REF_CORES)
    return tokens * epochs / rate
