"""The scheduler and the adapter cache on their own: no model, no tokenizer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from plural.serve.adapter_cache import Adapter, AdapterCache, State
from plural.serve.sampler import SamplingParams
from plural.serve.scheduler import EngineStopped, QueueFull, Scheduler
from plural.serve.sequence import Sequence


def seq(adapter=None, prompt=3):
    return Sequence("m", adapter, list(range(1, prompt + 1)), SamplingParams(max_tokens=4), lambda ev: None)


def test_rows_are_handed_out_lowest_first_and_reused():
    s = Scheduler(rows=3, max_queue=2)
    a, b, c, d = seq(), seq(), seq(), seq()
    s.submit([a, b, c, d])
    s.take_inbox()
    assert s.admit(lambda x: True) == [a, b, c] and [x.row for x in (a, b, c)] == [0, 1, 2]
    assert s.queue_depth() == 1 and s.running() == 3 and s.span() == 3
    s.release(b)
    assert b.row is None and s.span() == 3
    assert s.admit(lambda x: True) == [d] and d.row == 1  # the freed row, not a new one
    s.release(c)
    assert s.span() == 2  # decode runs over rows 0..1 only


def test_admission_keeps_arrival_order_and_skips_the_unready():
    s = Scheduler(rows=2, max_queue=8)
    blocked, x, y, z = seq("A"), seq(), seq(), seq()
    s.submit([blocked, x, y, z])
    s.take_inbox()
    asked = []
    got = s.admit(lambda q: asked.append(q) or q.adapter is None)
    assert got == [x, y] and list(s.waiting) == [blocked, z]
    assert z not in asked  # no row was free for it: its adapter was never asked for


def test_prefill_token_budget_admits_a_burst_in_groups_in_arrival_order():
    s = Scheduler(rows=8, max_queue=8, prefill_tokens=10)
    a, b, c, d, e = seq(prompt=4), seq(prompt=5), seq(prompt=3), seq(prompt=1), seq(prompt=12)
    s.submit([a, b, c, d, e])
    s.take_inbox()
    asked = []
    assert s.admit(lambda q: asked.append(q) or True) == [a, b]  # 9 tokens; c (3 more) would pass 10
    assert asked == [a, b]  # nothing past the budget holds an adapter
    assert list(s.waiting) == [c, d, e]  # d (1 token) would fit, but does not overtake c
    assert s.admit(lambda q: True) == [c, d]
    assert s.admit(lambda q: True) == [e]  # longer than the whole budget: prefilled alone
    unbounded = Scheduler(rows=8, max_queue=8)
    unbounded.submit([seq(prompt=50) for _ in range(5)])
    unbounded.take_inbox()
    assert len(unbounded.admit(lambda q: True)) == 5


def test_queue_full_and_stopping_refuse_the_whole_request():
    s = Scheduler(rows=1, max_queue=1)
    s.submit([seq(), seq()])  # one row + one queue place
    with pytest.raises(QueueFull):
        s.submit([seq()])
    assert s.queue_depth() == 2
    s.stopping = True
    with pytest.raises(EngineStopped):
        s.submit([seq()])


def test_cancelled_sequences_leave_the_queue():
    s = Scheduler(rows=1, max_queue=4)
    r, w1, w2 = seq(), seq(), seq()
    s.submit([r, w1, w2])
    s.take_inbox()
    s.admit(lambda q: True)
    r.cancel(), w1.cancel()
    running, waiting = s.drop_cancelled()
    assert running == [r] and waiting == [w1] and list(s.waiting) == [w2]


class FakeRunner:
    """read_adapter / write_slot / clear_slot, recorded; a read can be held back or made to fail."""

    def __init__(self):
        self.slots: dict[int, str] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.fail: set[str] = set()

    def read_adapter(self, weights: Path, rank, scale, sha256=""):
        self.gate.wait(10)
        if weights.name in self.fail:
            raise OSError("disk says no")
        return weights.name

    def write_slot(self, slot, w):
        self.slots[slot] = w

    def clear_slot(self, slot):
        self.slots.pop(slot, None)


def adapter(name, nbytes=100):
    return Adapter(name=name, path=Path("/x"), rank=4, scale=1.0, nbytes=nbytes, weights=Path(name))


def settle(cache):
    deadline = time.monotonic() + 10
    while cache.loading() and not cache.load_finished() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cache.poll()


def test_load_evict_lru_and_busy_adapters_stay():
    r = FakeRunner()
    cache = AdapterCache(r, max_loras=2, cache_bytes=1000)
    a, b, c = adapter("a"), adapter("b"), adapter("c")
    assert cache.want(a) is False and a.state is State.LOADING
    assert settle(cache) == [] and a.state is State.RESIDENT and r.slots[a.slot] == "a"
    cache.want(b)
    settle(cache)
    cache.acquire(a)  # a runs; b is idle
    cache.want(c)  # no free slot: the idle LRU one (b) goes, never a busy one
    assert b.state is State.ABSENT and a.state is State.RESIDENT
    settle(cache)
    assert c.state is State.RESIDENT and set(r.slots.values()) == {"a", "c"}
    cache.acquire(c)
    assert cache.want(b) is False and b.state is State.ABSENT  # everything busy: waits, nothing evicted
    cache.release(c)
    cache.want(b)
    assert c.state is State.ABSENT and b.state is State.LOADING


def test_byte_bound_evicts_until_it_fits():
    r = FakeRunner()
    cache = AdapterCache(r, max_loras=4, cache_bytes=250)
    a, b, big = adapter("a", 100), adapter("b", 100), adapter("big", 200)
    for x in (a, b):
        cache.want(x)
        settle(cache)
    cache.want(big)  # needs 200 of 250: both idle ones go, oldest first
    assert a.state is State.ABSENT and b.state is State.ABSENT and big.state is State.LOADING
    assert cache.used_bytes() == 200


def test_failed_load_returns_to_absent_and_is_reported():
    r = FakeRunner()
    r.fail.add("a")
    cache = AdapterCache(r, max_loras=1, cache_bytes=1000)
    a = adapter("a")
    cache.want(a)
    failed = settle(cache)
    assert [(x.name, type(e).__name__) for x, e in failed] == [("a", "OSError")]
    assert a.state is State.ABSENT and cache.free_slots == [1] and r.slots == {}


def test_remove_while_loading_or_in_use_evicts_later():
    r = FakeRunner()
    cache = AdapterCache(r, max_loras=2, cache_bytes=1000)
    a, b = adapter("a"), adapter("b")
    cache.want(a)
    settle(cache)
    cache.acquire(a)
    cache.remove(a)
    assert a.state is State.EVICTING and a.slot in r.slots
    cache.release(a)
    assert a.state is State.ABSENT and r.slots == {} and len(cache.free_slots) == 2
    r.gate.clear()  # hold b's read back
    cache.want(b)
    cache.remove(b)
    assert b.state is State.EVICTING
    r.gate.set()
    settle(cache)
    assert b.state is State.ABSENT and r.slots == {} and len(cache.free_slots) == 2  # never written
    cache.shutdown()
