"""The engine against plain transformers + PEFT: greedy tokens identical, in mixed-adapter batches."""

from __future__ import annotations

import threading

import pytest
import torch

from plural.data.chat import encode_prompt
from plural.serve.engine import Engine, SamplingParams, Sequence
from plural.serve.registry import make_adapter as register
TINY = "tiny"  # the tiny Llama that tests/conftest.py puts in the store

PROMPTS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "Name three colours, please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Count: one, two,"}],
]


def peft_greedy(base_name, adapter_path, ids, n_new):
    from plural.store.adapters import attach_adapter
    from plural.store.models import load_model

    model, tok, stored = load_model(base_name)
    if adapter_path is not None:
        model = attach_adapter(model, adapter_path, base=stored)
    with torch.no_grad():
        # An explicit mask: the prompt contains <|im_end|>, which is also the pad id generate would mask.
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    return out[0, len(ids):].tolist()


def run_engine(engine, jobs):
    """jobs: [(adapter or None, prompt ids, params)] submitted together; returns each one's token ids."""
    results = [[] for _ in jobs]
    errors = []
    left = [len(jobs)]
    all_done = threading.Event()

    def sink(i):
        def emit(ev):  # called on the engine thread: record only, assert on the test thread
            results[i].extend(ev.token_ids)
            if ev.error:
                errors.append(ev.error)
            if ev.finish_reason:
                left[0] -= 1
                if left[0] == 0:
                    all_done.set()
        return emit

    engine.submit([Sequence("m", a, ids, p, sink(i)) for i, (a, ids, p) in enumerate(jobs)])
    assert all_done.wait(120), "engine did not finish"
    assert not errors, errors
    return results


@pytest.fixture(scope="module")
def tiny_engine(store, tiny_adapters):
    from plural.store.models import get_model, load_model

    tiny_model = TINY
    model, tok, stored = load_model(tiny_model)
    eng = Engine(model, tok, max_batch=6, max_len=256, max_queue=16, max_loras=2, max_lora_rank=8,
                 cache_bytes=1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    eng.stop_ids = set()  # run every sequence to max_tokens, as the reference does with eos_token_id=None
    for name, path in tiny_adapters.items():
        eng.add_adapter(register(name, path, get_model(tiny_model), eng.runner, 8))
    eng.start()
    yield eng, tok
    eng.stop()


def test_mixed_adapter_batch_matches_peft(tiny_engine, tiny_model, tiny_adapters):
    """3 adapters + base in one batch, more requests than rows and adapters than LoRA slots
    (max_loras=2), so rows are reused and adapters are evicted and reloaded mid-run."""
    eng, tok = tiny_engine
    names = [None, "qv4", "all8", "rs2", None, "all8", "qv4", "rs2"]
    jobs = []
    for i, name in enumerate(names):
        ids = encode_prompt(tok, PROMPTS[i % len(PROMPTS)])
        jobs.append((eng.adapters[name] if name else None, ids, SamplingParams(max_tokens=12 + i, temperature=0.0)))
    got = run_engine(eng, jobs)
    refs = {}
    for (a, ids, p), name, out in zip(jobs, names, got):
        ref = peft_greedy(tiny_model, tiny_adapters[name] if name else None, ids, p.max_tokens)
        refs.setdefault(tuple(ids), {})[name] = ref
        assert out == ref, f"adapter {name}: engine {out} != peft {ref}"
    # The adapters really change the output (else this test could not catch a mixed-up row).
    for by_adapter in refs.values():
        outs = [tuple(v) for v in by_adapter.values()]
        assert len(set(outs)) == len(outs), by_adapter


def test_seeded_sampling_is_reproducible(tiny_engine):
    eng, tok = tiny_engine
    ids = list(range(100, 120))
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a = run_engine(eng, [(None, ids, p)])
    b = run_engine(eng, [(None, ids, p)])
    c = run_engine(eng, [(None, ids, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=8))])
    assert a == b and a != c


def test_fast_content_chunk_equals_the_pydantic_chunk():
    import json

    from plural.serve import protocol as P
    from plural.serve.serving import _sse, content_chunk_writer

    base = dict(id="chatcmpl-x", created=1700000000, model="m")
    write = content_chunk_writer(base)
    for i, text in [(0, "plain"), (3, 'quote " and \\ backslash\nnew line'), (1, "Grüße, ünïcode ✓")]:
        ref = _sse(P.ChatCompletionChunk(**base, choices=[P.ChunkChoice(index=i, delta=P.ChunkDelta(content=text))]).model_dump())
        fast = write(i, text)
        assert fast.startswith("data: ") and fast.endswith("\n\n")
        assert json.loads(fast[6:]) == json.loads(ref[6:])


def _run_collecting(coro_fn, errors):
    import asyncio

    try:
        asyncio.run(coro_fn())
    except BaseException as e:  # reported to the test thread
        errors.append(e)


