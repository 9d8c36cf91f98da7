"""The resident adapters: a byte-bounded LRU of LoRA slots, as a small state machine.

    ABSENT ──want()──▶ LOADING ──load done──▶ RESIDENT ──evicted (idle, LRU)──▶ ABSENT
       ▲                  │ load failed           │ remove() while in use or loading
       └──────────────────┘                       ▼
                                              EVICTING ──last user gone / load done──▶ (gone)

- `want(a)` (engine thread, when a waiting sequence needs `a`): ABSENT → LOADING if a slot can
  be had within `max_loras` and `cache_bytes`, evicting RESIDENT adapters that no running
  sequence uses, least recently used first; the weights are read on the loader thread, so the
  running batch keeps decoding. With every resident adapter busy it stays ABSENT: asked again
  after sequences finish.
- `poll()` (engine thread, each step): finished reads become RESIDENT (written into their slot);
  failed ones go back to ABSENT and are returned, so the engine fails only their waiting sequences.
- `acquire` / `release`: a running sequence holds its adapter RESIDENT (never evicted under it).
- `remove(a)` (admin unload): gone at once if idle; else EVICTING until its last sequence ends or
  its read completes, then its slot is freed.

Slot 0 is "no adapter"; slots 1..max_loras hold adapters. The `runner` provides read_adapter
(loader thread), write_slot and clear_slot (engine thread).
"""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


class State(enum.Enum):
    ABSENT = "absent"
    LOADING = "loading"
    RESIDENT = "resident"
    EVICTING = "evicting"


@dataclass(eq=False)
class Adapter:
    """A registered adapter: what registration checked, and its place in the cache."""

    name: str
    path: Path
    rank: int
    scale: float
    nbytes: int
    weights: Path | None = None  # the weights file, resolved at registration (default: path / adapter_model.safetensors)
    sha256: str = ""  # of the weights file as checked at registration; a load refuses other bytes
    removed: bool = False  # unloaded by the admin API: never loaded again
    state: State = State.ABSENT
    slot: int | None = None
    users: int = 0  # running sequences
    last_used: float = 0.0
    loading: Future | None = field(default=None, repr=False)

    def weights_file(self) -> Path:
        from plural.store.adapters import WEIGHTS

        return self.weights or self.path / WEIGHTS

    @property
    def resident(self) -> bool:
        return self.state is State.RESIDENT


class AdapterCache:
    def __init__(self, runner, max_loras: int, cache_bytes: int, on_loaded=None):
        self.runner = runner
        self.cache_bytes = cache_bytes
        self.free_slots = list(range(1, max_loras + 1))
        self.held: list[Adapter] = []  # adapters holding a slot: LOADING, RESIDENT, EVICTING
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plural-adapter-loader")
        self.on_loaded = on_loaded  # called with the adapter when a load lands in its slot (metrics)

    # ---- queries ----------------------------------------------------------------------------------

    def loading(self) -> bool:
        return any(a.state is State.LOADING or (a.state is State.EVICTING and a.loading) for a in self.held)

    def load_finished(self) -> bool:
        """Some read completed since the last poll (the engine wakes up for it)."""
        return any(a.loading is not None and a.loading.done() for a in self.held)

    def used_bytes(self) -> int:
        return sum(a.nbytes for a in self.held)

    # ---- transitions (engine thread) ------------------------------------------------------------

    def want(self, a: Adapter) -> bool:
        """True if `a` is resident; else start its load when a slot can be had."""
        if a.state is State.RESIDENT:
            return True
        if a.state is not State.ABSENT:
            return False
        victims = sorted((b for b in self.held if b.state is State.RESIDENT and b.users == 0), key=lambda b: b.last_used)
        used = self.used_bytes()
        while victims and (not self.free_slots or used + a.nbytes > self.cache_bytes):
            v = victims.pop(0)
            used -= v.nbytes
            self._free(v)
        if not self.free_slots or used + a.nbytes > self.cache_bytes:
            return False  # everything resident is busy: asked again after some sequences finish
        a.slot = self.free_slots.pop()
        a.state = State.LOADING
        a.loading = self.loader.submit(self.runner.read_adapter, a.weights_file(), a.rank, a.scale, a.sha256)
        self.held.append(a)
        return False

    def poll(self) -> list[tuple[Adapter, BaseException]]:
        """Land finished reads; return the adapters whose read failed, with the error."""
        failed = []
        for a in [a for a in self.held if a.loading is not None and a.loading.done()]:
            fut, a.loading = a.loading, None
            if a.state is State.EVICTING:  # unloaded while its weights were being read
                self._free(a, write=False)
                continue
            err = fut.exception()
            if err is not None:
                self._free(a, write=False)
                failed.append((a, err))
                continue
            self.runner.write_slot(a.slot, fut.result())
            a.state = State.RESIDENT
            if self.on_loaded:
                self.on_loaded(a)
        return failed

    def acquire(self, a: Adapter) -> None:
        a.users += 1
        a.last_used = time.monotonic()

    def release(self, a: Adapter) -> None:
        a.users -= 1
        a.last_used = time.monotonic()
        if a.state is State.EVICTING and a.users == 0 and a.loading is None:
            self._free(a)

    def remove(self, a: Adapter) -> None:
        if a.state is State.ABSENT:
            return
        if a.state is State.RESIDENT and a.users == 0:
            self._free(a)
        else:
            a.state = State.EVICTING

    def _free(self, a: Adapter, write: bool = True) -> None:
        if write:
            self.runner.clear_slot(a.slot)
        self.free_slots.append(a.slot)
        self.held.remove(a)
        a.slot, a.state = None, State.ABSENT

    def shutdown(self) -> None:
        self.loader.shutdown(wait=False, cancel_futures=True)
