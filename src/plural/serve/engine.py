"""The engine: one background thread owns the model and runs continuous batching over many adapters.

Loop (one iteration = at most one prefill forward + one decode forward):

1. take new sequences from the inbox, drop cancelled ones (client gone, timeout);
2. admit waiting sequences into free KV rows, in arrival order, when their adapter is resident
   (`scheduler.py`). A non-resident adapter is read from disk on a loader thread
   (`adapter_cache.py`); the sequences that need it wait while everyone else keeps decoding
   ("loading never stalls running requests");
3. prefill the admitted prompts together (one forward, right-padded) and sample their first token;
4. decode one token for every running sequence in one forward: rows of different adapters share
   the base matmuls, each adds its own LoRA delta; finished sequences free their row.

The forward is the runner's (`runner.py`: fused for the Llama-like families, generic otherwise),
the next token the sampler's (`sampler.py`), the text the detokeniser's (`detok.py`). Whatever
goes wrong while serving one sequence fails that sequence alone (issue 11).

Caches are keyed by adapter identity: a KV row belongs to one sequence (and so one adapter) from
prefill to finish, and there is no cross-request prefix cache to leak between adapters.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from collections import deque
from typing import Callable

import torch

from plural.errors import PluralError
from plural.serve.adapter_cache import Adapter, AdapterCache, State
from plural.serve.detok import TextStream
from plural.serve.grammar import mask_logits
from plural.serve.runner import make_runner
from plural.serve.sampler import SamplingParams, needs_controls, sample
from plural.serve.scheduler import EngineStopped, QueueFull, Scheduler
from plural.serve.sequence import Event, Sequence, TokenLogprob

__all__ = ["Adapter", "Engine", "EngineStopped", "Event", "QueueFull", "SamplingParams", "Sequence", "State"]

log = logging.getLogger("plural.serve")


class Engine:
    def __init__(self, hf_model, tokenizer, *, max_batch: int, max_len: int, max_queue: int, max_loras: int,
                 max_lora_rank: int, cache_bytes: int, dtype: torch.dtype, device: torch.device,
                 threads: int | None = None, metrics=None, quantize: str = "none", runner: str = "auto",
                 max_prefill_tokens: int = 0):
        self.tok = tokenizer
        self.device = device
        self.max_len, self.max_queue, self.cache_bytes = max_len, max_queue, cache_bytes
        self.stop_ids = _stop_token_ids(hf_model, tokenizer)
        self.runner = make_runner(hf_model, rows=max_batch, max_len=max_len, dtype=dtype, device=device,
                                  quantize=quantize, max_loras=max_loras, max_lora_rank=max_lora_rank, runner=runner)
        self.dtype = dtype
        self.threads = threads
        self.metrics = metrics
        self.sched = Scheduler(max_batch, max_queue, max_prefill_tokens or None)
        self.cache = AdapterCache(self.runner, max_loras, cache_bytes, on_loaded=self._loaded)
        self.adapters: dict[str, Adapter] = {}  # model id -> adapter; changed on the engine thread only
        self.commands: deque[tuple[Callable[[], object], Future]] = deque()
        self.cv = threading.Condition()
        # Called on the engine thread after every iteration (a step, an error, shutdown): lets a
        # consumer batch the events of one step into one hand-over (see serving.Mailbox).
        self.after_step: list[Callable[[], None]] = []
        self._halt = False
        self._thread = threading.Thread(target=self._run, name="plural-engine", daemon=True)
        self.steps = 0

    # ---- called from the server's threads -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        self.sched.submit(seqs)
        with self.cv:
            self.cv.notify()

    def queue_depth(self) -> int:
        return self.sched.queue_depth()

    def running(self) -> int:
        return self.sched.running()

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the engine thread between steps (admin changes to adapters) and return its result."""
        fut: Future = Future()
        with self.cv:
            if self.sched.stopping:
                raise EngineStopped("the server is shutting down")
            self.commands.append((fn, fut))
            self.cv.notify()
        return fut.result()

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop admitting; let running and queued sequences finish for up to `drain_seconds`, then cancel the rest."""
        with self.sched.lock:
            self.sched.stopping = True
        with self.cv:
            self.cv.notify()
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and (self.running() or self.queue_depth()) and self._thread.is_alive():
            time.sleep(0.02)
        with self.cv:
            self._halt = True
            self.cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.cache.shutdown()

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self.cv:
                while not (self.sched.inbox or self.commands or self._halt or self.running()
                           or (self.sched.waiting and not self.cache.loading())):
                    # Sequences waiting only for an adapter load: wake up to check it.
                    self.cv.wait(timeout=0.01 if self.cache.loading() else None)
                    if self.cache.load_finished():
                        break
                if self._halt:
                    break
                commands = list(self.commands)
                self.commands.clear()
            self.sched.take_inbox()
            for fn, fut in commands:
                try:
                    fut.set_result(fn())
                except Exception as e:  # reported to the caller (admin API)
                    fut.set_exception(e)
            try:
                self._step()
            except Exception:
                # A failure of the batch itself (a forward pass), not of one sequence (those are
                # caught per sequence): fail the running rows, keep the waiting ones and serve on.
                running = [s for s in self.sched.rows if s is not None]
                log.exception("engine step failed; failing %d running sequence(s): %s", len(running),
                              ", ".join(sorted({s.request_id for s in running})))
                for s in running:
                    self._fail(s)
            self._after_step()
        for s in self.sched.everyone():
            self._finish(s, "cancelled", error="the server shut down before this request finished")
        self._after_step()

    def _after_step(self) -> None:
        for fn in self.after_step:
            fn()

    def _step(self) -> None:
        for a, err in self.cache.poll():
            waiting = self.sched.remove_waiting(lambda s: s.adapter is a)
            # The detail (a path, the library's message) is for the operator's log only.
            log.error("adapter %r could not be loaded from %s: %s (requests %s)", a.name, a.path, err,
                      ", ".join(sorted({s.request_id for s in waiting})),
                      exc_info=None if isinstance(err, PluralError) else err)
            for s in waiting:
                self._finish(s, "error", error=f"adapter {a.name!r} could not be loaded (request id {s.request_id})")
        running, waiting = self.sched.drop_cancelled()
        for s in running + waiting:
            self._finish(s, "cancelled")
        # Submitted while the admin API unloaded their adapter.
        for s in self.sched.remove_waiting(lambda s: s.adapter is not None and s.adapter.removed):
            self._finish(s, "error", error=f"adapter {s.adapter.name!r} was unloaded")
        admitted = self.sched.admit(self._ready)
        if self.metrics:
            self.metrics.queue_depth.set(self.queue_depth())
        if admitted:
            self._prefill(admitted)
        if self.running():
            self._decode()
        if self.metrics:
            self.metrics.running.set(self.running())

    def _ready(self, s: Sequence) -> bool:
        """Admission test: the sequence's adapter is resident. It is held at once, so loading the
        next one in the same admission round cannot evict it."""
        if s.adapter is None:
            return True
        if not self.cache.want(s.adapter):
            return False
        self.cache.acquire(s.adapter)
        return True

    def _loaded(self, a: Adapter) -> None:
        if self.metrics:
            self.metrics.adapter_loads.labels(a.name).inc()

    def add_adapter(self, a: Adapter) -> None:
        """Engine thread (or before start): serve `a` under its name, replacing an adapter of that name."""
        if a.name in self.adapters:
            self.remove_adapter(a.name)
        self.adapters[a.name] = a

    def remove_adapter(self, name: str) -> Adapter:
        """Engine thread: forget an adapter; its running sequences finish, its waiting ones fail."""
        a = self.adapters.pop(name)
        a.removed = True
        for s in self.sched.remove_waiting(lambda s: s.adapter is a):
            self._finish(s, "error", error=f"adapter {a.name!r} was unloaded")
        self.cache.remove(a)
        return a

    @staticmethod
    def _slot(s: Sequence | None) -> int:
        return 0 if s is None or s.adapter is None else s.adapter.slot

    def _prefill(self, seqs: list[Sequence]) -> None:
        lengths = [len(s.prompt_ids) for s in seqs]
        ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(s.prompt_ids)
        logits = self.runner.prefill(ids.to(self.device), torch.tensor(lengths, device=self.device),
                                     torch.tensor([s.row for s in seqs], device=self.device), [self._slot(s) for s in seqs])
        self._sample_and_emit(seqs, logits.cpu())

    def _decode(self) -> None:
        seqs = self.sched.rows[:self.sched.span()]
        tokens = torch.tensor([s.out_ids[-1] if s else 0 for s in seqs], device=self.device)
        pos = torch.tensor([s.position if s else 0 for s in seqs], device=self.device)
        logits = self.runner.decode(tokens, pos, [self._slot(s) for s in seqs])
        self.steps += 1
        if self.metrics:
            self.metrics.batch_size.observe(sum(s is not None for s in seqs))
        live = [(i, s) for i, s in enumerate(seqs) if s is not None]
        self._sample_and_emit([s for _, s in live], logits[[i for i, _ in live]].cpu())

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """logits [n, V] fp32 on CPU, one row per sequence. Whatever goes wrong for one sequence
        (its grammar, sampling, detokenisation, stop strings) fails that sequence alone (issue 11)."""
        params = [s.params for s in seqs]
        want_lp = [p.logprobs is not None for p in params]
        constrained = [i for i, s in enumerate(seqs) if s.constraint is not None]
        raw = logits  # logprobs are the model's own distribution, before masks and penalties (as vLLM's default)
        # Masks and penalties work in place: on a copy when logprobs need the raw logits, or when
        # the runner's output is an inference-mode tensor (which refuses in-place updates).
        if (constrained or any(needs_controls(p) for p in params)) and (any(want_lp) or logits.is_inference()):
            logits = logits.clone()
        bad: dict[int, str] = {}
        if constrained:
            try:
                masked = mask_logits(logits, constrained, [seqs[i].constraint for i in constrained])
            except Exception as e:  # llguidance itself failed: the constrained rows fail, the rest go on
                log.exception("grammar masks failed for %d sequence(s)", len(constrained))
                masked = [f"the output grammar failed ({type(e).__name__})"] * len(constrained)
            bad = {i: e for i, e in zip(constrained, masked) if e is not None}
        tokens, errors = sample(logits, params, [s.generator for s in seqs], [s.prompt_ids for s in seqs],
                                [s.out_ids for s in seqs])
        logp = torch.log_softmax(raw, -1) if any(want_lp) else None
        for i, s in enumerate(seqs):
            error = bad.get(i) or errors[i]
            if error is not None:
                log.error("request %s (model %s): %s", s.request_id, s.model_id, error)
                self._fail(s, error)
                continue
            try:
                lp = None
                if want_lp[i]:
                    top = []
                    if s.params.logprobs:
                        v, ix = logp[i].topk(s.params.logprobs)
                        top = list(zip(ix.tolist(), v.tolist()))
                    lp = TokenLogprob(tokens[i], float(logp[i, tokens[i]]), top)
                self._append(s, tokens[i], lp)
            except Exception:
                log.exception("request %s (model %s): failed after %d tokens", s.request_id, s.model_id, len(s.out_ids))
                self._fail(s)

    def _append(self, s: Sequence, tok: int, lp: TokenLogprob | None) -> None:
        if s.constraint is not None:
            rejected = s.constraint.consume(tok)
            if rejected:
                log.error("request %s (model %s): %s", s.request_id, s.model_id, rejected)
                self._fail(s, "the output grammar rejected a token")
                return
        if tok in self.stop_ids and not s.params.ignore_eos:
            self._finish(s, "stop")
            return
        s.out_ids.append(tok)
        if s.stream is None:
            s.stream = TextStream(self.tok, s.params.stop)
        text = s.stream.push(tok)
        finish = "stop" if s.stream.stopped else None
        if finish is None and (len(s.out_ids) >= s.params.max_tokens or len(s.prompt_ids) + len(s.out_ids) >= self.max_len):
            finish = "length"
        # The grammar is complete and allows nothing but the end: stop now rather than spend a
        # step on sampling the forced end-of-turn token.
        if finish is None and s.constraint is not None and s.constraint.matcher.is_stopped():
            finish = "stop"
        if finish is None:
            s.emit(Event(text=text, token_ids=[tok], logprobs=[lp] if lp else [], completion_tokens=len(s.out_ids)))
        else:
            self._finish(s, finish, last=(tok, lp), text=text)

    def _fail(self, s: Sequence, why: str = "") -> None:
        """Fail one sequence with a message that carries no internals, only the request id to look up in the log."""
        what = f"{why}; " if why else ""
        self._finish(s, "error", error=f"the server could not finish this request ({what}request id {s.request_id})")

    def _finish(self, s: Sequence, reason: str, error: str | None = None, last=None, text: str = "") -> None:
        if s.done:
            return
        s.done = True
        if self.metrics:  # here, not where the client reads: a cancelled stream's tokens count too
            self.metrics.generation_tokens.labels(s.model_id).inc(len(s.out_ids))
        if s.row is not None:
            if reason == "error":
                self.runner.clear_row(s.row)
            self.sched.release(s)
            if s.adapter is not None:
                self.cache.release(s.adapter)
        ev = Event(finish_reason=reason, error=error, completion_tokens=len(s.out_ids))
        if last is not None:
            ev.token_ids = [last[0]]
            ev.logprobs = [last[1]] if last[1] else []
        if reason in ("stop", "length") and error is None:
            ev.text = text + (s.stream.rest() if s.stream is not None else "")
        s.emit(ev)


def _stop_token_ids(model, tok) -> set[int]:
    """EOS of the tokenizer and of the generation config (the chat template's end-of-turn token)."""
    ids = set()
    gc = getattr(model, "generation_config", None)
    for v in (getattr(gc, "eos_token_id", None), tok.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif v:
            ids.update(v)
    if not ids:
        raise PluralError("the model has no end-of-sequence token; the server could not stop generations")
    return ids
