"""plural as an lm-evaluation-harness model type: `--model plural --model_args model=NAME,adapter=PATH`.

lm-eval 0.4 finds model types only in its own registry (`lm_eval.api.registry.model_registry`,
filled from `lm_eval.models.MODEL_MAPPING`; it has no plug-in entry points), so plural's type is
registered when this module is imported. The `plural-lm-eval` command does exactly that and then
runs lm-eval's own command line, so it takes every `lm_eval` argument unchanged:

    plural-lm-eval run --model plural --model_args model=smollm2-135m-instruct,adapter=runs/support/adapter \\
        --tasks my_task --include_path tasks/

From Python: `import plural.evaluate.lm_eval_model` and then `lm_eval.simple_evaluate(model="plural", ...)`.

Every request goes through `plural.evaluate.scoring.Scorer`, the batched path `plural eval` uses.
"""

from __future__ import annotations

import os

import lm_eval.models  # noqa: F401  (lm-eval's own types, registered lazily; see below)
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model

from plural.evaluate.scoring import Scorer


class PluralLM(LM):
    """A base model from the plural store, optionally with one LoRA adapter."""

    def __init__(self, model: str | None = None, adapter: str | None = None, max_length: int = 2048,
                 batch_tokens: int = 4096, batch_size: int | str | None = None, max_gen_toks: int = 256,
                 device: str | None = None, **_ignored) -> None:
        # lm-eval passes batch_size/max_batch_size/device to every model type; batch_size here is
        # the generation batch (scoring batches are sized by batch_tokens).
        super().__init__()
        from plural.generation import load_for_inference

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        m, tok, stored = load_for_inference(model, adapter)
        import torch

        # lm-eval passes device="cuda" by default; like its hf model, fall back to the CPU without one.
        if device and device.startswith("cuda") and torch.cuda.is_available():
            m = m.to(device)
        gen_bs = int(batch_size) if isinstance(batch_size, (int, str)) and str(batch_size).isdigit() else 8
        self.scorer = Scorer(m, tok, max_length=int(max_length), batch_tokens=int(batch_tokens), gen_batch_size=gen_bs)
        self.tok = tok
        self.max_gen_toks = int(max_gen_toks)
        self._name = f"plural/{stored.name}" + (f"+{adapter}" if adapter else "")

    # lm-eval calls: loglikelihood([(context, continuation)]) -> [(logprob, is_greedy)]
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.scorer.split_pair(*r.args) for r in requests]
        return [(ll.logprob, ll.greedy) for ll in self.scorer.loglikelihood(pairs)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([self.scorer.encode(r.args[0]) for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Requests are grouped by their generation settings; within a group the scorer batches.
        out: list[str] = [""] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            kw = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temp = float(kw.pop("temperature", 0.0) or 0.0)
            if kw.pop("do_sample", None) is False:
                temp = 0.0
            groups.setdefault((tuple(until), n_new, temp), []).append(i)
        for (until, n_new, temp), idx in groups.items():
            texts = self.scorer.generate([requests[i].args[0] for i in idx], max_new_tokens=n_new, until=until, temperature=temp)
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template


# lm-eval imports its own model types only into an empty registry, so they were imported above,
# before this registration makes the registry non-empty.
if "plural" not in model_registry:
    register_model("plural")(PluralLM)


def main() -> None:
    """`plural-lm-eval`: lm-eval's command line with the `plural` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
