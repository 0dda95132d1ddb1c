"""The Responses API's request body and answers' shapes (for validation and /docs).

Unknown fields are accepted, as on the chat endpoint (current SDKs send fields this gateway does not use,
such as `include` or `service_tier`); the ones that would change the answer and cannot be honoured are
refused with 400 instead of being ignored (`prompt`, `top_logprobs`, images and files in the input).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from gateway.schemas import JsonSchemaSpec, McpTool, OpenAIIn, _max_tokens_limit, _schema_bounded

# Hosted tools of OpenAI's that the gateway cannot run: left out of what the model sees, and named in the
# x-optimagpt-ignored-tools header of the answer.
HOSTED_TOOLS = ("web_search", "file_search", "code_interpreter", "computer_use", "image_generation", "local_shell")
MAX_INPUT_ITEMS = 4096
MAX_METADATA_KEYS = 16


def hosted(kind: str) -> bool:
    """Whether a tool type is one of the hosted ones (`web_search_preview_2025_03_11` counts as web_search)."""
    return kind.startswith(HOSTED_TOOLS) or kind == "shell"


# -- input items --------------------------------------------------------------------------------------------
TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text")


class ContentPartIn(OpenAIIn):
    # Any type is read (an image gets a clear refusal below); /docs lists the ones that are served.
    type: Annotated[str, Field(json_schema_extra={"enum": list(TEXT_PARTS)})]
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPartIn:
        if self.type not in TEXT_PARTS:
            raise ValueError(f"content of type {self.type} is not supported: the models of this gateway read text")
        if self.type == "refusal" and self.refusal is None and self.text is None:
            raise ValueError("a refusal part needs refusal")
        if self.type != "refusal" and self.text is None:
            raise ValueError(f"a {self.type} part needs text")
        return self

    def as_text(self) -> str:
        return self.text if self.text is not None else self.refusal or ""


Content = str | Annotated[list[ContentPartIn], Field(max_length=1024)]


class MessageItem(OpenAIIn):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: str | None = None
    status: str | None = None


class FunctionCallItem(OpenAIIn):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=128)]
    name: Annotated[str, Field(min_length=1, max_length=128)]
    arguments: str
    id: str | None = None
    status: str | None = None


class CustomToolCallItem(OpenAIIn):
    type: Literal["custom_tool_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=128)]
    name: Annotated[str, Field(min_length=1, max_length=128)]
    input: str
    id: str | None = None


class ToolOutputItem(OpenAIIn):
    """A function_call_output or custom_tool_call_output: what the client's tool gave back."""

    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: Annotated[str, Field(min_length=1, max_length=128)]
    output: Content
    id: str | None = None
    status: str | None = None


class ReasoningItem(OpenAIIn):
    """Accepted (clients send back what a reasoning model gave them) and not shown to the model."""

    type: Literal["reasoning"]
    id: str | None = None


class McpListToolsItem(OpenAIIn):
    type: Literal["mcp_list_tools"]
    server_label: str
    tools: list[dict[str, Any]] = []
    id: str | None = None


class McpCallItem(OpenAIIn):
    type: Literal["mcp_call"]
    server_label: str
    name: str
    arguments: str = ""
    output: str | None = None
    error: str | dict[str, Any] | None = None
    id: str | None = None


