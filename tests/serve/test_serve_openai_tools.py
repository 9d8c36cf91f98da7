"""Tool calling: tools in the prompt of a template without tools, calls constrained to the function's
schema, a round trip with the `openai` client, and streamed tool_calls deltas."""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest

from plural.serve import protocol as P
from plural.serve import tools as T
from spec import check, sse_events

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def request(**kw) -> P.ChatCompletionRequest:
    return P.ChatCompletionRequest.model_validate({"model": "tiny", "messages": ASK, "tools": [WEATHER, TIME], **kw})


@pytest.fixture(scope="module")
def tok(store):
    from plural.store.models import load_model

    return load_model("tiny")[1]


def test_prompt_for_a_template_without_tools(tok):
    assert not T.template_renders_tools(tok)  # SmolLM2's template: the tools go into the system prompt
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    msgs, native = T.messages(request(messages=history), tok, "Be brief.")
    assert native is None
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(T.tool_schema(P.FunctionDef.model_validate(WEATHER["function"]))) in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                       '{"city": "Paris", "unit": "C"}}\n</tool_call>'}
    assert msgs[3]["role"] == "user" and msgs[3]["content"] == '<tool_response>\n{"temp": 21}\n</tool_response>'
    none, _ = T.messages(request(tool_choice="none"), tok, None)
    assert all("# Tools" not in m["content"] for m in none)  # tool_choice none: no tools offered


def _accepts(grammars, grammar: str, text: str) -> bool:
    c = grammars.constraint(grammar)
    ids = grammars.hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    return c.matcher.consume_tokens(ids) and c.matcher.is_accepting()


def test_call_grammars(tok):
    from plural.serve.grammar import Grammars

    g = Grammars(tok, {0, 2})
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
    other = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    required = T.grammar(request(tool_choice="required"), None)
    assert _accepts(g, required, call) and _accepts(g, required, call + "\n" + other)
    assert not _accepts(g, required, "It is sunny.")
    assert not _accepts(g, required, call.replace('"C"', '"K"'))  # the arguments' schema is enforced
    assert not _accepts(g, required, call.replace("get_weather", "get_rain"))
    single = T.grammar(request(tool_choice="required", parallel_tool_calls=False), None)
    assert _accepts(g, single, call) and not _accepts(g, single, call + "\n" + other)
    named = T.grammar(request(tool_choice={"type": "function", "function": {"name": "get_time"}}), None)
    assert _accepts(g, named, other) and not _accepts(g, named, call)
    auto = T.grammar(request(tool_choice="auto"), None)
    assert _accepts(g, auto, "It is sunny in Paris.") and _accepts(g, auto, call)
    # auto: free text, then calls; once the model writes the opening tag, the call is constrained.
    assert _accepts(g, auto, "Let me check. " + call) and _accepts(g, auto, "Let me check.\n" + call + "\n" + other)
    assert _accepts(g, auto, "a <tool_call b <tool_call_x>")  # text that only looks like the tag stays text
    assert not _accepts(g, auto, "Let me check. " + call.replace('"C"', '"K"'))  # bad arguments after text
    assert not _accepts(g, auto, "Let me check. " + call.replace("get_weather", "get_rain"))
    assert not _accepts(g, auto, "Let me check. <tool_call>")  # a started call must be finished
    assert not _accepts(g, auto, "Hm. " + call + " and more text")  # nothing but calls after the first
    single_auto = T.grammar(request(tool_choice="auto", parallel_tool_calls=False), None)
    assert _accepts(g, single_auto, "Hm. " + call) and not _accepts(g, single_auto, "Hm. " + call + "\n" + other)
    with_format = T.grammar(request(tool_choice="auto"), {"type": "object", "properties": {"a": {"type": "integer"}},
                                                          "required": ["a"]})
    assert _accepts(g, with_format, '{"a": 1}') and _accepts(g, with_format, call)
    assert not _accepts(g, with_format, "free text")


