"""Tool calling: the prompt for the tools, the grammar a call must follow, and reading calls back.

The call format is Hermes' (NousResearch), which Qwen2/2.5/3 and SmolLM3 were trained on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that renders `tools` itself gets them (and assistant `tool_calls` / `tool` turns in
HF's message format). A template that does not (SmolLM2's) gets the tools as a system-prompt
section (`TOOLS_PROMPT`), earlier calls rendered in the format above and tool results as user
turns wrapped in <tool_response>. Either way the model's answer is constrained by a grammar: with
`tool_choice` "required" or a named function, to one or more calls (one with
`parallel_tool_calls: false`) whose arguments follow the function's JSON schema; with "auto", to
free text, optionally followed by calls as above: the text is unconstrained until the model writes
the opening tag, and from there the call is. Text before the first call is the message's content.
Streamed, a call goes out as OpenAI's and vLLM's do: its name first, then pieces of its arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from plural.serve import protocol as P
from plural.serve.grammar import json_inline, lark_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TOOLS_PROMPT = """# Tools

You may call one or more functions to help with the user's request. The functions, as JSON schemas:
{tools}

To call a function, answer with only a JSON object giving its name and arguments inside <tool_call></tool_call> tags, one block per call:
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}
</tool_call>"""


def template_renders_tools(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "tools" in template


def _arguments(call: P.ToolCall) -> object:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments  # as sent: the template shows it verbatim


def _call_text(name: str, arguments: object) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def tool_schema(f: P.FunctionDef) -> dict:
    return {"type": "function", "function": f.model_dump(exclude_none=True)}


def messages(req: P.ChatCompletionRequest, tokenizer, system: str | None) -> tuple[list[dict], list[dict] | None]:
    """The request's messages as chat-template dicts, and the `tools` to pass to the template (None
    when the tools went into the system prompt, or when no tools are offered)."""
    offered = req.tools if req.tool_mode() != "none" else None
    native = bool(offered) and template_renders_tools(tokenizer)
    out: list[dict] = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        text = m.text()
        if m.role == "assistant" and m.tool_calls:
            if native:
                out.append({"role": "assistant", "content": text, "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c)}}
                    for c in m.tool_calls]})
                continue
            text = (text + "\n" if text else "") + "\n".join(_call_text(c.function.name, _arguments(c)) for c in m.tool_calls)
        elif m.role == "tool" and not native:
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        msg = {"role": role, "content": text}
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    if system and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system})
    if offered and not native:
        section = TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool_schema(t.function), ensure_ascii=False)
                                                      for t in offered))
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out, ([tool_schema(t.function) for t in offered] if native else None)


def call_schema(f: P.FunctionDef) -> dict:
    args = f.parameters if f.parameters else {"type": "object", "properties": {}, "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": f.name}, "arguments": args},
            "required": ["name", "arguments"], "additionalProperties": False}


def grammar(req: P.ChatCompletionRequest, answer_schema: dict | None) -> str | None:
    """The llguidance grammar for a request that offers tools (None when tool_choice is none)."""
    mode = req.tool_mode()
    if mode == "none":
        return None
    funcs = [t.function for t in req.tools]
    if mode == "named":
        funcs = [f for f in funcs if f.name == req.tool_choice.function.name]
    rules = [f"fn{i}: {json_inline(call_schema(f))}" for i, f in enumerate(funcs)]
    body = f'body: "\\n"? ({" | ".join(f"fn{i}" for i in range(len(funcs)))}) "\\n"? "{CLOSE}"'
    more = '("\\n"? call)*' if req.parallel_tool_calls is not False else ""
    lines = [f'call: "{OPEN}" body', body, *rules]
    if mode != "auto":
        head = [f"start: call {more}"]
    elif answer_schema is not None:  # that JSON document, or calls
        head = [f"start: answer | call {more}", f"answer: {json_inline(answer_schema)}"]
    else:
        # Free text that contains no call, or free text up to the first OPEN and then calls.
        # `opening` is a lazy lexeme (llguidance's syntax.md, "Tool calling"): it ends at the first
        # OPEN the model writes, so from there on the call is constrained; until then nothing is.
        head = [f"start: TEXT | opening body {more}", f'opening[lazy]: ANY "{OPEN}"', "ANY: /(.|\\n)*/",
                f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{OPEN}(.|\\n)*/"]
    return lark_grammar("\n".join([*head, *lines]) + "\n")


_DECODER = json.JSONDecoder()
# A call as the grammar writes it: the name first, then the arguments (the schema's key order).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_TAIL = re.compile(r"\s*\}\s*" + re.escape(CLOSE))


@dataclass
class CallStart:
    """A call's opening: its index in the answer, id and function name (arguments follow)."""
    index: int
    id: str
    name: str


@dataclass
class CallArgs:
    """A piece of a call's `arguments` text; the pieces of one call concatenate to all of it."""
    index: int
    text: str


@dataclass
class CallEnd:
    index: int


Piece = str | CallStart | CallArgs | CallEnd


