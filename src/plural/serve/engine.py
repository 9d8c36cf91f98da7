"""The engine: one background thread owns the model and runs continuous batching over many adapters.

Loop (one iteration = at most one prefill forward + one decode forward):

1. take new sequences from the inbox, drop cancelled ones (client gone, timeout);
2. admit waiting sequences into free KV rows, in arrival order, when their adapter is resident.
   A non-resident adapter is read from disk on a loader thread; the sequences that need it wait
   while everyone else keeps decoding ("loading never stalls running requests");
3. prefill the admitted prompts together (one forward, right-padded) and sample their first token;
4. decode one token for every running sequence in one forward: rows of different adapters share
   the base matmuls, each adds its own LoRA delta (`lora.py`); finished sequences free their row.

Caches are keyed by adapter identity: a KV row belongs to one sequence (and so one adapter) from
prefill to finish, and there is no cross-request prefix cache to leak between adapters.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from plural.errors import PluralError
from plural.serve.detok import TextStream
from plural.serve.llama import LlamaRunner
from plural.serve.lora import AdapterWeights, LoraSlots, read_adapter
from plural.serve.sampler import SamplingParams, make_generator, sample

log = logging.getLogger("plural.serve")


class QueueFull(Exception):
    """More sequences wait than `max_queue` allows (answered 429)."""


class EngineStopped(Exception):
    """The engine is shutting down (answered 503)."""


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
    error: str | None = None
    completion_tokens: int = 0


@dataclass
class Adapter:
    """A registered adapter. `slot` is set while its weights are resident in the LoRA stacks."""

    name: str
    path: Path
    rank: int
    scale: float
    nbytes: int
    weights: Path | None = None  # the weights file, resolved at registration (default: path / adapter_model.safetensors)
    sha256: str = ""  # of the weights file as checked at registration; a load refuses other bytes
    slot: int | None = None
    loading: Future | None = None
    users: int = 0  # running or admitted sequences
    last_used: float = 0.0
    removed: bool = False

    def weights_file(self) -> Path:
        from plural.store.adapters import WEIGHTS

        return self.weights or self.path / WEIGHTS


class Sequence:
    _ids = itertools.count()

    def __init__(self, model_id: str, adapter: Adapter | None, prompt_ids: list[int], params: SamplingParams,
                 emit: Callable[[Event], None], request_id: str = ""):
        self.id = next(self._ids)
        self.model_id, self.adapter, self.prompt_ids, self.params, self.emit = model_id, adapter, prompt_ids, params, emit
        self.request_id = request_id  # the HTTP request's id, for the server log
        self.out_ids: list[int] = []
        self.stream: TextStream | None = None  # made on the engine thread at the first token
        self.row: int | None = None
        self.cancelled = False
        self.done = False
        self.generator = make_generator(params.seed)

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, hf_model, tokenizer, *, max_batch: int, max_len: int, max_queue: int, max_loras: int,
                 max_lora_rank: int, cache_bytes: int, dtype: torch.dtype, device: torch.device,
                 threads: int | None = None, metrics=None, quantize: str = "none"):
        self.tok = tokenizer
        self.device = device
        self.max_len, self.max_queue, self.cache_bytes = max_len, max_queue, cache_bytes
        self.runner = LlamaRunner(hf_model, rows=max_batch, max_len=max_len, dtype=dtype, device=device, quantize=quantize)
        self.slots = LoraSlots(hf_model.config, max_loras, max_lora_rank, dtype, device)
        self.dtype = dtype
        self.threads = threads
        self.metrics = metrics
        self.stop_ids = _stop_token_ids(hf_model, tokenizer)
        self.adapters: dict[str, Adapter] = {}  # model id -> adapter; changed on the engine thread only
        self.free_rows = list(range(max_batch))
        self.free_slots = list(range(1, max_loras + 1))
        self.rows: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.inbox: deque[Sequence] = deque()
        self.commands: deque[tuple[Callable[[], object], Future]] = deque()
        self.cv = threading.Condition()
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plural-adapter-loader")
        self.loading: list[Adapter] = []
        self._lora_key: tuple[int, ...] | None = None
        # Called on the engine thread after every iteration (a step, an error, shutdown): lets a
        # consumer batch the events of one step into one hand-over (see serving.Mailbox).
        self.after_step: list[Callable[[], None]] = []
        self._lora: dict = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="plural-engine", daemon=True)
        self.steps = 0

    # ---- called from the server's threads -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        with self.cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) + len(self.inbox) + len(seqs) > self.max_queue + self.n_free_rows():
                raise QueueFull(f"{len(self.waiting) + len(self.inbox)} requests are waiting (max_queue {self.max_queue})")
            self.inbox.extend(seqs)
            self.cv.notify()

    def n_free_rows(self) -> int:
        return len(self.free_rows)

    def queue_depth(self) -> int:
        return len(self.waiting) + len(self.inbox)

    def running(self) -> int:
        return sum(s is not None for s in self.rows)

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the engine thread between steps (admin changes to adapters) and return its result."""
        fut: Future = Future()
        with self.cv:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            self.commands.append((fn, fut))
            self.cv.notify()
        return fut.result()

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop admitting; let running sequences finish for up to `drain_seconds`, then cancel the rest."""
        with self.cv:
            self._stopping = True
            self.cv.notify()
        deadline = time.monotonic() + drain_seconds
        while time.monotonic() < deadline and (self.running() or self.queue_depth()):
            time.sleep(0.05)
        with self.cv:
            self._halt = True
            self.cv.notify()
        self._thread.join(timeout=30)
        self.loader.shutdown(wait=False, cancel_futures=True)

    _halt = False

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self.cv:
                while not (self.inbox or self.commands or self._halt or self.running()
                           or (self.waiting and not self.loading)):
                    # Sequences waiting only for an adapter load: wake up to check it.
                    self.cv.wait(timeout=0.01 if self.loading else None)
                    if self.loading and any(a.loading.done() for a in self.loading):
                        break
                if self._halt:
                    break
                self.waiting.extend(self.inbox)
                self.inbox.clear()
                commands = list(self.commands)
                self.commands.clear()
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
                running = [s for s in self.rows if s is not None]
                log.exception("engine step failed; failing %d running sequence(s): %s", len(running),
                              ", ".join(sorted({s.request_id for s in running})))
                for s in running:
                    self._fail(s)
            self._after_step()
        for s in [s for s in self.rows if s is not None] + list(self.waiting) + list(self.inbox):
            self._finish(s, "cancelled", error="the server shut down before this request finished")
        self._after_step()

    def _after_step(self) -> None:
        for fn in self.after_step:
            fn()

    def _step(self) -> None:
        self._finish_loads()
        for s in [s for s in self.rows if s is not None and s.cancelled]:
            self._finish(s, "cancelled")
        if any(s.cancelled for s in self.waiting):
            for s in [s for s in self.waiting if s.cancelled]:
                s.done = True
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        admitted = self._admit()
        if self.metrics:
            self.metrics.queue_depth.set(self.queue_depth())
        if admitted:
            self._prefill(admitted)
        if self.running():
            self._decode()
        if self.metrics:
            self.metrics.running.set(self.running())

    def _admit(self) -> list[Sequence]:
        admitted, keep = [], deque()
        while self.waiting:
            s = self.waiting.popleft()
            if not self.free_rows or not self._adapter_ready(s.adapter):
                keep.append(s)
                continue
            s.row = heapq.heappop(self.free_rows)
            self.rows[s.row] = s
            if s.adapter is not None:
                s.adapter.users += 1
                s.adapter.last_used = time.monotonic()
            admitted.append(s)
        self.waiting = keep
        return admitted

    def _adapter_ready(self, a: Adapter | None) -> bool:
        if a is None or a.slot is not None and a.loading is None:
            return True
        if a.loading is None and not a.removed:
            self._start_load(a)
        return False

    def _start_load(self, a: Adapter) -> None:
        """Reserve a slot (evicting least-recently-used idle adapters) and read the weights off-thread."""
        resident = [b for b in self._resident() if b is not a]
        used = sum(b.nbytes for b in resident)
        for victim in sorted((b for b in resident if b.users == 0 and b.loading is None), key=lambda b: b.last_used):
            if self.free_slots and used + a.nbytes <= self.cache_bytes:
                break
            self._evict(victim)
            used -= victim.nbytes
        if not self.free_slots or used + a.nbytes > self.cache_bytes:
            return  # everything resident is busy: try again after some sequences finish
        a.slot = self.free_slots.pop()
        a.loading = self.loader.submit(read_adapter, a.weights_file(), a.rank, a.scale, self.dtype, a.sha256)
        self.loading.append(a)

    def _resident(self) -> list[Adapter]:
        return [a for a in self.adapters.values() if a.slot is not None]

    def _evict(self, a: Adapter) -> None:
        self.slots.clear(a.slot)
        self.free_slots.append(a.slot)
        a.slot = None
        self._lora_key = None

    def _finish_loads(self) -> None:
        for a in [a for a in self.loading if a.loading.done()]:
            self.loading.remove(a)
            fut, a.loading = a.loading, None
            if a.removed:  # unloaded while its weights were being read
                self.free_slots.append(a.slot)
                a.slot = None
                continue
            try:
                w: AdapterWeights = fut.result()
            except Exception as e:
                self.free_slots.append(a.slot)
                a.slot = None
                waiting = [s for s in self.waiting if s.adapter is a]
                # The detail (a path, the library's message) is for the operator's log only.
                log.error("adapter %r could not be loaded from %s: %s (requests %s)", a.name, a.path, e,
                          ", ".join(sorted({s.request_id for s in waiting})), exc_info=not isinstance(e, PluralError))
                for s in waiting:
                    self._finish(s, "error", error=f"adapter {a.name!r} could not be loaded (request id {s.request_id})")
                self.waiting = deque(s for s in self.waiting if s.adapter is not a)
                continue
            self.slots.write(a.slot, w)
            self._lora_key = None
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
        for s in [s for s in self.waiting if s.adapter is a]:
            self._finish(s, "error", error=f"adapter {a.name!r} was unloaded")
        self.waiting = deque(s for s in self.waiting if s.adapter is not a)
        if a.users == 0 and a.slot is not None and a.loading is None:
            self._evict(a)
        return a

    def _prefill(self, seqs: list[Sequence]) -> None:
        lengths = [len(s.prompt_ids) for s in seqs]
        T = max(lengths)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(s.prompt_ids)
        slots = [0 if s.adapter is None else s.adapter.slot for s in seqs]
        lora = self.slots.gather(slots, self.device)
        logits = self.runner.prefill(ids.to(self.device), torch.tensor(lengths, device=self.device),
                                     torch.tensor([s.row for s in seqs], device=self.device), lora)
        self._sample_and_emit(seqs, logits.cpu())

    def _decode(self) -> None:
        n = max(i for i, s in enumerate(self.rows) if s is not None) + 1
        seqs = self.rows[:n]
        key = tuple(0 if s is None or s.adapter is None else s.adapter.slot for s in seqs)
        if key != self._lora_key:
            self._lora, self._lora_key = self.slots.gather(list(key), self.device), key
        tokens = torch.tensor([s.out_ids[-1] if s else 0 for s in seqs], device=self.device)
        pos = torch.tensor([len(s.prompt_ids) + len(s.out_ids) - 1 if s else 0 for s in seqs], device=self.device)
        logits = self.runner.decode(tokens, pos, self._lora)
        self.steps += 1
        if self.metrics:
            self.metrics.batch_size.observe(sum(s is not None for s in seqs))
        live = [(i, s) for i, s in enumerate(seqs) if s is not None]
        self._sample_and_emit([s for _, s in live], logits[[i for i, _ in live]].cpu())

    def _sample_and_emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """logits [n, V] fp32 on CPU, one row per sequence. Whatever goes wrong for one sequence
        (its sampling, detokenisation, stop strings) fails that sequence alone (issue 11)."""
        tokens, errors = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        want_lp = [s.params.logprobs is not None for s in seqs]
        logp = torch.log_softmax(logits, -1) if any(want_lp) else None
        for i, s in enumerate(seqs):
            if errors[i] is not None:
                log.error("request %s (model %s): %s", s.request_id, s.model_id, errors[i])
                self._fail(s, errors[i])
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
            self.rows[s.row] = None
            heapq.heappush(self.free_rows, s.row)
            s.row = None
            if s.adapter is not None:
                s.adapter.users -= 1
                if s.adapter.removed and s.adapter.users == 0 and s.adapter.slot is not None:
                    self._evict(s.adapter)
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
