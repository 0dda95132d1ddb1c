"""Request bodies of the OpenAI API (unknown fields are accepted: real clients send them, and they are passed on),
and the answers' shapes (`...Out`), which document /docs; answers are built as plain dicts and not validated
against them on the way out (gateway/api.py returns its JsonResponse as it is)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from django.conf import settings
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 8
# A JSON schema deeper than this (tools' parameters, response_format) is refused: turning a 200-deep
# schema into a grammar held the model's process for 45 s, and no real tool nests that far.
MAX_SCHEMA_DEPTH = 24
MAX_SCHEMA_BYTES = 64 * 1024


def _schema_bounded(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """ValueError unless `schema` nests at most MAX_SCHEMA_DEPTH deep (counted without recursion)."""
    if schema is None:
        return schema
    stack: list[tuple[Any, int]] = [(schema, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if nodes > MAX_SCHEMA_BYTES // 4:
            raise ValueError("the schema is too large")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return schema


def _max_tokens_limit() -> int:
    return settings.OPTIMAGPT_MAX_TOKENS_LIMIT


class OpenAIIn(BaseModel):
    # Plain pydantic, not ninja.Schema: its root validator (for reading Django
    # models) runs for every nested object, every message of a chat included.
    # Strict types, as OpenAI's API has them ("max_tokens": "5" is an error, not 5):
    # the body goes to the node exactly as the client sent it, so what passes
    # here must already be what the node expects.
    model_config = ConfigDict(extra="allow", strict=True)


class FunctionSpec(OpenAIIn):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None

    _bounded = field_validator("parameters")(classmethod(lambda cls, v: _schema_bounded(v)))


class Tool(OpenAIIn):
    type: Literal["function"]
    function: FunctionSpec


class McpToolNames(OpenAIIn):
    tool_names: list[Annotated[str, Field(min_length=1, max_length=128)]]


class McpTool(OpenAIIn):
    """An MCP server an admin registered, by name: its tools run on the gateway (the Responses API's form)."""

    type: Literal["mcp"]
    server_label: Annotated[str, Field(min_length=1, max_length=64)]
    allowed_tools: list[Annotated[str, Field(min_length=1, max_length=128)]] | McpToolNames | None = None
    require_approval: Literal["never"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _registered_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for given in ("server_url", "connector_id", "headers", "authorization"):
                if data.get(given) is not None:
                    raise ValueError(f"{given} is not accepted: only MCP servers an admin registered run, "
                                     "named by server_label")
        return data

    def tool_names(self) -> set[str] | None:
        """The server's own tool names the request allows; None: all of them."""
        if self.allowed_tools is None:
            return None
        names = self.allowed_tools.tool_names if isinstance(self.allowed_tools, McpToolNames) else self.allowed_tools
        return set(names)


class NamedFunction(OpenAIIn):
    name: str


class ToolChoiceFunction(OpenAIIn):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(OpenAIIn):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    _bounded = field_validator("schema_")(classmethod(lambda cls, v: _schema_bounded(v)))


class ResponseFormat(OpenAIIn):
    type: Literal["text", "json_object", "json_schema"]
    json_schema_: JsonSchemaSpec | None = Field(default=None, alias="json_schema")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema_ is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class StreamOptions(OpenAIIn):
    include_usage: bool = False


class ToolCallFunction(OpenAIIn):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: str


class ToolCall(OpenAIIn):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(OpenAIIn):
    type: str
    text: str | None = None


class ChatMessage(OpenAIIn):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class SamplingIn(OpenAIIn):
    model: Annotated[str, Field(min_length=1, max_length=200)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # Several choices are made one after another by one process (node_agent.runtimes.llama_cpp_worker).
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    user: str | None = None
    # llama.cpp's own sampling extras, which the node reads: typed here, so a bad one is a 400, not a
    # failure inside the model's process.
    top_k: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, Field(ge=0, le=10)] | None = None

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _token_count(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= _max_tokens_limit():
            raise ValueError(f"must be between 1 and {_max_tokens_limit()}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and not all(k.isdigit() for k in value):
            raise ValueError("keys must be token ids")
        return value


# More turns than this cannot fit any window we serve (each takes a few tokens of template at least);
# rendering 25,000 of them held the model's process for 14 s before the window check refused them.
MAX_MESSAGES = 4096


def _no_logprobs(value: Any) -> Any:
    # Not computed yet (llama-cpp-python needs logits for the whole window for them): refused, never
    # answered with null as if it had been.
    if value not in (None, False, 0):
        raise ValueError("logprobs are not supported by this gateway yet")
    return value


class ChatCompletionIn(SamplingIn):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    _refuse_logprobs = field_validator("logprobs", "top_logprobs")(classmethod(lambda cls, v: _no_logprobs(v)))
    max_completion_tokens: int | None = None
    tools: list[Annotated[Tool | McpTool, Field(discriminator="type")]] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionIn:
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice requires tools")
        if isinstance(self.tool_choice, ToolChoiceFunction) and self.tools and not self.mcp_tools():
            # (with MCP servers the function may be one of theirs: gateway/mcp_rounds.py checks it)
            if self.tool_choice.function.name not in {t.function.name for t in self.function_tools()}:
                raise ValueError(f"tool_choice names '{self.tool_choice.function.name}', which is not in tools")
        return self

    def function_tools(self) -> list[Tool]:
        return [t for t in self.tools or () if isinstance(t, Tool)]

    def mcp_tools(self) -> list[McpTool]:
        return [t for t in self.tools or () if isinstance(t, McpTool)]


class CompletionIn(SamplingIn):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False
    logprobs: int | None = None
    _refuse_logprobs = field_validator("logprobs")(classmethod(lambda cls, v: _no_logprobs(v)))
    suffix: str | None = None
    max_tokens: int | None = 16


class EmbeddingIn(OpenAIIn):
    model: Annotated[str, Field(min_length=1, max_length=200)]
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=2048)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=2048)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


# -- answers ------------------------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "tool_calls", "cancelled"] | None
# mcp_round_limit: the gateway stopped after OPTIMAGPT_MCP_MAX_ROUNDS rounds of MCP tool calls.
ChatFinishReason = Literal["stop", "length", "tool_calls", "cancelled", "mcp_round_limit"] | None


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoiceOut(BaseModel):
    index: int
    message: AssistantMessageOut
    logprobs: None = None
    finish_reason: ChatFinishReason


class McpCallOut(BaseModel):
    """One MCP tool call the gateway ran for the request (gateway/mcp_rounds.py)."""

    id: str
    round: int
    server_label: str
    name: str = Field(description="the tool's own name on its server")
    arguments: str
    output: str
    error: bool
    duration_ms: float


class ChatCompletionOut(BaseModel):
    """With `stream: true` the answer is `text/event-stream` instead: `chat.completion.chunk` objects, one per
    `data:` line, then `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoiceOut]
    usage: UsageOut
    mcp_calls: list[McpCallOut] | None = Field(
        None, description="only when the request named MCP servers: the tool calls the gateway ran")


class CompletionChoiceOut(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class CompletionOut(BaseModel):
    """With `stream: true`: `text/event-stream` of `text_completion` objects, then `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoiceOut]
    usage: UsageOut


class EmbeddingOut(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or with encoding_format=base64 little-endian float32")


class EmbeddingListOut(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingOut]
    model: str
    usage: UsageOut


class ModelOut(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelListOut(BaseModel):
    object: Literal["list"]
    data: list[ModelOut]
