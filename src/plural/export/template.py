"""Facts about a model's own chat template that exporters need: its end-of-turn token."""

from __future__ import annotations

from plural.data.chat import render

_PROBE = "plural-end-of-turn-probe"


def end_of_turn(tok) -> str:
    """The special token the template writes right after an assistant message (`<|im_end|>` for ChatML,
    `<|eot_id|>` for Llama 3, `</s>` for Mistral); the tokenizer's EOS when the template writes none."""
    text = render(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}])
    tail = text[text.index(_PROBE) + len(_PROBE):]
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
    for i in tok(tail, add_special_tokens=False)["input_ids"]:
        if i in special:
            return tok.convert_ids_to_tokens(i)
    return tok.eos_token
