"""Serving logic between the routes and the engine: requests -> sequences, events -> OpenAI objects."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from plural.serve import protocol as P
from plural.serve import tools as T
from plural.serve.engine import EngineStopped, Event, QueueFull, Sequence
from plural.serve.grammar import COMPILE_SECONDS, GrammarError, Grammars, json_schema_grammar
from plural.serve.sampler import SamplingParams
from plural.serve.sequence import TokenLogprob


class APIError(Exception):
    """An error answered in OpenAI's shape {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(model: str) -> APIError:
    # Same answer for an absent model and one the caller's tenant may not use (no existence oracle).
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


@dataclass
class Job:
    """One HTTP request's sequences (n choices x prompts) and the queue their events arrive on."""

    seqs: list[Sequence]
    queue: asyncio.Queue
    start: float
    model: str
    status: int = 200  # what the request ended with: a stream that failed midway counts as its error
    echo: list[str] | None = None  # per sequence, the prompt text that `echo` puts before the completion
    echo_logprobs: list[list] | None = None  # per sequence, its prompt tokens' logprobs (`echo` with `logprobs`)

class Mailbox:
    """Hands the engine thread's events to the event loop, one wake-up per engine step.

    A wake-up per token per stream (`call_soon_threadsafe` each time) interrupts the event loop's
    thread 16 times a step at 16 streams, and each time it takes a core from one of the engine's
    OpenMP threads mid-step. Here events collect under a lock (`post`) and the engine's
    `after_step` hook (`flush`) schedules one drain for all of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, object]] = []

    def post(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))

    def flush(self) -> None:
        with self._lock:
            if not self._items:
                return
            items, self._items = self._items, []
        try:
            self.loop.call_soon_threadsafe(self._deliver, items)
        except RuntimeError:  # the event loop is gone (server stopped): nobody to tell
            pass

    @staticmethod
    def _deliver(items) -> None:
        for queue, item in items:
            queue.put_nowait(item)


class Serving:
    def __init__(self, state):
        self.state = state  # the ServerState (state.py)
        self.mailbox: Mailbox | None = None  # for the running event loop (one per server; tests start several)
        self.grammars = Grammars(state.tokenizer, state.engine.stop_ids)
        state.engine.after_step.append(self._flush)

    # ---- requests -> sequences ------------------------------------------------------------------

    def _params(self, req: P.SamplingFields, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                choice: int) -> SamplingParams:
        limit = self.state.engine.max_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt is "
                                f"{prompt_len} tokens. Please shorten it.", param="messages", code="context_length_exceeded")
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        seed = None if req.seed is None else req.seed + choice  # n choices from one seed, each different
        vocab = len(self.state.tokenizer)
        bias = tuple((int(k), float(v)) for k, v in (req.logit_bias or {}).items())
        for t, _ in bias:
            if t >= vocab:
                raise APIError(400, f"logit_bias: token id {t} is not in the vocabulary (ids 0 to {vocab - 1})",
                               param="logit_bias")
        return SamplingParams(max_tokens=max_tokens or (limit - prompt_len), temperature=temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, seed=seed, stop=req.stop_list(),
                              logprobs=logprobs, ignore_eos=req.ignore_eos,
                              frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
                              repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                              logit_bias=bias, top_k=max(0, req.top_k or 0), min_p=req.min_p or 0.0)

    async def chat_prompt(self, req: P.ChatCompletionRequest) -> list[int]:
        # Off the event loop: a 4 MB prompt takes a while to tokenise, and every stream waits meanwhile.
        return await asyncio.to_thread(self._chat_prompt, req)

    async def completion_prompts(self, req: P.CompletionRequest) -> list[list[int]]:
        return await asyncio.to_thread(self._completion_prompts, req)

    def _chat_prompt(self, req: P.ChatCompletionRequest) -> list[int]:
        from plural.data.chat import render

        tok = self.state.tokenizer
        msgs, tools = T.messages(req, tok, self.state.system_prompts.get(req.model))
        try:
            if tools:  # the template renders the tools itself
                text = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
            else:
                text = render(tok, msgs, add_generation_prompt=True)
        except Exception as e:  # the template rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the model's chat template cannot render them: {e}", param="messages") from e
        return tok(text, add_special_tokens=False)["input_ids"]

    # ---- structured output ----------------------------------------------------------------------

    @staticmethod
    def chat_grammar(req: P.ChatCompletionRequest) -> tuple[str | None, str]:
        """(the llguidance grammar the answer must follow or None, the request field it comes from)."""
        rf, answer = req.response_format, None
        if isinstance(rf, P.ResponseFormatJSONObject):
            answer = {"type": "object"}
        elif isinstance(rf, P.ResponseFormatJSONSchema):
            answer = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {"type": "object"}
        param = "tools" if req.tool_mode() != "none" else "response_format"
        try:
            if req.tool_mode() != "none":
                return T.grammar(req, answer), param
            return (json_schema_grammar(answer) if answer is not None else None), param
        except ValueError as e:  # llguidance refuses the schema's JSON itself
            raise APIError(400, f"{param}: the schema cannot be compiled: {e}", param=param) from e

    async def compile(self, grammar: str | None, param: str) -> None:
        """Compile (or find in the cache) a grammar off the event loop, within COMPILE_SECONDS; fail closed."""
        if grammar is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self.grammars.constraint, grammar), COMPILE_SECONDS)
        except asyncio.TimeoutError:
            raise APIError(400, f"{param}: the schema took longer than {COMPILE_SECONDS:g} s to compile; simplify it",
                           param=param) from None
        except GrammarError as e:
            raise APIError(400, f"{param}: the schema cannot be enforced: {e}", param=param) from None

    def _completion_prompts(self, req: P.CompletionRequest) -> list[list[int]]:
        tok = self.state.tokenizer
        if isinstance(req.prompt, str):
            prompts = [req.prompt]
        elif all(isinstance(x, int) for x in req.prompt):
            vocab = len(tok)
            if any(not 0 <= x < vocab for x in req.prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            return [list(req.prompt)]
        else:
            prompts = list(req.prompt)
        out = []
        for p in prompts:
            ids = tok(p, add_special_tokens=False)["input_ids"]
            if not ids:
                raise APIError(400, "prompt: empty prompt", param="prompt")
            out.append(ids)
        return out

    def _mailbox(self) -> "Mailbox":
        loop = asyncio.get_running_loop()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = Mailbox(loop)
        return self.mailbox

    def _flush(self) -> None:  # the engine thread's after_step hook
        box = self.mailbox
        if box is not None:
            box.flush()

    def submit(self, model: str, prompts: list[list[int]], req: P.SamplingFields, max_tokens: int | None,
               logprobs: int | None, request_id: str = "", grammar: str | None = None) -> Job:
        mailbox = self._mailbox()
        queue: asyncio.Queue = asyncio.Queue()
        adapter = self.state.engine.adapters.get(model) if model != self.state.base_id else None
        seqs = []
        for p_ids in prompts:
            for c in range(req.n):
                idx = len(seqs)
                params = self._params(req, len(p_ids), max_tokens, logprobs, c)

                def emit(ev: Event, idx=idx) -> None:
                    mailbox.post(queue, (idx, ev))

                # Compiled by `compile` just before: a cache hit, and a copy of the matcher per choice.
                constraint = self.grammars.constraint(grammar) if grammar is not None else None
                seqs.append(Sequence(model, adapter, p_ids, params, emit, request_id, constraint=constraint))
        try:
            self.state.engine.submit(seqs)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}. Retry later.", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from e
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down", headers={"Retry-After": "5"}) from e
        self.state.metrics.prompt_tokens.labels(model).inc(sum(len(p) for p in prompts))
        return Job(seqs, queue, time.monotonic(), model)

    # ---- embeddings -----------------------------------------------------------------------------

    def embedding_inputs(self, req: P.EmbeddingRequest) -> list[list[int]]:
        tok, limit = self.state.tokenizer, self.state.engine.max_len
        inp = req.input
        if isinstance(inp, str):
            items = [inp]
        elif all(isinstance(x, int) for x in inp):
            items = [list(inp)]
        else:
            items = list(inp)
        vocab, out = len(tok), []
        for k, item in enumerate(items):
            ids = tok(item, add_special_tokens=False)["input_ids"] if isinstance(item, str) else list(item)
            if not ids:
                raise APIError(400, f"input[{k}]: empty input", param="input")
            if any(not 0 <= x < vocab for x in ids):
                raise APIError(400, f"input[{k}]: token ids must be in [0, {vocab})", param="input")
            if len(ids) > limit:
                raise APIError(400, f"input[{k}]: {len(ids)} tokens; this model's maximum context length is {limit}",
                               param="input", code="context_length_exceeded")
            out.append(ids)
        return out

    async def embed(self, model: str, inputs: list[list[int]]):
        """Unit-length mean-pooled last hidden states [len(inputs), hidden] of the base or an adapter."""
        import torch

        eng = self.state.engine

        def run(slot: int):
            out = []
            for k in range(0, len(inputs), eng.runner.rows):
                part = inputs[k:k + eng.runner.rows]
                lengths = [len(x) for x in part]
                ids = torch.zeros(len(part), max(lengths), dtype=torch.long)
                for r, x in enumerate(part):
                    ids[r, :len(x)] = torch.tensor(x)
                out.append(eng.runner.embeddings(ids.to(eng.device), torch.tensor(lengths, device=eng.device),
                                                 [slot] * len(part)).cpu())
            return torch.nn.functional.normalize(torch.cat(out), dim=-1)

        return await self._on_engine(model, run)

    async def prompt_logprobs(self, model: str, prompts: list[list[int]], k: int) -> list[list[TokenLogprob | None]]:
        """Per prompt, each token's logprob under the model (and the top k there); None for the first
        token, which has nothing before it (as vLLM and OpenAI's legacy completions answer)."""
        import torch

        eng = self.state.engine

        def run(slot: int):
            out = []
            for ids in prompts:
                lp = eng.runner.prompt_logprobs(torch.tensor(ids, device=eng.device), slot)[:-1].cpu()  # [T-1, V]
                nxt = torch.tensor(ids[1:])
                chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
                top = lp.topk(k, -1) if k else None
                out.append([None] + [TokenLogprob(t, v, list(zip(top.indices[j].tolist(), top.values[j].tolist()))
                                                  if top is not None else [])
                                     for j, (t, v) in enumerate(zip(ids[1:], chosen))])
            return out

        return await self._on_engine(model, run)

    async def _on_engine(self, model: str, fn):
        """fn(adapter slot) on the engine thread between steps (it owns the model and the slots), once
        the request's adapter is resident; its slot is held while fn runs."""
        eng = self.state.engine
        adapter = eng.adapters.get(model) if model != self.state.base_id else None

        def run():
            if adapter is not None:
                if adapter.removed:
                    raise APIError(404, f"adapter {adapter.name!r} was unloaded", param="model", code="model_not_found")
                if not eng.cache.want(adapter):
                    return None  # its load has started (or waits for a slot): ask again after a step
                eng.cache.acquire(adapter)
            try:
                return fn(0 if adapter is None else adapter.slot)
            finally:
                if adapter is not None:
                    eng.cache.release(adapter)

        deadline = time.monotonic() + self.state.settings.request_timeout
        while True:
            try:
                result = await asyncio.to_thread(eng.call, run)
            except EngineStopped as e:
                raise APIError(503, str(e), type="server_error", code="shutting_down", headers={"Retry-After": "5"}) from e
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise APIError(503, "request timed out waiting for the adapter to load", type="server_error",
                               code="timeout", headers={"Retry-After": "1"})
            await asyncio.sleep(0.02)

    # ---- events -> results ----------------------------------------------------------------------

    async def events(self, job: Job) -> AsyncIterator[tuple[int, Event]]:
        """Yield (sequence index, event) until every sequence finished; cancels them on timeout or exit."""
        deadline = job.start + self.state.settings.request_timeout
        left = len(job.seqs)
        first = True
        try:
            while left:
                try:
                    if job.queue.empty():
                        idx, ev = await asyncio.wait_for(job.queue.get(), timeout=max(0.0, deadline - time.monotonic()))
                    else:  # already there: skip wait_for's per-call task (one per token per stream)
                        idx, ev = job.queue.get_nowait()
                        if time.monotonic() > deadline:
                            raise asyncio.TimeoutError
                except asyncio.TimeoutError:
                    raise APIError(503, f"request timed out after {self.state.settings.request_timeout:g} s "
                                        "(request_timeout)", type="server_error", code="timeout",
                                   headers={"Retry-After": "1"}) from None
                if first and ev.token_ids:
                    self.state.metrics.ttft.labels(job.model).observe(time.monotonic() - job.start)
                    first = False
                if ev.finish_reason:
                    left -= 1
                    if ev.error:
                        if ev.finish_reason == "cancelled":  # the server shut down
                            raise APIError(503, ev.error, type="server_error", code="shutting_down",
                                           headers={"Retry-After": "5"})
                        raise APIError(500, ev.error, type="server_error", code="internal_error")
                yield idx, ev
        finally:
            for s in job.seqs:
                s.cancel()
            self.state.metrics.latency.labels(job.model).observe(time.monotonic() - job.start)

    def token_str(self, tid: int) -> str:
        return self.state.tokenizer.decode([tid])

    def chat_logprobs(self, lps) -> P.ChoiceLogprobs:
        def one(tid, lp):
            s = self.token_str(tid)
            return P.TopLogprob(token=s, logprob=lp, bytes=list(s.encode()))

        return P.ChoiceLogprobs(content=[
            P.TokenLogprobOut(**one(lp.token_id, lp.logprob).model_dump(), top_logprobs=[one(t, v) for t, v in lp.top])
            for lp in lps if lp is not None])

    def completion_logprobs(self, lps, offset: int, first_id: int | None = None) -> P.CompletionLogprobs:
        """lps: TokenLogprob per token; None for an echoed prompt's first token, whose id is first_id."""
        tokens, values, tops, offsets = [], [], [], []
        for lp in lps:
            s = self.token_str(lp.token_id if lp is not None else first_id)
            tokens.append(s)
            values.append(lp.logprob if lp is not None else None)
            tops.append({self.token_str(t): v for t, v in lp.top} if lp is not None else None)
            offsets.append(offset)
            offset += len(s)
        return P.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)

    def choice_logprobs(self, job: Job, i: int, lps, offset: int) -> P.CompletionLogprobs:
        """A completion choice's logprobs: its echoed prompt's tokens first, if any, then the completion's
        (text offsets count from the start of the choice's text, the echoed prompt included)."""
        out = self.completion_logprobs(lps, offset)
        if job.echo_logprobs is None:
            return out
        head = self.completion_logprobs(job.echo_logprobs[i], 0, job.seqs[i].prompt_ids[0])
        return P.CompletionLogprobs(tokens=head.tokens + out.tokens, token_logprobs=head.token_logprobs + out.token_logprobs,
                                    top_logprobs=head.top_logprobs + out.top_logprobs,
                                    text_offset=head.text_offset + out.text_offset)

    async def chat(self, req: P.ChatCompletionRequest, job: Job) -> P.ChatCompletion:
        texts = [""] * len(job.seqs)
        lps: list[list] = [[] for _ in job.seqs]
        finish = ["stop"] * len(job.seqs)
        done_tokens = [0] * len(job.seqs)
        async for i, ev in self.events(job):
            texts[i] += ev.text
            lps[i].extend(ev.logprobs)
            if ev.finish_reason:
                finish[i], done_tokens[i] = ev.finish_reason, ev.completion_tokens
        mode = req.tool_mode()
        choices = []
        for i in range(len(job.seqs)):
            content, calls = T.parse(texts[i]) if mode != "none" else (texts[i], [])
            choices.append(P.ChatChoice(index=i, message=P.AssistantMessage(content=content, tool_calls=calls or None),
                                        finish_reason=_finish_reason(finish[i], bool(calls), mode),
                                        logprobs=self.chat_logprobs(lps[i]) if req.logprobs else None))
        return P.ChatCompletion(model=req.model, choices=choices, usage=self._usage(job, done_tokens))

    async def completion(self, req: P.CompletionRequest, job: Job) -> P.Completion:
        texts = [""] * len(job.seqs)
        lps: list[list] = [[] for _ in job.seqs]
        finish = ["stop"] * len(job.seqs)
        done_tokens = [0] * len(job.seqs)
        async for i, ev in self.events(job):
            texts[i] += ev.text
            lps[i].extend(ev.logprobs)
            if ev.finish_reason:
                finish[i], done_tokens[i] = ev.finish_reason, ev.completion_tokens
        start = [len(e) for e in job.echo] if req.echo else [0] * len(job.seqs)  # where each completion begins
        if req.echo:
            texts = [e + t for e, t in zip(job.echo, texts)]
        choices = [P.CompletionChoice(index=i, text=texts[i], finish_reason=finish[i],
                                      logprobs=self.choice_logprobs(job, i, lps[i], start[i])
                                      if req.logprobs is not None else None)
                   for i in range(len(job.seqs))]
        return P.Completion(model=req.model, choices=choices, usage=self._usage(job, done_tokens))

    @staticmethod
    def _usage(job: Job, completion_tokens: list[int]) -> P.Usage:
        # Each distinct prompt counts once, however many choices (n) it has.
        prompt = sum(len(p) for p in {id(s.prompt_ids): s.prompt_ids for s in job.seqs}.values())
        comp = sum(completion_tokens)
        return P.Usage(prompt_tokens=prompt, completion_tokens=comp, total_tokens=prompt + comp)

    async def stream_chat(self, req: P.ChatCompletionRequest, job: Job) -> AsyncIterator[str]:
        base = dict(id=P._id("chatcmpl"), created=int(time.time()), model=req.model)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        done_tokens = [0] * len(job.seqs)
        started = [False] * len(job.seqs)

        def chunk(choices, usage=None) -> str:
            return _sse(P.ChatCompletionChunk(**base, choices=choices, usage=usage).model_dump())

        text_chunk = content_chunk_writer(base)
        mode = req.tool_mode()
        parsers = [T.StreamParser() for _ in job.seqs] if mode != "none" else None
        n_calls = [0] * len(job.seqs)

        async for i, ev in _with_errors(self.events(job)):
            if isinstance(ev, APIError):
                job.status = ev.status
                yield _sse(ev.body())
                break
            if not started[i]:  # OpenAI opens each choice with the role
                started[i] = True
                yield chunk([P.ChunkChoice(index=i, delta=P.ChunkDelta(role="assistant", content=""))])
            lp = self.chat_logprobs(ev.logprobs) if req.logprobs and ev.logprobs else None
            if parsers is not None:  # tools offered: content and whole calls, split by the parser
                if lp:
                    yield chunk([P.ChunkChoice(index=i, delta=P.ChunkDelta(), logprobs=lp)])
                pieces = parsers[i].push(ev.text)
                if ev.finish_reason and (rest := parsers[i].finish()) and parsers[i].unfinished is None:
                    pieces.append(rest)  # (a call cut short after its start was sent stays a call)
                for piece in pieces:
                    if isinstance(piece, str):
                        yield text_chunk(i, piece)
                        continue
                    if isinstance(piece, T.CallStart):  # as OpenAI: id, type and name first, no arguments yet
                        n_calls[i] += 1
                        call = P.ChunkToolCall(index=piece.index, id=piece.id, type="function",
                                               function=P.ChunkFunction(name=piece.name, arguments=""))
                    elif isinstance(piece, T.CallArgs):  # then pieces of the arguments, by index
                        call = P.ChunkToolCall(index=piece.index, function=P.ChunkFunction(arguments=piece.text))
                    else:
                        continue  # CallEnd: nothing to send
                    yield chunk([P.ChunkChoice(index=i, delta=P.ChunkDelta(tool_calls=[call]))])
            elif lp:
                yield chunk([P.ChunkChoice(index=i, delta=P.ChunkDelta(content=ev.text), logprobs=lp)])
            elif ev.text:  # the common case, once per token per stream: no pydantic round trip
                yield text_chunk(i, ev.text)
            if ev.finish_reason:
                done_tokens[i] = ev.completion_tokens
                reason = _finish_reason(ev.finish_reason, n_calls[i] > 0, mode)
                yield chunk([P.ChunkChoice(index=i, delta=P.ChunkDelta(), finish_reason=reason)])
        if include_usage and job.status == 200:
            yield chunk([], usage=self._usage(job, done_tokens))
        yield "data: [DONE]\n\n"  # after an error event too, as vLLM does: clients wait for it

    async def stream_completion(self, req: P.CompletionRequest, job: Job) -> AsyncIterator[str]:
        base = dict(id=P._id("cmpl"), created=int(time.time()), model=req.model)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        done_tokens = [0] * len(job.seqs)
        offsets = [0] * len(job.seqs)  # of each choice's next text, from the start of its echoed prompt
        if req.echo:  # the prompt first, as its own chunk per choice (with its tokens' logprobs if asked)
            for i, text in enumerate(job.echo):
                lp = self.choice_logprobs(job, i, [], 0) if job.echo_logprobs is not None else None
                yield _sse(P.Completion(**base, choices=[P.CompletionChoice(index=i, text=text, logprobs=lp,
                                                                            finish_reason=None)]).model_dump())
                offsets[i] = len(text)
        async for i, ev in _with_errors(self.events(job)):
            if isinstance(ev, APIError):
                job.status = ev.status
                yield _sse(ev.body())
                break
            lp = self.completion_logprobs(ev.logprobs, offsets[i]) if req.logprobs is not None and ev.logprobs else None
            offsets[i] += len(ev.text)
            if ev.finish_reason:
                done_tokens[i] = ev.completion_tokens
            if ev.text or lp or ev.finish_reason:
                obj = P.Completion(**base, choices=[P.CompletionChoice(index=i, text=ev.text, logprobs=lp,
                                                                       finish_reason=ev.finish_reason)])
                yield _sse(obj.model_dump())
        if include_usage and job.status == 200:
            yield _sse(P.Completion(**base, choices=[], usage=self._usage(job, done_tokens)).model_dump())
        yield "data: [DONE]\n\n"


async def _with_errors(events):
    """Pass events through; an APIError mid-stream becomes the last item (sent as an SSE error event)."""
    try:
        async for item in events:
            yield item
    except APIError as e:
        yield -1, e


def _finish_reason(reason: str, called: bool, mode: str) -> str:
    # OpenAI answers "tool_calls" when the model chose to call, and "stop" when tool_choice named
    # the function (the call was forced); "length" stays "length".
    return "tool_calls" if called and reason == "stop" and mode != "named" else reason


def content_chunk_writer(base: dict):
    """(choice index, text) -> the SSE line of a content-only `chat.completion.chunk`, the same JSON
    as `P.ChatCompletionChunk(**base, choices=[ChunkChoice(index, ChunkDelta(content=text))])`."""
    head = json.dumps(P.ChatCompletionChunk(**base, choices=[]).model_dump(exclude={"choices", "usage"}),
                      ensure_ascii=False)[:-1]

    def write(index: int, text: str) -> str:
        return (f'data: {head}, "choices": [{{"index": {index}, "delta": {{"content": '
                f'{json.dumps(text, ensure_ascii=False)}}}, "logprobs": null, "finish_reason": null}}]}}\n\n')

    return write


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
