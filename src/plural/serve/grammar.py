"""Structured output: grammars compiled to llguidance token matchers, and the masks they put on logits.

llguidance (microsoft/llguidance) turns a JSON schema or a Lark grammar into a matcher that says,
after each token, which tokens may come next: tokenizer set-up ~1 s once, a schema compile a few
ms, a mask ~50-150 us for SmolLM2's 49k-token vocabulary. Compiles run at request time off the
engine thread with a time limit and llguidance's fuel limits; a compiled grammar is cached by the
hash of its text and each sequence gets a cheap copy. A schema keyword the compiler cannot
enforce is an error naming it (fail closed), never a grammar that silently ignores it.

On the engine thread, each constrained row's allowed-token bitmask is filled (all rows in one
parallel llguidance call) and applied to that row's logits before sampling; the sampled token is
then consumed by the row's matcher.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

import numpy as np
import torch

COMPILE_SECONDS = 5.0  # a compile that takes longer is refused (vLLM's has no limit: a known complaint)
MAX_GRAMMAR_BYTES = 200_000  # the schema or grammar text, before compiling
CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped)
# Compact but readable JSON, as json.dumps writes it; no free whitespace, so a small model
# cannot run out its token budget on newlines inside a JSON value. `lenient: False` overrides a
# schema's own "x-guidance" options: an unimplemented keyword is always an error (fail closed).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}


class Constraint:
    """A sequence's grammar state: its llguidance matcher and the tokenizer's vocabulary size (the
    bitmask's width; logits wider than that are padding rows of the embedding, always forbidden)."""

    def __init__(self, matcher, vocab: int):
        self.matcher, self.vocab = matcher, vocab

    def consume(self, token: int) -> str | None:
        """Advance past the sampled token; an error message if the grammar rejects it."""
        if self.matcher.consume_token(token):
            return None
        return f"the output grammar rejected token {token}: {_clean(self.matcher.get_error())}"


class GrammarError(ValueError):
    """A schema or grammar that cannot be enforced; the message names the keyword or the limit."""


def json_schema_grammar(schema: dict) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def lark_grammar(lark: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(lark)


def json_inline(schema: dict) -> str:
    """A schema for `%json` inside a Lark grammar, with the same JSON options as a whole-answer schema."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


class Grammars:
    """The server's grammar compiler: one llguidance tokenizer, a cache of compiled matchers."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        self.hf_tokenizer = tokenizer
        self.eos_ids = sorted(eos_ids)
        self._lltok = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, object] = OrderedDict()

    def lltokenizer(self):
        with self._lock:
            if self._lltok is None:
                import llguidance.hf

                self._lltok = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=len(self.hf_tokenizer),
                                                           eos_token=self.eos_ids)
                executor()  # its threads start here, not on the engine thread at the first mask
            return self._lltok

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher for `grammar` (the text llguidance's grammar_from_* returned). Blocking:
        call it off the event loop and the engine thread. Raises GrammarError."""
        from llguidance import LLMatcher, LLParserLimits

        if len(grammar) > MAX_GRAMMAR_BYTES:
            raise GrammarError(f"the schema is too large to compile ({len(grammar)} bytes as a grammar, "
                               f"limit {MAX_GRAMMAR_BYTES})")
        key = hashlib.sha256(grammar.encode()).hexdigest()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
        if template is None:
            tok = self.lltokenizer()
            limits = LLParserLimits(initial_lexer_fuel=1_000_000, max_grammar_size=500_000)
            is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tok, limits=limits)
            if is_error:
                raise GrammarError(_clean(messages[0]))
            template = LLMatcher(tok, grammar, log_level=0, limits=limits)
            if template.is_error():
                raise GrammarError(_clean(template.get_error()))
            with self._lock:
                self._cache[key] = template
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return Constraint(template.deep_copy(), self.lltokenizer().vocab_size)

    def cached(self) -> int:
        return len(self._cache)


def _clean(message: str) -> str:
    # llguidance appends its parser state dump to some errors; the first line says what is wrong.
    return message.strip().splitlines()[0] if message.strip() else "the grammar could not be compiled"


_executor = None
_executor_lock = threading.Lock()


def executor():
    """llguidance's thread pool for filling many rows' masks in one call (one per process)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            from llguidance import LLExecutor

            _executor = LLExecutor()
        return _executor


def mask_logits(logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> list[str | None]:
    """Set the logits of tokens the grammar forbids to -inf, in place on logits [n, V], for each
    row in `rows` with its constraint. Returns an error per listed row (None when fine)."""
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask, fill_next_token_bitmask_par

    vocab = constraints[0].vocab
    matchers = [c.matcher for c in constraints]
    errors: list[str | None] = [None] * len(rows)
    for j, m in enumerate(matchers):
        if m.is_error():
            errors[j] = f"the output grammar failed: {_clean(m.get_error())}"
    bits = allocate_token_bitmask(len(rows), vocab)  # [m, ceil(V/32)] int32, all allowed
    live = [j for j, e in enumerate(errors) if e is None]
    try:
        fill_next_token_bitmask_par(executor(), [(matchers[j], j) for j in live], bits)
    except Exception:  # one bad matcher must not fail the others: fill them one by one
        for j in live:
            try:
                fill_next_token_bitmask(matchers[j], bits, j)
            except Exception as e:
                errors[j] = f"the output grammar failed: {e}"
    # Bit b of int32 word w allows token 32 w + b: little-endian bytes, little-endian bits.
    allowed = torch.from_numpy(np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little"))[:, :vocab].bool()
    if logits.shape[1] > vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(len(rows), logits.shape[1] - vocab)], 1)
    index = torch.tensor(rows)
    logits[index] = logits[index].masked_fill(~allowed[:, :logits.shape[1]], float("-inf"))
    return errors
