"""A small interpreter of exactly the Go text/template constructs plural's Ollama TEMPLATE uses.

Ollama renders TEMPLATE with Go's text/template; no Go toolchain is on the test machines, so this
follows the Go documentation (pkg.go.dev/text/template) for the subset emitted: literal text,
`{{ PIPE }}` printing, `if` / `else if` / `else` / `end`, `range $i, $m := PIPE`, variables (`$`,
`$m`, `$m.Field`, `$.Field`, `.Field`), parenthesised calls with a trailing field (`(index X 0).Role`),
string literals, integers, and the builtins eq, ne, not, and, or (short-circuit, returning an
operand as Go does), len, slice and index. Anything else raises, so a TEMPLATE that starts using a
construct this does not know fails the test instead of being rendered loosely.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:\\.|[^"\\])*"|:=|,|[^\s(),]+)')


def _truth(v: Any) -> bool:
    return not (v is None or v is False or v == 0 or v == "" or (hasattr(v, "__len__") and len(v) == 0))


@dataclass
class _Node:
    kind: str  # text | print | if | range
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    branches: list[tuple[list[str] | None, list["_Node"]]] = field(default_factory=list)  # if: (cond | None for else, body)
    vars: tuple[str, str] = ("", "")


def _tokens(src: str) -> list[str]:
    out, pos = [], 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or not m.group(1):
            if src[pos:].strip() == "":
                break
            raise ValueError(f"cannot tokenise {src[pos:]!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def parse(template: str) -> list[_Node]:
    items: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        items.append(("text", template[pos:m.start()]))
        body = m.group(1)
        if body.startswith("-") or body.endswith("-") or body.lstrip().startswith("/*"):
            raise ValueError(f"construct not supported by this interpreter: {{{{{body}}}}}")
        items.append(("action", body.strip()))
        pos = m.end()
    items.append(("text", template[pos:]))
    nodes, rest = _parse_list(items, 0)
    if rest != len(items):
        raise ValueError(f"unexpected {items[rest][1]!r}")
    return nodes


def _parse_list(items, i):
    nodes: list[_Node] = []
    while i < len(items):
        kind, s = items[i]
        if kind == "text":
            if s:
                nodes.append(_Node("text", text=s))
            i += 1
            continue
        words = s.split(None, 1)
        head = words[0] if words else ""
        if head in ("end", "else"):
            return nodes, i
        if head == "if":
            node = _Node("if")
            cond = _tokens(words[1])
            while True:
                body, i = _parse_list(items, i + 1)
                node.branches.append((cond, body))
                _, s2 = items[i]
                if s2 == "end":
                    break
                if s2 == "else":
                    body, i = _parse_list(items, i + 1)
                    node.branches.append((None, body))
                    if items[i][1] != "end":
                        raise ValueError("else must be followed by end")
                    break
                if s2.startswith("else if "):
                    cond = _tokens(s2[len("else if "):])
                    continue
                raise ValueError(f"unexpected {s2!r}")
            nodes.append(node)
            i += 1
        elif head == "range":
            m = re.fullmatch(r"range\s+(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.+)", s, re.S)
            if not m:
                raise ValueError(f"unsupported range form {s!r}")
            body, i = _parse_list(items, i + 1)
            if items[i][1] != "end":
                raise ValueError("range without end")
            nodes.append(_Node("range", tokens=_tokens(m.group(3)), branches=[(None, body)], vars=(m.group(1), m.group(2))))
            i += 1
        else:
            nodes.append(_Node("print", tokens=_tokens(s)))
            i += 1
    return nodes, i


def _field(v: Any, path: str) -> Any:
    for name in path.split(".")[1:]:
        if name:
            v = v[name]
    return v


class _Eval:
    def __init__(self, dot: Any, env: dict[str, Any]):
        self.dot, self.env = dot, env

    def pipe(self, toks: list[str]) -> Any:
        val, rest = self.command(toks)
        if rest:
            raise ValueError(f"trailing tokens {rest}")
        return val

    def command(self, toks: list[str]):
        """A call `fn arg...` up to a closing paren, or a single operand."""
        funcs = {"eq", "ne", "not", "and", "or", "len", "slice", "index"}
        if toks and toks[0] in funcs:
            name, args, toks = toks[0], [], toks[1:]
            while toks and toks[0] != ")":
                args.append(toks)
                toks = self.skip(toks)
            return self.call(name, args), toks
        return self.operand(toks)

    def skip(self, toks):
        """The tokens after one operand (parenthesised group with its trailing field, or a word)."""
        if toks[0] == "(":
            depth, j = 0, 0
            while True:
                depth += {"(": 1, ")": -1}.get(toks[j], 0)
                j += 1
                if depth == 0:
                    break
            if j < len(toks) and toks[j].startswith("."):
                j += 1
            return toks[j:]
        return toks[1:]

    def operand(self, toks):
        t = toks[0]
        if t == "(":
            val, rest = self.command(toks[1:])
            if not rest or rest[0] != ")":
                raise ValueError("missing )")
            rest = rest[1:]
            if rest and rest[0].startswith("."):
                val, rest = _field(val, rest[0]), rest[1:]
            return val, rest
        if t.startswith('"'):
            return json.loads(t), toks[1:]
        if re.fullmatch(r"-?\d+", t):
            return int(t), toks[1:]
        if t.startswith("$"):
            name, _, path = t.partition(".")
            return _field(self.env[name], "." + path), toks[1:]
        if t.startswith("."):
            return _field(self.dot, t), toks[1:]
        raise ValueError(f"unsupported operand {t!r}")

    def call(self, name: str, args: list[list[str]]) -> Any:
        val = lambda a: self.operand(a)[0]  # noqa: E731
        if name == "and":
            v = None
            for a in args:
                v = val(a)
                if not _truth(v):
                    return v
            return v
        if name == "or":
            v = None
            for a in args:
                v = val(a)
                if _truth(v):
                    return v
            return v
        vs = [val(a) for a in args]
        if name == "eq":
            return any(vs[0] == x for x in vs[1:])
        if name == "ne":
            return vs[0] != vs[1]
        if name == "not":
            return not _truth(vs[0])
        if name == "len":
            return len(vs[0])
        if name == "index":
            return vs[0][vs[1]]
        if name == "slice":
            return vs[0][vs[1]:vs[2]] if len(vs) == 3 else vs[0][vs[1]:]
        raise ValueError(name)


def render(template: str, data: dict[str, Any]) -> str:
    out: list[str] = []

    def run(nodes, dot, env):
        for n in nodes:
            if n.kind == "text":
                out.append(n.text)
            elif n.kind == "print":
                v = _Eval(dot, env).pipe(n.tokens)
                out.append(v if isinstance(v, str) else json.dumps(v))
            elif n.kind == "if":
                for cond, body in n.branches:
                    if cond is None or _truth(_Eval(dot, env).pipe(cond)):
                        run(body, dot, dict(env))
                        break
            elif n.kind == "range":
                for i, item in enumerate(_Eval(dot, env).pipe(n.tokens)):
                    run(n.branches[0][1], item, {**env, n.vars[0]: i, n.vars[1]: item})

    run(parse(template), data, {"$": data})
    return "".join(out)
