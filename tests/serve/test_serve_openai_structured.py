"""Structured output: llguidance grammars enforce JSON schemas on what the sampler picks, fail closed
on what they cannot enforce, and mix with unconstrained rows in one batch."""

from __future__ import annotations

import json
import threading
from typing import Literal

import jsonschema_rs
import openai
import pydantic
import pytest
import torch

from plural.serve.grammar import Grammars, GrammarError, json_schema_grammar, mask_logits
from plural.serve.sampler import SamplingParams, make_generator, sample

EOS = 2  # SmolLM2's <|im_end|>

# A corpus of schemas with the keywords clients send (OpenAI strict mode, pydantic, hand-written).
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                                            "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "fish"]}, "n": {"type": "number"}},
     "required": ["kind"]},
    {"type": "object", "properties": {"x": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]}},
     "required": ["x"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                      "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}, "required": ["a", "b"],
     "additionalProperties": False},
    {"type": "string", "pattern": "^[a-z]{2,5}-[0-9]{1,3}$"},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]},
                                               "maxItems": 4}, "ok": {"const": True}}, "required": ["tags", "ok"]},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}, "required": ["when"],
     "additionalProperties": False},
    {"type": "object"},  # json_object
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"v": {"type": ["integer", "string"],
                                                                                       "maxLength": 3}},
                                                "required": ["v"], "additionalProperties": False}},
     "required": ["inner"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def grammars(store):
    from plural.store.models import load_model

    _, tok, _ = load_model("tiny")
    return Grammars(tok, {0, EOS}), tok


def _structural(tok) -> torch.Tensor:
    """Tokens made only of JSON punctuation, and EOS: favoured by the fuzzer so answers end."""
    ids = [i for i in range(len(tok)) if (s := tok.decode([i])) and set(s) <= set('"{}[],: ')]
    return torch.tensor(ids + [EOS])


@pytest.fixture
def one_thread():
    # Single-row tensor ops: threads only contend (the engine sets its own thread count).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_fuzzed_answers_always_parse_and_validate(grammars, one_thread):
    """Random logits, sampled through the grammar mask: every finished answer is valid JSON that
    validates against its schema (jsonschema-rs, independent of llguidance)."""
    g, tok = grammars
    favour = _structural(tok)
    finished = 0
    for k, schema in enumerate(SCHEMAS):
        validator = jsonschema_rs.validator_for(schema)
        for seed in range(3):
            c = g.constraint(json_schema_grammar(schema))
            gen, torch_gen = make_generator(100 * k + seed), torch.Generator().manual_seed(100 * k + seed)
            out = []
            for _ in range(200):
                logits = torch.randn(1, len(tok), generator=torch_gen) * 2
                logits[0, favour] += 4.0
                assert mask_logits(logits, [0], [c]) == [None]
                (t,), (err,) = sample(logits, [SamplingParams(max_tokens=200, temperature=1.0)], [gen])
                assert err is None
                assert c.consume(t) is None
                if t == EOS:
                    break
                out.append(t)
                if c.matcher.is_stopped():  # complete: nothing but the end may follow
                    break
            else:
                continue  # ran out of tokens: a prefix, as finish_reason length says
            text = tok.decode(out)
            value = json.loads(text)
            assert validator.is_valid(value), (schema, text)
            finished += 1
    assert finished >= len(SCHEMAS) * 2  # most runs end within the budget


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    # A schema cannot switch llguidance to ignoring what it cannot enforce.
    ({"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}, "uniqueItems"),
])
def test_unenforceable_keywords_fail_closed(grammars, schema, keyword):
    g, _ = grammars
    with pytest.raises(GrammarError, match=keyword):
        g.constraint(json_schema_grammar(schema))


def test_compiled_grammars_are_cached_and_sized(grammars):
    g, tok = grammars
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}, "required": ["cached"]}
    before = g.cached()
    a, b = g.constraint(json_schema_grammar(schema)), g.constraint(json_schema_grammar(schema))
    assert g.cached() == before + 1  # one compile for both
    # Each sequence has its own state: '{"' twice in one matcher would be rejected.
    (brace,) = tok('{"', add_special_tokens=False)["input_ids"]
    assert a.consume(brace) is None and b.consume(brace) is None
    assert a.consume(brace) is not None
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(3000)}}
    with pytest.raises(GrammarError, match="too large"):
        g.constraint(json_schema_grammar(huge))