def _item_kind(value: Any) -> str:
    return str(value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message"))


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[CustomToolCallItem, Tag("custom_tool_call")]
    | Annotated[ToolOutputItem, Tag("function_call_output")]
    | Annotated[ToolOutputItem, Tag("custom_tool_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[McpListToolsItem, Tag("mcp_list_tools")]
    | Annotated[McpCallItem, Tag("mcp_call")],
    Discriminator(_item_kind),
]


# -- tools --------------------------------------------------------------------------------------------------
class FunctionToolIn(OpenAIIn):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _bounded = field_validator("parameters")(classmethod(lambda cls, v: _schema_bounded(v)))


class CustomToolIn(OpenAIIn):
    """A free-text tool (coding agents' kind): offered to the model as a function taking one string, `input`.
    A `format` (a grammar) is passed over: the input is not held to it."""

    type: Literal["custom"]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    format: dict[str, Any] | None = None


class HostedToolIn(OpenAIIn):
    """One of OpenAI's hosted tools (HOSTED_TOOLS): accepted, not offered to the model, named in a header."""

    type: Annotated[str, Field(json_schema_extra={"enum": list(HOSTED_TOOLS)})]


def _tool_kind(value: Any) -> str:
    kind = str(value.get("type", "") if isinstance(value, dict) else getattr(value, "type", ""))
    return "hosted" if hosted(kind) else kind


ToolIn = Annotated[
    Annotated[FunctionToolIn, Tag("function")]
    | Annotated[CustomToolIn, Tag("custom")]
    | Annotated[McpTool, Tag("mcp")]
    | Annotated[HostedToolIn, Tag("hosted")],
    Discriminator(_tool_kind),
]


class ToolChoiceIn(OpenAIIn):
    """A named tool ({"type": "function" | "custom", "name"}, {"type": "mcp", "server_label", "name"}), a hosted
    type (then "auto"), or {"type": "allowed_tools", "mode", "tools"}."""

    type: Annotated[str, Field(json_schema_extra={"enum": ["function", "custom", "mcp", "allowed_tools",
                                                          *HOSTED_TOOLS]})]
    name: str | None = None
    server_label: str | None = None
    mode: Literal["auto", "required"] | None = None
    tools: list[dict[str, Any]] | None = None


# -- text format --------------------------------------------------------------------------------------------
class TextFormatIn(OpenAIIn):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    _bounded = field_validator("schema_")(classmethod(lambda cls, v: _schema_bounded(v)))

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormatIn:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a format of type json_schema needs schema")
        return self

    def response_format(self) -> dict[str, Any] | None:
        """The chat completion's response_format for it."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        spec = JsonSchemaSpec(name=self.name, schema=self.schema_ or {}, strict=self.strict)
        return {"type": "json_schema", "json_schema": spec.model_dump(by_alias=True, exclude_none=True)}


class TextIn(OpenAIIn):
    format: TextFormatIn | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningIn(OpenAIIn):
    effort: str | None = None
    summary: str | None = None


# -- the request ----------------------------------------------------------------------------------------------
def _input_required(schema: dict[str, Any]) -> None:
    schema["required"] = [*schema.get("required", ()), "input"]
    schema["properties"]["input"]["description"] = "required unless previous_response_id is given"


class ResponseIn(OpenAIIn):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_input_required)

    model: Annotated[str, Field(min_length=1, max_length=200)]
    input: Annotated[str, Field(max_length=8 * 1024 * 1024)] | Annotated[
        list[InputItem], Field(max_length=MAX_INPUT_ITEMS)] = ""
    instructions: str | None = None
    previous_response_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    tools: Annotated[list[ToolIn], Field(max_length=256)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceIn | None = None
    parallel_tool_calls: bool | None = None
    text: TextIn | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    user: str | None = None
    reasoning: ReasoningIn | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=0, description="0: logprobs are not supported yet")] | None = None
    prompt: Annotated[None, Field(description="not supported: reusable prompts live on OpenAI's platform")] = None

    @field_validator("max_output_tokens")
    @classmethod
    def _token_count(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= _max_tokens_limit():
            raise ValueError(f"must be between 1 and {_max_tokens_limit()}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and (len(value) > MAX_METADATA_KEYS or any(len(k) > 64 for k in value)):
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys of at most 64 characters")
        return value

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value:
            raise ValueError("logprobs are not supported by this gateway yet")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_prompt(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("reusable prompts are not supported by this gateway; send instructions and input")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ResponseIn:
        if self.background and not self.store:
            raise ValueError("background responses must be stored: store cannot be false with background")
        if isinstance(self.input, str) and not self.input and self.previous_response_id is None:
            raise ValueError("input is required")
        return self

    def items(self) -> list[Any]:
        """The input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)] if self.input else []
        return list(self.input)


# -- answers (for /docs; built as plain dicts) --------------------------------------------------------------
class OutputTextOut(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class OutputItemOut(BaseModel):
    """An item of `output`: a message, a function_call, a custom_tool_call, an mcp_list_tools or an mcp_call."""

    id: str
    type: Literal["message", "function_call", "custom_tool_call", "mcp_list_tools", "mcp_call"]
    status: str | None = None
    role: Literal["assistant"] | None = None
    content: list[OutputTextOut] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    input: str | None = None
    server_label: str | None = None
    tools: list[dict[str, Any]] | None = None
    output: str | None = None
    error: str | None = None


class InputTokensDetailsOut(BaseModel):
    cached_tokens: int


class OutputTokensDetailsOut(BaseModel):
    reasoning_tokens: int


class ResponseUsageOut(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetailsOut
    output_tokens: int
    output_tokens_details: OutputTokensDetailsOut
    total_tokens: int


class ResponseErrorOut(BaseModel):
    code: str
    message: str


class ResponseOut(BaseModel):
    """With `stream: true` the answer is `text/event-stream` instead: OpenAI's events (`response.created`, ...,
    `response.completed`), each with a `sequence_number`, and no `[DONE]`."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    background: bool
    model: str
    output: list[OutputItemOut]
    usage: ResponseUsageOut | None
    error: ResponseErrorOut | None
    incomplete_details: dict[str, str] | None
    instructions: str | None
    previous_response_id: str | None
    store: bool
    metadata: dict[str, str]
    tools: list[dict[str, Any]]
    tool_choice: Any
    parallel_tool_calls: bool
    text: dict[str, Any]
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    truncation: str
    user: str | None


class ResponseDeletedOut(BaseModel):
    id: str
    object: Literal["response"]
    deleted: bool


class InputItemListOut(BaseModel):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