def _stream(text: str, step: int) -> tuple[list, str]:
    p, got = T.StreamParser(), []
    for i in range(0, len(text), step):
        got += p.push(text[i:i + step])
    return got, p.finish()


def test_parse_and_stream_parser():
    text = ('Checking. \n<tool_call>\n{"name": "f", "arguments": {"q": "a </tool_call> \\" b}"}}\n</tool_call>\n'
            '<tool_call>{"name": "g", "arguments": {"n": [1, {"x": 2}]}}</tool_call>')
    content, calls = T.parse(text)
    assert content == "Checking." and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("f", {"q": 'a </tool_call> " b}'}), ("g", {"n": [1, {"x": 2}]})]  # a tag or brace inside a string is text
    assert calls[0].function.arguments == '{"q": "a </tool_call> \\" b}"}'  # as the model wrote it
    for step in (1, 3, 7, len(text)):  # any split of the text gives the same content and arguments
        got, rest = _stream(text, step)
        assert rest == "" and "".join(x for x in got if isinstance(x, str)) == "Checking."
        starts = [x for x in got if isinstance(x, T.CallStart)]
        assert [(x.index, x.name) for x in starts] == [(0, "f"), (1, "g")]
        assert [x.index for x in got if isinstance(x, T.CallEnd)] == [0, 1]
        for k, c in enumerate(calls):
            assert "".join(x.text for x in got if isinstance(x, T.CallArgs) and x.index == k) == c.function.arguments
        if step == 1:  # incremental: the name before any argument, the arguments in many pieces
            first = next(j for j, x in enumerate(got) if isinstance(x, T.CallArgs))
            assert got.index(starts[0]) < first and sum(isinstance(x, T.CallArgs) for x in got) > 20
    for step in (1, 2):  # whitespace is held back only while a tag may follow
        got, rest = _stream("Sunny  to <day> \n", step)
        assert "".join(got) + rest == "Sunny  to <day> \n"
    assert T.parse('<tool_call>{"name": "f", "argum') == ('<tool_call>{"name": "f", "argum', [])  # cut short: text
    cut = 'Hm <tool_call>{"name": "f", "arguments": {"q": "ab'
    assert T.parse(cut) == (cut, [])
    got, rest = _stream(cut, 2)  # streamed: the call was started, its text is not sent again as content
    p = T.StreamParser()
    p.push(cut)
    assert p.finish() == cut[3:] and p.unfinished == 0
    # Another key order is read too, released whole when complete.
    swapped = '<tool_call>{"arguments": {"a": 1}, "name": "h"}</tool_call>'
    got, rest = _stream(swapped, 4)
    assert [type(x).__name__ for x in got] == ["CallStart", "CallArgs", "CallEnd"] and got[1].text == '{"a": 1}'
    assert T.parse('<tool_call>{"name": "f", "arguments": 5}</tool_call>')[1][0].function.arguments == "5"


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _valid_call(call, tool) -> None:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    assert jsonschema_rs.validator_for(tool["function"]["parameters"]).is_valid(args), args


