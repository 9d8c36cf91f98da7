"""OpenAI protocol models (the subset plural serves), as pydantic models.

Requests forbid unknown fields: a field the server does not implement is a 400 that names it,
never silently ignored. Responses follow the OpenAI objects the `openai` client parses.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer, model_validator


def _encodable(v: str) -> str:
    # JSON may carry a lone surrogate ("\ud800"): valid JSON, but not text any tokenizer can take.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate (U+{ord(v[e.start]):04X}) at character {e.start}; "
                         "send valid Unicode text") from None
    return v


def _no_nul(v: str) -> str:
    if "\x00" in v:
        raise ValueError("contains a NUL byte")
    return v


Text = Annotated[str, AfterValidator(_encodable)]
INT64 = 2**63


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Request):
    include_usage: bool = False
    # Accepted for clients that send it; plural never pads chunks, so there is no `obfuscation` field.
    include_obfuscation: bool | None = None


class TextPart(Request):
    type: Literal["text"]
    text: Text


class FunctionCall(Request):
    name: Text
    arguments: Text  # the call's arguments as JSON text, as the assistant produced them


class ToolCall(Request):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: Text | None = None  # tool turns: which call this is the result of
    # What clients echo back when they append a response's message to the history: carried, not used.
    refusal: Text | None = None
    annotations: list[dict] | None = None

    @model_validator(mode="after")
    def _roles(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: required in a message with role 'tool'")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only allowed in a message with role 'assistant'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionDef(Request):
    name: FunctionName
    description: Text | None = None
    parameters: dict | None = None  # a JSON schema; absent means a call without arguments
    strict: bool | None = None  # plural always enforces `parameters` (see docs/serving.md)


class Tool(Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Request):
    name: FunctionName


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormatText(Request):
    type: Literal["text"]


class ResponseFormatJSONObject(Request):
    type: Literal["json_object"]


class JSONSchemaSpec(Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: FunctionName
    description: Text | None = None
    schema_: dict | None = Field(None, alias="schema")  # absent: any JSON object
    strict: bool | None = None  # plural always enforces the schema, strict or not


class ResponseFormatJSONSchema(Request):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
                           Field(discriminator="type")]


def _token_bias(v: dict[str, float] | None) -> dict[str, float] | None:
    for k, b in (v or {}).items():
        if not k.lstrip("-").isdigit() or int(k) < 0:
            raise ValueError(f"logit_bias: key {k!r} is not a token id (a non-negative integer as a string)")
        if not -100 <= b <= 100:
            raise ValueError(f"logit_bias: the bias of token {k} is {b}; it must be in [-100, 100]")
    return v


class SamplingFields(Request):
    model: Text = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)  # int64, as in OpenAI's spec
    stop: Text | list[Text] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # an end-user id for the operator's logs; it does not change the output
    # OpenAI's penalties over the tokens generated so far, and per-token biases.
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(_token_bias)] = None
    # vLLM's extensions.
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: all tokens
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)  # CTRL's, over prompt and output; 1 = off
    ignore_eos: bool = False  # generate max_tokens even past end-of-turn (benchmarks)

    @model_validator(mode="after")
    def _stops(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        return tuple([self.stop] if isinstance(self.stop, str) else (self.stop or []))


Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # true (the default): one or more calls; false: at most one
    # Neutral for a self-hosted server (see docs/serving.md): accepted, never change the output.
    store: bool | None = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice: no function named {self.tool_choice.function.name!r} in tools")
        if self.tool_choice in ("auto", "required") and not names:
            raise ValueError(f"tool_choice: {self.tool_choice!r} needs tools")
        return self

    def tool_mode(self) -> str:
        """none | auto | required | named: how this request may call tools."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class EmbeddingRequest(Request):
    model: Text = Field(min_length=1)
    input: Text | list[Text] | list[int] | list[list[int]] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: Text | None = None


class Response(BaseModel):
    """A response object. Fields named in `_omit_none` are left out when None: the OpenAPI spec has
    no null for them (a field that is nullable in the spec is sent as null instead)."""

    _omit_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        d = handler(self)
        for k in self._omit_none:
            if d.get(k, 0) is None:
                del d[k]
        return d


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Response):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None  # required by the spec; plural never refuses


class FunctionCallOut(Response):
    name: str
    arguments: str


class ToolCallOut(Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(Response):
    _omit_none = ("tool_calls",)
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ChatCompletion(Response):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkFunction(Response):
    _omit_none = ("name", "arguments")
    name: str | None = None
    arguments: str | None = None


class ChunkToolCall(Response):
    _omit_none = ("id", "type", "function")
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction | None = None


class ChunkDelta(Response):
    _omit_none = ("role", "content", "tool_calls")
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(Response):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Response):
    _omit_none = ("usage",)
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only on the last chunk, with stream_options.include_usage


class CompletionLogprobs(Response):
    tokens: list[str]
    token_logprobs: list[float | None]  # the first echoed prompt token has none (nothing before it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    # None in a stream's chunks before the last, as OpenAI and vLLM send (see docs/serving.md)
    finish_reason: Literal["stop", "length"] | None


class Completion(Response):
    _omit_none = ("usage",)
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(Response):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64 of little-endian float32, with encoding_format=base64


class EmbeddingUsage(Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(Response):
    _omit_none = ("parent", "root", "plural")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None  # an adapter's base model id (as vLLM reports it)
    root: str | None = None  # where it lives on disk: shown to the admin key only
    plural: dict | None = None  # plural's extension: an adapter's content digest (and signer, if checked)


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class LoadAdapterRequest(Request):
    name: Annotated[Text, AfterValidator(_no_nul)] = Field(min_length=1, max_length=128)
    path: Annotated[Text, AfterValidator(_no_nul)] = Field(min_length=1, max_length=4096)


class AdapterInfo(BaseModel):
    name: str
    path: str
    rank: int
    resident: bool
    running: int
