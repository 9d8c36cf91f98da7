"""Prompt logprobs (`echo` with `logprobs`): every position's log-softmax under the request's adapter,
from each runner, equals transformers + PEFT on the same prompt."""

from __future__ import annotations

import copy

import pytest
import torch

from families import FAMILIES, build, make_adapters
from plural.serve.fused import supports
from plural.serve.registry import make_adapter
from test_serve_families import engine_for, tok  # noqa: F401 (the tokenizer fixture)

PROMPT = list(range(300, 320))  # longer than Mistral's and Gemma 2's test windows (6)


def peft_logprobs(model, adapter, ids) -> torch.Tensor:
    from peft import PeftModel

    m = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)) if adapter else model
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "phi3"])
def test_prompt_logprobs_equal_transformers_peft(family, tok, tmp_path):  # noqa: F811
    model = build(family, tok)
    adapter = make_adapters(model, tmp_path)["all8"]
    base_ref, lora_ref = peft_logprobs(model, None, PROMPT), peft_logprobs(model, adapter, PROMPT)
    assert (base_ref - lora_ref).abs().max() > 0.1  # the adapter matters, so slot mix-ups show
    for runner in (["fused"] if supports(model.config) else []) + ["generic"]:
        r = engine_for(model, tok, runner).runner
        a = make_adapter("all8", adapter, None, r, 8)
        r.write_slot(1, r.read_adapter(a.weights, a.rank, a.scale))
        ids = torch.tensor(PROMPT)
        for slot, want in ((0, base_ref), (1, lora_ref)):
            got = r.prompt_logprobs(ids, slot)
            assert got.shape == want.shape and got.dtype == torch.float32
            err = float((got - want).abs().max())
            assert err < 1e-3, f"{family} / {runner} / slot {slot}: {err}"
