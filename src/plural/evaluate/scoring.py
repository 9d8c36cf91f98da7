"""Batched scoring with one loaded model: log-likelihoods, rolling log-likelihoods, generation.

Every suite kind and the lm-evaluation-harness model use this one path, so `plural eval` and
`lm_eval --model plural` agree on every number.

Batches are built from requests sorted by length (longest first, as lm-evaluation-harness does, so
an out-of-memory error shows up on the first batch) and capped by a token budget
(rows x longest row), so short items are scored many at a time and long ones few at a time. The
order is a pure function of the inputs, so the same inputs give identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from plural.data.chat import render


@dataclass(frozen=True)
class LogLik:
    logprob: float  # sum of log p (nats) over the continuation tokens
    tokens: int  # number of continuation tokens scored
    greedy: bool  # every continuation token was the argmax


class Scorer:
    """Scores requests with `model` (a base model or a PeftModel with the wanted adapter active)."""

    def __init__(self, model, tok, max_length: int = 1024, batch_tokens: int = 4096, gen_batch_size: int = 8,
                 on_progress: Callable[[int], None] | None = None):
        self.model = model
        self.tok = tok
        ctx = getattr(model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, ctx)
        self.batch_tokens = batch_tokens  # a row longer than this is scored alone
        self.gen_batch_size = gen_batch_size
        self.on_progress = on_progress or (lambda n: None)
        self.device = next(model.parameters()).device
        # The token a document is conditioned on when it starts from nothing (lm-eval's prefix token).
        self.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    # ---- helpers to build requests ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, messages: list[dict]) -> str:
        """The model's own chat template with the assistant header appended (what it sees at inference)."""
        return render(self.tok, messages, add_generation_prompt=True)

    def split_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as the model sees their concatenation.

        Tokenizing the two halves separately would give tokens the model never sees at a merged
        boundary, so the whole is encoded once and split where the context's own tokens end;
        trailing spaces of the context move to the continuation (as lm-evaluation-harness does).
        """
        n_sp = len(context) - len(context.rstrip(" "))
        if n_sp:
            context, continuation = context[:-n_sp], context[-n_sp:] + continuation
        if not context:
            return [self.prefix_token_id], self.encode(continuation)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return whole[: len(ctx)], whole[len(ctx):]

    # ---- log-likelihoods ----------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[LogLik]:
        """log p(continuation | context) for each (context_ids, continuation_ids), in input order.

        The model sees context + continuation[:-1], truncated from the left to `max_length`; the
        continuation itself is never truncated (it must fit in max_length).
        """
        rows = []  # (input ids, number of target tokens, target ids)
        for ctx, cont in requests:
            if not cont:
                raise ValueError("empty continuation")
            full = list(ctx) + list(cont)
            inp = full[:-1][-self.max_length:]
            if len(cont) > len(inp):
                raise ValueError(f"continuation of {len(cont)} tokens does not fit in max_length {self.max_length}")
            rows.append((inp, list(cont)))
        out: list[LogLik | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        s = 0
        while s < len(order):
            width = len(rows[order[s]][0])
            n = max(1, self.batch_tokens // width)
            idx = order[s:s + n]
            s += len(idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                inp = rows[i][0]
                ids[r, :len(inp)] = torch.tensor(inp)
                mask[r, :len(inp)] = 1
            # Only positions lo.. predict a continuation token in some row; the output layer
            # (V = 49k for SmolLM2, a fifth of the model's FLOPs) runs on those alone.
            lo = min(len(rows[i][0]) - len(rows[i][1]) for i in idx)
            keep = torch.arange(lo, width, device=self.device)
            # Right padding: a causal model's logits at real positions do not see the pads.
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                logits_to_keep=keep).logits  # [B, width - lo, V]
            for r, i in enumerate(idx):
                inp, cont = rows[i]
                k = len(cont)
                sel = logits[r, len(inp) - k - lo:len(inp) - lo].float()  # [k, V]: the positions that predict cont
                lp = torch.log_softmax(sel, dim=-1)
                tgt = torch.tensor(cont, device=lp.device)
                tok_lp = lp.gather(1, tgt[:, None])[:, 0]
                out[i] = LogLik(float(tok_lp.double().sum()), k, bool((lp.argmax(-1) == tgt).all()))
            self.on_progress(len(idx))
        return out  # type: ignore[return-value]

    def rolling_requests(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
        """Windows that predict every token of a document exactly once.

        The first window predicts ids[0:L] from the prefix token; each later one predicts the next
        L/2 tokens with the L/2 tokens before them as context, so every token after the first
        window sees at least L/2 tokens of history (lm-eval's default uses none; this is the usual
        strided evaluation, e.g. the Hugging Face perplexity guide).
        """
        L = self.max_length
        reqs = [([self.prefix_token_id], ids[:L])]
        stride = max(1, L // 2)
        s = L
        while s < len(ids):
            cont = ids[s:s + stride]
            reqs.append((ids[max(0, s - (L - len(cont))):s], cont))
            s += len(cont)
        return [r for r in reqs if r[1]]

    def loglikelihood_rolling(self, docs: Sequence[list[int]]) -> list[float]:
        """Total log p (nats) of each token list, conditioned only on the prefix token."""
        reqs, owner = [], []
        for d, ids in enumerate(docs):
            for r in self.rolling_requests(list(ids)):
                reqs.append(r)
                owner.append(d)
        totals = [0.0] * len(docs)
        for d, ll in zip(owner, self.loglikelihood(reqs)):
            totals[d] += ll.logprob
        return totals

    # ---- generation ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, texts: Sequence[str], max_new_tokens: int = 128, until: Sequence[str] = (),
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        """Continue each already-rendered text; greedy unless temperature > 0. Cut at the first stop string."""
        tok = self.tok
        out = [""] * len(texts)
        old_side = tok.padding_side
        tok.padding_side = "left"  # generation appends on the right, so pads go left
        try:
            order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
            for s in range(0, len(order), self.gen_batch_size):
                idx = order[s:s + self.gen_batch_size]
                enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v[:, -self.max_length:].to(self.device) for k, v in enc.items()}
                kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                if temperature > 0:
                    torch.manual_seed(seed)
                    kw.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
                else:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                if until:
                    kw.update(stop_strings=list(until), tokenizer=tok)
                gen = self.model.generate(**enc, **kw)
                width = enc["input_ids"].shape[1]
                for j, i in enumerate(idx):
                    text = tok.decode(gen[j, width:], skip_special_tokens=True)
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
                self.on_progress(len(idx))
        finally:
            tok.padding_side = old_side
        return out

    def generate_chat(self, prompts: Sequence[list[dict]], max_new_tokens: int = 128) -> list[str]:
        """Greedy answers to message lists, with the model's own chat template."""
        return [t.strip() for t in self.generate([self.chat_prompt(m) for m in prompts], max_new_tokens)]
