"""A request's unit of generation (one prompt, one choice) and what the engine tells its owner."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

from plural.serve.detok import TextStream
from plural.serve.sampler import SamplingParams, make_generator


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What the engine tells a sequence's owner after a step: new text, and the finish when done."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None  # for the client: no internals, the request id to look up in the log
    completion_tokens: int = 0


class Sequence:
    _ids = itertools.count()

    def __init__(self, model_id: str, adapter, prompt_ids: list[int], params: SamplingParams,
                 emit: Callable[[Event], None], request_id: str = "", constraint=None):
        self.id = next(self._ids)
        self.model_id, self.adapter, self.prompt_ids, self.params, self.emit = model_id, adapter, prompt_ids, params, emit
        self.request_id = request_id  # the HTTP request's id, for the server log
        self.out_ids: list[int] = []
        self.stream: TextStream | None = None  # made on the engine thread at the first token
        self.row: int | None = None  # its KV row while running
        self.cancelled = False  # set from any thread (client gone, timeout); acted on between steps
        self.done = False
        self.generator = make_generator(params.seed)
        self.constraint = constraint  # grammar.Constraint when the output must follow a grammar

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def position(self) -> int:
        """The position of the last token fed (the next decode step's input)."""
        return len(self.prompt_ids) + len(self.out_ids) - 1