def test_mailbox_delivers_one_steps_events_in_order_with_one_wakeup():
    """The engine thread's events of one step reach the event loop in order, in one hand-over."""
    import asyncio

    from plural.serve.serving import Mailbox

    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe

        def counting(*args):
            calls.append(args)
            return real(*args)

        loop.call_soon_threadsafe = counting
        box = Mailbox(loop)
        a, b = asyncio.Queue(), asyncio.Queue()

        def engine_step():
            for i in range(6):
                box.post(a if i % 2 else b, i)
            box.flush()
            box.flush()  # nothing new: no second wake-up

        t = threading.Thread(target=engine_step)
        t.start()
        t.join()
        assert a.empty() and b.empty()  # delivered on the loop, not from the engine thread
        await asyncio.sleep(0.01)
        assert len(calls) == 1
        assert [b.get_nowait() for _ in range(3)] == [0, 2, 4]
        assert [a.get_nowait() for _ in range(3)] == [1, 3, 5]

    # In a thread of its own: a test before this one (Playwright's sync API) may have left an event
    # loop running on the main thread, where asyncio.run refuses to start another.
    errors = []
    t = threading.Thread(target=_run_collecting, args=(main, errors))
    t.start()
    t.join(30)
    assert errors == [], errors


def test_an_exception_in_one_sequence_fails_it_alone(tiny_engine, monkeypatch):
    """Whatever raises while serving one sequence (here its detokeniser) ends that sequence with an
    error; the others in the same batch finish with the tokens they get alone."""
    import plural.serve.engine as engine_mod
    from plural.serve.detok import TextStream

    class Exploding(TextStream):
        def push(self, token_id):
            if "BOOM" in self.stop and len(self.ids) >= 2:
                raise RuntimeError("detokeniser failure")
            return super().push(token_id)

    eng, tok = tiny_engine
    jobs = [(eng.adapters[n] if n else None, encode_prompt(tok, PROMPTS[i]), SamplingParams(max_tokens=10, temperature=0.0))
            for i, n in enumerate([None, "qv4", "all8", "rs2"])]
    alone = run_engine(eng, jobs)
    monkeypatch.setattr(engine_mod, "TextStream", Exploding)
    finished: dict[int, object] = {}
    done = threading.Event()

    def sink(i):
        def emit(ev):
            if ev.finish_reason:
                finished[i] = ev
                if len(finished) == 5:
                    done.set()
        return emit

    bad = SamplingParams(max_tokens=10, temperature=0.0, stop=("BOOM",))
    seqs = [Sequence("m", a, ids, p, sink(i)) for i, (a, ids, p) in enumerate(jobs[:2])]
    seqs.append(Sequence("m", None, jobs[0][1], bad, sink(2), request_id="req-bad"))
    seqs += [Sequence("m", a, ids, p, sink(i + 3)) for i, (a, ids, p) in enumerate(jobs[2:])]
    eng.submit(seqs)
    assert done.wait(60)
    assert finished[2].finish_reason == "error" and "req-bad" in finished[2].error
    assert "detokeniser failure" not in finished[2].error  # internals stay in the server log
    good = [s for i, s in enumerate(seqs) if i != 2]
    assert [s.out_ids for s in good] == alone
    assert all(finished[i].finish_reason == "length" for i in (0, 1, 3, 4))


@pytest.mark.parametrize("runner", ["fused", "generic"])
def test_a_failed_rows_nan_cache_does_not_reach_its_next_tenant(store, nan_adapter, runner):
    """A diverged adapter writes NaN into its KV row and fails. The row's next sequence, prefilled
    alone and then decoding beside a longer one (so each step reads the row past its own position,
    masked), gets its own tokens: masked-out NaN would poison it (softmax weight 0 x NaN = NaN)."""
    from plural.store.models import get_model, load_model

    model, tok, _ = load_model(TINY)
    short, long_ = encode_prompt(tok, PROMPTS[0]), encode_prompt(tok, PROMPTS[2]) * 3
    # A prefill budget of one long prompt: the last two sequences below are prefilled one by one.
    eng = Engine(model, tok, max_batch=2, max_len=256, max_queue=8, max_loras=2, max_lora_rank=8,
                 cache_bytes=1 << 30, dtype=torch.float32, device=torch.device("cpu"), runner=runner,
                 max_prefill_tokens=len(long_) + 8)
    eng.stop_ids = set()
    eng.add_adapter(register("nan", nan_adapter, get_model(TINY), eng.runner, 8))
    eng.start()
    try:
        assert eng.runner.kind == runner
        greedy = SamplingParams(max_tokens=6, temperature=0.0)
        alone = run_engine(eng, [(None, short, greedy)])
        # Row 0 runs a short filler, row 1 the diverged adapter: row 1 now holds NaN up to len(long_).
        with pytest.raises(AssertionError, match="non-finite logits"):
            run_engine(eng, [(None, short, SamplingParams(max_tokens=40)), (eng.adapters["nan"], long_, greedy)])
        # The long sequence takes row 0; the short one row 1, beside it.
        got = run_engine(eng, [(None, long_ + long_[:8], greedy), (None, short, greedy)])
        assert got[1] == alone[0]
    finally:
        eng.stop()