def _call_at(text: str, i: int) -> tuple[tuple[str, str] | None, int]:
    """text[i:] starts with OPEN: ((name, arguments as JSON text), the index after its CLOSE), or
    (None, -1) when no complete call is there yet. The JSON is read as JSON, so a "</tool_call>"
    inside a string argument does not end the call."""
    j = i + len(OPEN)
    while j < len(text) and text[j] in " \n":
        j += 1
    try:
        obj, end = _DECODER.raw_decode(text, j)
    except json.JSONDecodeError:
        return None, -1
    while end < len(text) and text[end] in " \n":
        end += 1
    if not text.startswith(CLOSE, end) or not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None, -1
    args = obj.get("arguments", obj.get("parameters", {}))
    return (obj["name"], json.dumps(args, ensure_ascii=False)), end + len(CLOSE)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse(text: str) -> tuple[str | None, list[P.ToolCallOut]]:
    """An answer -> (its content, its tool calls). Text that is not a complete call stays content."""
    p = StreamParser()
    pieces = p.push(text)
    rest = p.finish()
    calls: dict[int, P.ToolCallOut] = {}
    content = []
    for x in pieces:
        if isinstance(x, str):
            content.append(x)
        elif isinstance(x, CallStart):
            calls[x.index] = P.ToolCallOut(id=x.id, function=P.FunctionCallOut(name=x.name, arguments=""))
        elif isinstance(x, CallArgs):
            calls[x.index].function.arguments += x.text
    calls.pop(p.unfinished, None)  # cut short: its text (`rest`) stays content
    if not calls:
        return text, []
    # The content as the stream sends it: whitespace before a tag and between calls is layout.
    text = "".join(content) + rest
    return text if text.strip() else None, list(calls.values())


class _Value:
    """Where one JSON value ends, in text that arrives in pieces: strings (with escapes) and
    nesting are tracked, so a brace or a "</tool_call>" inside a string does not end it."""

    def __init__(self):
        self.started = self.scalar = self.string = self.escape = self.done = False
        self.depth = 0

    def feed(self, text: str) -> tuple[int, str]:
        """(how many characters of text were read, the ones that belong to the value)."""
        value = []
        for k, ch in enumerate(text):
            if not self.started:
                if ch.isspace():
                    continue
                self.started, self.scalar = True, ch not in '{["'
            elif self.scalar and ch in ",}] \t\r\n":  # a number or literal ends before its delimiter
                self.done = True
                return k, "".join(value)
            value.append(ch)
            if self.string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.string = False
                    self.done = self.depth == 0
            elif ch == '"':
                self.string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth == 0
            if self.done:
                return k + 1, "".join(value)
        return len(text), "".join(value)


class StreamParser:
    """Splits a streamed answer into content and tool-call pieces, as vLLM and OpenAI stream them.

    Text that could be the start of "<tool_call>" is held back until it is known not to be. Once a
    call's name is read, a `CallStart` is released, then its `arguments` in `CallArgs` pieces as
    they arrive, then `CallEnd` at the closing tag. A call written in another layout (its keys in
    another order) is released whole once complete."""

    def __init__(self):
        self.buf = ""  # text not handled yet
        self.state = "text"  # text | head (after OPEN) | args (in the arguments) | tail (after them)
        self.calls = 0  # calls started
        self.raw = ""  # the current call's text so far, from OPEN
        self.value: _Value | None = None
        self.unfinished: int | None = None  # set by `finish`: the index of a started call left open
        self.after_call = False

    def push(self, text: str) -> list[Piece]:
        self.buf += text
        out: list[Piece] = []
        while getattr(self, "_" + self.state)(out):
            pass
        return [x for x in out if not isinstance(x, str) or x]

    def _text(self, out: list[Piece]) -> bool:
        if self.after_call:  # the newlines between calls are layout, not content
            self.buf = self.buf.lstrip("\n")
            self.after_call = not self.buf
        i = self.buf.find(OPEN)
        if i < 0:
            # Held back: what may be the start of the tag, and the whitespace before it (layout if a
            # tag follows, content if not).
            n = len(self.buf) - _partial_suffix(self.buf, OPEN)
            n = len(self.buf[:n].rstrip())
            out.append(self.buf[:n])
            self.buf = self.buf[n:]
            return False
        out.append(self.buf[:i].rstrip())
        self.raw, self.buf, self.state = OPEN, self.buf[i + len(OPEN):], "head"
        return True

    def _head(self, out: list[Piece]) -> bool:
        m = _HEAD.match(self.buf)
        if m is not None:
            out.append(CallStart(self.calls, new_call_id(), json.loads(m.group(1))))
            self.raw += self.buf[:m.end()]
            self.buf, self.state, self.value = self.buf[m.end():], "args", _Value()
            return True
        whole, end = _call_at(OPEN + self.buf, 0)
        if whole is None:
            return False  # not complete yet (or never: `finish` then returns it as text)
        out += [CallStart(self.calls, new_call_id(), whole[0]), CallArgs(self.calls, whole[1]), CallEnd(self.calls)]
        self._closed(end - len(OPEN))
        return True

    def _args(self, out: list[Piece]) -> bool:
        n, value = self.value.feed(self.buf)
        if value:
            out.append(CallArgs(self.calls, value))
        self.raw += self.buf[:n]
        self.buf = self.buf[n:]
        if self.value.done:
            self.state = "tail"
        return self.value.done

    def _tail(self, out: list[Piece]) -> bool:
        m = _TAIL.match(self.buf)
        if m is None:
            rest = self.buf.lstrip()
            if not rest or (rest[0] == "}" and CLOSE.startswith(rest[1:].lstrip())):
                return False  # the closing may still come
            # Something else after the arguments (only possible without a grammar): the call ends here.
            out.append(CallEnd(self.calls))
            self.calls += 1
            self.raw, self.state = "", "text"
            return True
        out.append(CallEnd(self.calls))
        self._closed(m.end())
        return True

    def _closed(self, end: int) -> None:
        self.calls += 1
        self.buf, self.raw, self.state, self.after_call = self.buf[end:], "", "text", True

    def finish(self) -> str:
        """The text left when the answer ends: a held-back tag prefix, or an unfinished call's text
        (`unfinished` then names the call if its start was already released)."""
        self.unfinished = self.calls if self.state in ("args", "tail") else None
        rest = (self.raw if self.state != "text" else "") + self.buf
        self.buf, self.raw, self.state = "", "", "text"
        return rest


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
