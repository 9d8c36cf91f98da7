"""An Ollama folder: the GGUF(s) and a Modelfile whose TEMPLATE renders exactly as the Jinja chat template.

Ollama renders prompts with Go's text/template, not Jinja, and its built-in ChatML template drops
SmolLM2's default system prompt. The TEMPLATE is therefore derived from the model's own template:
each message renders as `prefix[role] + content + suffix[role]`, a default block stands where the
template inserts its own system prompt, and the assistant header follows the last message. The
pieces are read off renderings of probe conversations, then checked: the piecewise rendering must
equal the Jinja rendering over a matrix of conversations, or the export is refused (a template that
is not piecewise, such as Mistral's, which folds the system prompt into the first user turn).

Ollama inserts its SYSTEM (here: a value profile's system prompt) as the first message when a
request has none, so the template sees it as an ordinary system message.
Default: the merged GGUF, one file, no ADAPTER line (Ollama serves one adapter per model, and newer
releases are reported to refuse ADAPTER); `adapter_layer` keeps base GGUF + GGUF LoRA.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from pydantic import BaseModel

from plural.data.chat import render
from plural.errors import PluralError
from plural.export.files import atomic_folder
from plural.export.gguf_lora import export_gguf_lora
from plural.export.gguf_model import ModelType, export_gguf
from plural.export.source import Source
from plural.export.template import end_of_turn

ROLES = ("system", "user", "assistant")
_MARK = {r: f"\x02{r}-content\x03" for r in ROLES}


class Pieces(BaseModel):
    """The chat template as text around each message's content."""

    default: str  # where the first message is not a system message
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str  # the assistant header after a conversation that ends with a user turn

    def render(self, messages: list[dict]) -> str:
        out = "" if messages and messages[0]["role"] == "system" else self.default
        for m in messages:
            out += self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
        return out + (self.generation if messages and messages[-1]["role"] != "assistant" else "")


def _strip(text: str, start: str = "", end: str = "") -> str:
    if not (text.startswith(start) and text.endswith(end)) or len(start) + len(end) > len(text):
        raise ValueError(text)
    return text[len(start):len(text) - len(end)]


def matrix() -> list[list[dict]]:
    """Conversations ending with a user turn, with and without a system message, with awkward content."""
    s = {"role": "system", "content": "You answer in French.\nBe brief."}
    u = [{"role": "user", "content": c} for c in ("Hello", "Zähl bis 3: {{ 1 }} {% raw %} <b>", "  spaces\n\nand lines  ")]
    a = [{"role": "assistant", "content": c} for c in ("Bonjour !", "1, 2, 3\n")]
    convs = [[u[0]], [u[1]], [u[2], a[0], u[0]], [u[0], a[0], u[1], a[1], u[2]]]
    return convs + [[s] + c for c in convs] + [[dict(s, content="")] + convs[0]]


def derive(tok) -> Pieces:
    """Read the pieces off probe renderings; refuse a template the piecewise form does not reproduce."""
    m = {r: {"role": r, "content": _MARK[r]} for r in ROLES}
    try:
        r_u = render(tok, [m["user"]])
        generation = _strip(render(tok, [m["user"]], add_generation_prompt=True), r_u)
        before_u, user_suffix = r_u.split(_MARK["user"])
        r_ua = render(tok, [m["user"], m["assistant"]])
        between, asst_suffix = _strip(r_ua, before_u + _MARK["user"]).split(_MARK["assistant"])
        asst_prefix = _strip(between, user_suffix)
        r_uau = render(tok, [m["user"], m["assistant"], m["user"]])
        user_prefix = _strip(r_uau, r_ua, _MARK["user"] + user_suffix)
        default = _strip(before_u, "", user_prefix)
        r_su = render(tok, [m["system"], m["user"]])
        sys_prefix, rest = r_su.split(_MARK["system"])
        sys_suffix = _strip(rest, "", user_prefix + _MARK["user"] + user_suffix)
    except (ValueError, IndexError) as e:
        raise PluralError(f"the chat template does not render messages piecewise, so no Ollama TEMPLATE can match it ({e!r:.80})") from e
    pieces = Pieces(default=default, prefix={"system": sys_prefix, "user": user_prefix, "assistant": asst_prefix},
                    suffix={"system": sys_suffix, "user": user_suffix, "assistant": asst_suffix}, generation=generation)
    for i, conv in enumerate(matrix()):
        want = render(tok, conv, add_generation_prompt=True)
        if pieces.render(conv) != want:
            raise PluralError(f"the chat template renders test conversation {i} differently from its per-message pieces; "
                              "no Ollama TEMPLATE can match it. Fix: plural export hf --merged, and serve with the Jinja template")
    return pieces


def _go_text(s: str) -> str:
    # Template text is copied verbatim by text/template; only "{{" would start an action.
    if "{{" in s or '"""' in s:
        return "{{ " + json.dumps(s, ensure_ascii=False) + " }}"  # a Go string literal (JSON's escapes are a subset of Go's)
    return s


def go_template(p: Pieces) -> str:
    """The Pieces as Go text/template. No `{{-` trimming anywhere: every byte of text is literal."""
    t = _go_text
    body = "".join(
        f'{"{{ if" if i == 0 else "{{ else if"} eq $m.Role "{r}" }}}}{t(p.prefix[r])}{{{{ $m.Content }}}}{t(p.suffix[r])}'
        for i, r in enumerate(ROLES))
    return (f'{{{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}{t(p.default)}{{{{ end }}}}'
            f'{{{{ range $i, $m := .Messages }}}}{body}{{{{ end }}}}'
            f'{{{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}}}{t(p.generation)}{{{{ end }}}}'
            f'{{{{ end }}}}')


def modelfile(from_: str, template: str, stop: list[str], system: str | None, adapter: str | None) -> str:
    lines = [f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop]
    if system:
        if '"""' in system:
            raise PluralError('the system prompt contains """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


class OllamaExport(BaseModel):
    path: str
    files: list[str]
    created: str | None = None  # the Ollama model name, when `ollama create` ran


def export_ollama(src: Source, out: Path, qtype: ModelType = "q8_0", adapter_layer: bool = False,
                  system: str | None = None, force: bool = False) -> OllamaExport:
    from plural.store.models import load_tokenizer

    if adapter_layer and src.adapter is None:
        raise PluralError(f"--adapter-layer needs an adapter; {src.name!r} is a base model")
    tok = load_tokenizer(str(src.base.path))
    pieces = derive(tok)
    stop = [end_of_turn(tok)]
    with atomic_folder(out, force) as tmp:
        if adapter_layer:
            base_src = Source(base=src.base)
            export_gguf(base_src, tmp / "base.gguf", qtype)
            export_gguf_lora(src, tmp / "adapter.gguf", "f16")
            text = modelfile("./base.gguf", go_template(pieces), stop, system, "./adapter.gguf")
        else:
            export_gguf(src, tmp / "model.gguf", qtype)
            text = modelfile("./model.gguf", go_template(pieces), stop, system, None)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
    return OllamaExport(path=str(out), files=files)


def create(folder: Path, name: str) -> str:
    """`ollama create NAME -f Modelfile` in the folder (needs the `ollama` command and its server)."""
    exe = shutil.which("ollama")
    if exe is None:
        raise PluralError(f"ollama is not on PATH; the folder is ready: cd {folder} && ollama create {name} -f Modelfile")
    r = subprocess.run([exe, "create", name, "-f", "Modelfile"], cwd=folder, capture_output=True, text=True)
    if r.returncode != 0:
        raise PluralError(f"ollama create {name} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
    return name
