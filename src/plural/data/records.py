"""Record formats and line-numbered checks.

Three JSONL kinds (one JSON object per line):

- chat:       {"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight"?: 0|1}, ...]}
              (the OpenAI / Mistral fine-tuning format; weight 0 masks that assistant turn)
- text:       {"text": str}                                  (continued pre-training)
- preference: {"prompt": str | "messages": [...], "chosen": str|[msg], "rejected": str|[msg]}

`read_records` yields (line_number, record) for clean lines and `Issue`s for the others; callers
that train stop at the first error, `plural data check` collects them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from plural.errors import PluralError

KINDS = ("chat", "text", "preference")
ROLES = ("system", "user", "assistant")
# A line longer than this is not parsed at all: it cannot be a sane training example and
# json.loads on it would only waste memory.
MAX_LINE_BYTES = 8 * 1024 * 1024

# Categories, as printed by `plural data check`.
NOT_JSON = "not-json"
SCHEMA = "schema"
UNKNOWN_ROLE = "unknown-role"
ROLE_ORDER = "role-order"
EMPTY = "empty-content"
LAST_TURN = "last-turn"
TOO_LONG = "too-long"
NO_TRAINABLE = "no-trainable-tokens"
DUPLICATE = "duplicate"
ENCODING = "encoding"
LINE_SIZE = "line-too-large"


@dataclass
class Issue:
    line: int  # 1-based; 0 = the file as a whole
    category: str
    message: str
    severity: str = "error"  # or "warning"

    def format(self, path: str | Path) -> str:
        where = f"{path}:{self.line}" if self.line else str(path)
        return f"{where}: {self.severity} [{self.category}] {self.message}"


@dataclass
class Record:
    line: int
    kind: str
    data: dict[str, Any] = field(repr=False)


def open_jsonl(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise PluralError(f"{p}: no such file")
    if p.is_dir():
        raise PluralError(f"{p}: is a directory, expected a JSONL file (one JSON object per line)")
    if p.stat().st_size == 0:
        raise PluralError(f"{p}: the file is empty; expected one JSON object per line")
    return p


def iter_lines(path: Path) -> Iterator[tuple[int, bytes | None, Issue | None]]:
    """Yield (line_no, raw_bytes, issue) for each non-blank line; never loads a huge line twice."""
    with open(path, "rb") as f:
        for no, raw in enumerate(f, start=1):
            if no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                yield no, None, Issue(no, ENCODING, "file starts with a UTF-8 byte-order mark (BOM); it was skipped", "warning")
                raw = raw[3:]
            if len(raw) > MAX_LINE_BYTES:
                yield no, None, Issue(no, LINE_SIZE, f"line is {len(raw) / 1e6:.1f} MB, over the {MAX_LINE_BYTES // 2**20} MiB limit for one example")
                continue
            if not raw.strip():
                continue
            yield no, raw, None


def detect_kind(obj: dict[str, Any]) -> str | None:
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "messages" in obj:
        return "chat"
    if "text" in obj:
        return "text"
    return None


def _check_message(i: int, m: Any, issues: list[Issue], line: int, allow_weight: bool = True) -> None:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        issues.append(Issue(line, SCHEMA, f"{where}: expected an object with 'role' and 'content', got {type(m).__name__}"))
        return
    extra = set(m) - {"role", "content", "weight", "name"}
    if extra:
        issues.append(Issue(line, SCHEMA, f"{where}: unknown field(s) {', '.join(sorted(extra))}; allowed: role, content, weight"))
    role = m.get("role")
    if role is None:
        issues.append(Issue(line, SCHEMA, f"{where}: missing field 'role'"))
    elif role not in ROLES:
        issues.append(Issue(line, UNKNOWN_ROLE, f"{where}.role: {role!r} is not one of {', '.join(ROLES)}"))
    content = m.get("content")
    if content is None:
        issues.append(Issue(line, SCHEMA, f"{where}: missing field 'content'"))
    elif not isinstance(content, str):
        issues.append(Issue(line, SCHEMA, f"{where}.content: expected a string, got {type(content).__name__}"))
    elif not content.strip():
        issues.append(Issue(line, EMPTY, f"{where}.content is empty"))
    if "weight" in m:
        w = m["weight"]
        if not allow_weight or w not in (0, 1) or isinstance(w, bool):
            issues.append(Issue(line, SCHEMA, f"{where}.weight: must be 0 or 1, got {w!r}"))
        elif role != "assistant":
            issues.append(Issue(line, SCHEMA, f"{where}.weight: only assistant messages carry a weight"))


def check_messages(msgs: Any, line: int, need_final_assistant: bool = True) -> list[Issue]:
    issues: list[Issue] = []
    if not isinstance(msgs, list) or not msgs:
        return [Issue(line, SCHEMA, "'messages' must be a non-empty list of {role, content} objects")]
    for i, m in enumerate(msgs):
        _check_message(i, m, issues, line)
    if issues:
        return issues
    roles = [m["role"] for m in msgs]
    # Order: optional system first, then user/assistant alternating, starting with user.
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        want = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != want:
            if roles[i] == "system":
                msg = f"messages[{i}] is a system message; only the first message may be 'system'"
            else:
                msg = f"messages[{i}] is {roles[i]!r} but {want!r} was expected (turns must alternate user, assistant, ...)"
            issues.append(Issue(line, ROLE_ORDER, msg))
            return issues
    if need_final_assistant and roles[-1] != "assistant":
        issues.append(Issue(line, LAST_TURN, f"the last message is {roles[-1]!r}; a training example must end with the assistant's turn"))
    elif need_final_assistant and not any(m.get("weight", 1) for m in msgs if m["role"] == "assistant"):
        issues.append(Issue(line, NO_TRAINABLE, "every assistant message has weight 0: nothing to train on"))
    return issues


def _completion_issues(obj: dict, key: str, line: int) -> list[Issue]:
    v = obj.get(key)
    if v is None:
        return [Issue(line, SCHEMA, f"missing field '{key}'")]
    if isinstance(v, str):
        return [Issue(line, EMPTY, f"'{key}' is empty")] if not v.strip() else []
    if isinstance(v, list):
        issues: list[Issue] = []
        for i, m in enumerate(v):
            _check_message(i, m, issues, line, allow_weight=False)
        if not issues and [m["role"] for m in v] != ["assistant"]:
            issues.append(Issue(line, SCHEMA, f"'{key}' as a message list must hold exactly one assistant message"))
        return [Issue(i.line, i.category, i.message.replace("messages[", f"{key}[")) for i in issues]
    return [Issue(line, SCHEMA, f"'{key}' must be a string or a list with one assistant message")]


def check_record(obj: Any, line: int, kind: str | None) -> tuple[str | None, list[Issue]]:
    """Schema checks that need no tokenizer. Returns (kind, issues)."""
    if not isinstance(obj, dict):
        return None, [Issue(line, SCHEMA, f"expected a JSON object, got {type(obj).__name__}")]
    k = detect_kind(obj)
    if k is None:
        return None, [Issue(line, SCHEMA, "no 'messages', 'text' or 'chosen'/'rejected' field; cannot tell the record kind")]
    if kind is not None and k != kind:
        return k, [Issue(line, SCHEMA, f"a {k} record in a {kind} file (the first record decides the file's kind)")]
    if k == "chat":
        extra = set(obj) - {"messages", "id", "metadata"}
        issues = [Issue(line, SCHEMA, f"unknown field(s) {', '.join(sorted(extra))}; a chat record has 'messages'")] if extra else []
        return k, issues + check_messages(obj["messages"], line)
    if k == "text":
        t = obj["text"]
        if not isinstance(t, str):
            return k, [Issue(line, SCHEMA, f"'text' must be a string, got {type(t).__name__}")]
        if not t.strip():
            return k, [Issue(line, EMPTY, "'text' is empty")]
        return k, []
    # preference
    issues = []
    if ("prompt" in obj) == ("messages" in obj):
        issues.append(Issue(line, SCHEMA, "a preference record needs exactly one of 'prompt' (string) or 'messages' (list)"))
    elif "prompt" in obj:
        p = obj["prompt"]
        if not isinstance(p, str):
            issues.append(Issue(line, SCHEMA, "'prompt' must be a string"))
        elif not p.strip():
            issues.append(Issue(line, EMPTY, "'prompt' is empty"))
    else:
        msgs = obj["messages"]
        issues += check_messages(msgs, line, need_final_assistant=False)
        if not issues and msgs[-1]["role"] != "user":
            issues.append(Issue(line, LAST_TURN, "in a preference record 'messages' must end with the user's turn"))
    issues += _completion_issues(obj, "chosen", line)
    issues += _completion_issues(obj, "rejected", line)
    if not issues and _text_of(obj["chosen"]) == _text_of(obj["rejected"]):
        issues.append(Issue(line, DUPLICATE, "'chosen' and 'rejected' are identical"))
    return k, issues


def _text_of(v: Any) -> str:
    return v if isinstance(v, str) else v[0]["content"]


def prompt_messages(obj: dict) -> list[dict]:
    """The prompt part of a preference record as a message list."""
    if "prompt" in obj:
        return [{"role": "user", "content": obj["prompt"]}]
    return [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]


def completion_text(v: Any) -> str:
    return _text_of(v)


def read_records(path: str | Path, kind: str | None = None) -> tuple[str, list[Record], list[Issue]]:
    """Parse and schema-check a JSONL file. Returns (kind, records, issues).

    Raises PluralError only for file-level problems (missing, directory, empty, no records).
    """
    p = open_jsonl(path)
    records: list[Record] = []
    issues: list[Issue] = []
    seen: dict[str, int] = {}
    for no, raw, issue in iter_lines(p):
        if issue is not None:
            issues.append(issue)
        if raw is None:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            issues.append(Issue(no, ENCODING, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); save the file as UTF-8"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            issues.append(Issue(no, NOT_JSON, f"not JSON: {e.msg} at column {e.colno}"))
            continue
        k, rec_issues = check_record(obj, no, kind)
        if kind is None and k is not None and not rec_issues:
            kind = k
        if rec_issues:
            issues.extend(rec_issues)
            continue
        key = json.dumps(obj, sort_keys=True, ensure_ascii=False)
        if key in seen:
            issues.append(Issue(no, DUPLICATE, f"same record as line {seen[key]}", "warning"))
            continue
        seen[key] = no
        records.append(Record(no, k, obj))
    if kind is None:
        if not any(i.severity == "error" for i in issues):
            raise PluralError(f"{p}: no records found; expected one JSON object per line")
        kind = "unknown"
    return kind, records, issues


def load_records(path: str | Path, kind: str | None = None) -> tuple[str, list[Record]]:
    """Read a data file for training: any error stops with a message that names the line."""
    k, recs, issues = read_records(path, kind)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        shown = "\n  ".join(i.format(path) for i in errors[:10])
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise PluralError(f"{path}: {len(errors)} error(s); run `plural data check {path}` for the full report\n  {shown}{more}")
    return k, recs
