"""Chat rendering with the model's own template, and loss masks.

`encode_chat` renders the whole conversation once with `tokenizer.apply_chat_template` (exactly
the string the model sees at inference) and tokenizes it once, then marks as trained every token
whose characters fall inside an assistant turn -- the content *and* the end-of-turn token the
template appends (`<|im_end|>` for ChatML), so the model learns to stop.

Turn boundaries come from rendering prefixes: the text of messages[:i] with the generation prompt
ends where assistant turn i starts, and the text of messages[:i+1] ends where it ends. This needs
a template whose rendering of a prefix is a prefix of the full rendering, which holds for the
ChatML, Llama and Mistral families; other templates get a clear error instead of a silent
wrong mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from plural.errors import PluralError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def trained_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans [start, end) of trained assistant turns."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            raise PluralError(
                "the model's chat template does not render conversation prefixes as prefixes of the whole "
                "conversation, so assistant turns cannot be located for the loss mask"
            )
        spans.append((len(before), len(through)))
    return full, spans


def _tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_chat(tokenizer, messages: list[dict]) -> Encoded:
    full, spans = trained_spans(tokenizer, messages)
    ids, offsets = _tokenize_with_offsets(tokenizer, full)
    labels = [IGNORE] * len(ids)
    j = 0
    for k, (s, _e) in enumerate(offsets):
        # A token belongs to the span that contains its first character.
        while j < len(spans) and s >= spans[j][1]:
            j += 1
        if j < len(spans) and spans[j][0] <= s < spans[j][1]:
            labels[k] = ids[k]
    return Encoded(ids, labels)


def encode_text(tokenizer, text: str) -> Encoded:
    """Continued pre-training: every token is trained, EOS appended so documents end."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = list(ids) + [tokenizer.eos_token_id]
    return Encoded(list(ids), list(ids))


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt ready for generation (the template's assistant header appended)."""
    return list(tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