def test_tool_round_trip(oai_server):
    """call -> tool result -> final answer, with the history as the openai client sends it back."""
    c = client(oai_server)
    r = c.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                  parallel_tool_calls=False, max_tokens=80, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    _valid_call(call, WEATHER if call.function.name == "get_weather" else TIME)
    history = ASK + [choice.message, {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    final = c.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                      max_tokens=12, temperature=0)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content
    assert final.choices[0].finish_reason in ("stop", "length")
    # Named: that function, and finish_reason "stop" as OpenAI answers a forced call.
    named = c.chat.completions.create(model="qv4", messages=ASK, tools=[WEATHER, TIME], max_tokens=80,
                                      tool_choice={"type": "function", "function": {"name": "get_time"}},
                                      parallel_tool_calls=False)
    (call,) = named.choices[0].message.tool_calls
    _valid_call(call, TIME)
    assert named.choices[0].finish_reason == "stop"


def test_streamed_tool_calls_assemble(oai_server):
    c = client(oai_server)
    kw = dict(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120, temperature=0)
    whole = c.chat.completions.create(**kw, parallel_tool_calls=False)
    with c.chat.completions.stream(**kw, parallel_tool_calls=False) as stream:  # the SDK's own accumulation
        final = stream.get_final_completion()
    (a,), (b,) = whole.choices[0].message.tool_calls, final.choices[0].message.tool_calls
    assert (a.function.name, a.function.arguments) == (b.function.name, b.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"
    # Raw chunks: spec-valid, content never carries the call's text, and each call streams as OpenAI's
    # do: a first delta with index, id, type, name and empty arguments, then argument pieces by index.
    import httpx

    body = {**kw, "stream": True, "n": 2, "parallel_tool_calls": False}
    events = sse_events(httpx.post(oai_server.url + "/v1/chat/completions", json=body, timeout=60).text)
    calls = {0: [], 1: []}
    for ev in events:
        check("CreateChatCompletionStreamResponse", ev)
        for ch in ev["choices"]:
            assert "<tool_call>" not in (ch["delta"].get("content") or "")
            calls[ch["index"]] += ch["delta"].get("tool_calls", [])
    for got in calls.values():
        first, *rest = got
        assert first == {"index": 0, "id": first["id"], "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}
        assert len(rest) > 3 and all(set(t) == {"index", "function"} and set(t["function"]) == {"arguments"}
                                     and t["index"] == 0 for t in rest)
        assert "".join(t["function"]["arguments"] for t in rest) == a.function.arguments


def test_tool_requests_are_checked(oai_server):
    c = client(oai_server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER],
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in e.value.body["message"]
    bad = {**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "object", "not": {"required": ["x"]}}}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=ASK, tools=[bad], tool_choice="required")
    assert e.value.body["param"] == "tools" and "not" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=ASK + [{"role": "tool", "content": "x"}], tools=[WEATHER])
    assert "tool_call_id" in e.value.body["message"]


@pytest.fixture(scope="module")
def smol_server(store, tmp_path_factory):
    """SmolLM2 itself: free text followed by a call needs a model that writes the tag (the random
    tiny one never does)."""
    from server import Server

    s = Server(tmp_path_factory.mktemp("smol_srv"), {"model": "smollm2-135m-instruct", "dtype": "float32",
                                                     "max_model_len": 1024, "max_batch": 4}).wait_ready()
    yield s
    s.stop()


@pytest.mark.integration
def test_auto_text_then_a_call(smol_server):
    """tool_choice auto: text first, then a call constrained to its schema; the text is the content.
    A bias on " <" (token 2067) makes SmolLM2 open the tag after a few words, as a model trained on
    Hermes calls would on its own."""
    c = client(smol_server)
    kw = dict(model="smollm2-135m-instruct", tools=[WEATHER, TIME], tool_choice="auto", parallel_tool_calls=False,
              messages=[{"role": "user", "content": "Tell me what you will do, then do it: what is the weather in Paris?"}],
              max_tokens=60, temperature=0, logit_bias={"2067": 10})
    r = c.chat.completions.create(**kw)
    m = r.choices[0].message
    assert m.content and "<" not in m.content and r.choices[0].finish_reason == "tool_calls"
    (call,) = m.tool_calls
    _valid_call(call, WEATHER if call.function.name == "get_weather" else TIME)
    with c.chat.completions.stream(**kw) as stream:  # the SDK's accumulation of incremental deltas
        events = list(stream)
        final = stream.get_final_completion()
    assert final.choices[0].message.content == m.content
    (got,) = final.choices[0].message.tool_calls
    assert (got.function.name, got.function.arguments) == (call.function.name, call.function.arguments)
    deltas = [d for e in events if e.type == "chunk" for ch in e.chunk.choices for d in ch.delta.tool_calls or []]
    assert deltas[0].function.name == call.function.name and deltas[0].function.arguments == ""
    assert len(deltas) > 3 and all(d.id is None and d.function.name is None for d in deltas[1:])
