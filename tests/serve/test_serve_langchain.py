"""LangChain's `ChatOpenAI` against a real `plural serve` process: invoke, stream, structured output
and tool calls as LangChain sends and assembles them.

Nothing here counts tokens (LangChain would ask tiktoken, which downloads its encodings): usage
comes from the server (`stream_usage`), and no call to `get_num_tokens` is made.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema_rs
import pydantic
import pytest

from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from test_serve_openai_tools import ASK, TIME, WEATHER


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=12)  # bounded: a random tiny model could write on for ever
    unit: Literal["C", "F"]


@tool(args_schema=Weather)
def get_weather(city: str, unit: str) -> str:
    """The weather in a city."""
    return json.dumps({"city": city, "temp": 21, "unit": unit})


def chat(srv, model: str = "tiny", **kw) -> ChatOpenAI:
    return ChatOpenAI(base_url=srv.url + "/v1", api_key="none", model=model, max_retries=0, timeout=60,
                      temperature=0, **kw)


def test_invoke_and_stream(oai_server):
    llm = chat(oai_server, max_tokens=8)
    msg = llm.invoke([HumanMessage("Say hello.")])
    assert isinstance(msg, AIMessage) and msg.content
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    assert msg.usage_metadata["output_tokens"] <= 8 and msg.usage_metadata["input_tokens"] > 0
    chunks = list(chat(oai_server, max_tokens=8, stream_usage=True).stream([HumanMessage("Say hello.")]))
    assert all(isinstance(c, AIMessageChunk) for c in chunks) and len(chunks) > 2
    total = sum(chunks[1:], chunks[0])
    assert total.content == msg.content  # greedy: the stream spells the same answer
    assert total.usage_metadata == msg.usage_metadata  # from the server's last chunk, not counted here


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=30)


def test_with_structured_output_json_schema(oai_server):
    llm = chat(oai_server, model="qv4", max_tokens=60)
    pet = llm.with_structured_output(Pet, method="json_schema", strict=True).invoke("Describe a pet as JSON.")
    assert isinstance(pet, Pet)  # LangChain parsed and validated it with the pydantic model
    raw = llm.with_structured_output(Pet, method="json_schema", include_raw=True).invoke("A pet, please.")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Pet)
    assert Pet.model_validate_json(raw["raw"].content) == raw["parsed"]


def _valid(call: dict, spec: dict) -> None:
    assert call["name"] == spec["function"]["name"] and call["id"].startswith("call_")
    assert jsonschema_rs.validator_for(spec["function"]["parameters"]).is_valid(call["args"]), call


def test_bind_tools_round_trip(oai_server):
    """AIMessage.tool_calls -> run the tool -> ToolMessage -> the final answer."""
    llm = chat(oai_server, max_tokens=80)
    asking = [HumanMessage(ASK[0]["content"])]
    ai = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False).invoke(asking)
    (call,) = ai.tool_calls
    _valid(call, WEATHER)
    assert ai.response_metadata["finish_reason"] == "tool_calls" and ai.content == ""
    result = get_weather.invoke(call)  # a ToolCall in gives a ToolMessage out, with its id
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    final = chat(oai_server, max_tokens=12).bind_tools([get_weather], tool_choice="none").invoke(
        [*asking, ai, result])
    assert final.content and not final.tool_calls
    assert final.response_metadata["finish_reason"] in ("stop", "length")


def _summed(llm, messages) -> tuple[AIMessageChunk, list[dict]]:
    chunks = list(llm.stream(messages))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    return sum(chunks[1:], chunks[0]), [tc for c in chunks for tc in c.tool_call_chunks]


def test_streamed_tool_calls_assemble(oai_server):
    """The AIMessageChunks of a stream sum to the same tool_calls as the non-streamed answer."""
    asking = [HumanMessage(ASK[0]["content"])]
    llm = chat(oai_server, max_tokens=120).bind_tools([WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    whole = llm.invoke(asking)
    total, pieces = _summed(llm, asking)
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]
    (call,) = total.tool_calls
    _valid(call, WEATHER if call["name"] == "get_weather" else TIME)
    assert not total.invalid_tool_calls and total.response_metadata["finish_reason"] == "tool_calls"
    # Incremental: the name comes once, in the first piece; then the arguments in several pieces.
    assert len(pieces) > 3 and pieces[0]["name"] == call["name"] and pieces[0]["args"] == ""
    assert all(p["name"] is None and p["index"] == 0 for p in pieces[1:])
    # Parallel calls: merged by index, each its own call, as in the non-streamed answer.
    llm = chat(oai_server, max_tokens=100).bind_tools([WEATHER, TIME], tool_choice="required")
    whole = llm.invoke(asking)
    total, pieces = _summed(llm, asking)
    assert len(whole.tool_calls) > 1 and len({p["index"] for p in pieces}) >= len(whole.tool_calls)
    # Out of tokens, a call cut short may have been started in the stream; the finished ones agree.
    assert [(c["name"], c["args"]) for c in total.tool_calls[:len(whole.tool_calls)]] == [
        (c["name"], c["args"]) for c in whole.tool_calls]