@pytest.fixture(scope="module")
def engine(store):
    from plural.serve.engine import Engine
    from plural.store.models import load_model

    model, tok, _ = load_model("tiny")
    eng = Engine(model, tok, max_batch=4, max_len=256, max_queue=8, max_loras=1, max_lora_rank=8,
                 cache_bytes=1 << 30, dtype=torch.float32, device=torch.device("cpu"))
    eng.start()
    yield eng, tok
    eng.stop()


def _run(eng, jobs):
    from plural.serve.sequence import Sequence

    out = [{"ids": [], "finish": None, "error": None} for _ in jobs]
    done = threading.Event()
    left = [len(jobs)]

    def sink(i):
        def emit(ev):
            out[i]["ids"].extend(ev.token_ids)
            if ev.finish_reason:
                out[i]["finish"], out[i]["error"] = ev.finish_reason, ev.error
                left[0] -= 1
                if not left[0]:
                    done.set()
        return emit

    eng.submit([Sequence("tiny", None, ids, p, sink(i), constraint=c) for i, (ids, p, c) in enumerate(jobs)])
    assert done.wait(120)
    return out


def test_constrained_and_unconstrained_rows_share_a_batch(engine, grammars):
    eng, tok = engine
    g, _ = grammars
    schema = SCHEMAS[1]
    ids = tok("Describe a person:", add_special_tokens=False)["input_ids"]
    greedy = SamplingParams(max_tokens=40, temperature=0.0)
    alone = _run(eng, [(ids, greedy, None)])[0]
    mixed = _run(eng, [(ids, greedy, None), (ids, greedy, g.constraint(json_schema_grammar(schema))),
                       (ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), None)])
    assert mixed[0]["ids"] == alone["ids"]  # the unconstrained row is untouched by its neighbour's mask
    constrained = mixed[1]
    assert constrained["finish"] == "stop" and constrained["error"] is None
    text = tok.decode([t for t in constrained["ids"] if t != EOS])
    assert jsonschema_rs.validator_for(schema).is_valid(json.loads(text)), text
    # Out of tokens mid-object: finish_reason length, the text a prefix of a valid answer.
    (short,) = _run(eng, [(ids, SamplingParams(max_tokens=3, temperature=0.0), g.constraint(json_schema_grammar(schema)))])
    assert short["finish"] == "length" and text.startswith(tok.decode(short["ids"]))


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    kind: Literal["cat", "dog"]
    age: int = pydantic.Field(ge=0, le=30)
    toys: list[Literal["ball", "rope"]] = pydantic.Field(max_length=2)


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_openai_parse_with_a_pydantic_model(oai_server):
    """`client.chat.completions.parse(response_format=Model)`: the strict json_schema request the
    SDK builds comes back parsed into the model, for the base and an adapter, sampled and greedy."""
    c = client(oai_server)
    msgs = [{"role": "user", "content": "Invent a pet."}]
    for model, temperature in [("tiny", 0.0), ("qv4", 1.0), ("tiny", 1.0)]:
        r = c.chat.completions.parse(model=model, messages=msgs, response_format=Pet, max_tokens=120,
                                     temperature=temperature, seed=7)
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet) and r.choices[0].finish_reason == "stop"
    # json_object: any object. The tiny random model may write an unbounded string and run out of
    # tokens (finish_reason length); the answer is then a prefix of an object.
    r = c.chat.completions.create(model="tiny", messages=msgs, response_format={"type": "json_object"}, max_tokens=60,
                                  temperature=0)
    content, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert content.startswith("{") and finish in ("stop", "length")
    if finish == "stop":
        assert isinstance(json.loads(content), dict)
    # Streamed: the concatenated deltas parse too.
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=120, stream=True, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "pet", "schema": Pet.model_json_schema(), "strict": True}})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    Pet.model_validate_json(text)


def test_unenforceable_schema_is_a_400_naming_the_keyword(oai_server):
    c = client(oai_server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "array", "uniqueItems": True}}})
    assert e.value.body["param"] == "response_format" and "uniqueItems" in e.value.body["message"]
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[1]}})
    assert r.choices[0].finish_reason == "length"


def test_a_failed_grammar_fails_its_sequence_alone(engine, grammars):
    eng, tok = engine
    g, _ = grammars
    broken = g.constraint(json_schema_grammar(SCHEMAS[0]))
    assert not broken.matcher.consume_token(tok("hello", add_special_tokens=False)["input_ids"][0])  # error state
    ids = tok("Describe a person:", add_special_tokens=False)["input_ids"]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    bad, good = _run(eng, [(ids, greedy, broken), (ids, greedy, None)])
    assert bad["finish"] == "error" and "grammar" in bad["error"]
    assert good["finish"] == "length" and len(good["ids"]) == 8
