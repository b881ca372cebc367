"""Request and response bodies of the OpenAI-compatible endpoints (pydantic: the HTTP edge).

Fields follow OpenAI's API; unknown fields are ignored (new client versions send more), but a known
field whose meaning hotswap cannot honour (logprobs, tools, penalties, ...) is refused with a 400 that
names it, never silently dropped. vLLM's extensions ``top_k``, ``repetition_penalty`` and
``ignore_eos`` are accepted too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_CHOICES = 16  # n x prompts per request
ModelRef = Annotated[str, Field(min_length=1, max_length=200, description=(
    "What serves the request: the base's name, an adapter (`sql`, `sql@3`, `sql@prod`) or a full model's name."))]


def _unsupported(field: str, value: Any, allowed: Any = None) -> Any:
    if value not in (None, allowed):
        raise ValueError(f"{field} is not supported by hotswap (leave it unset)")
    return value


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with the usage counts and no choices.")


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: ModelRef
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; default 1 (off).")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate for each prompt.")
    stream: bool = Field(False, description="Answer with server-sent events ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="Up to 16 stop strings; the matched string is not returned.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed, same sample.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: leave unset or empty.")
    user: str | None = Field(None, max_length=256, description="Ignored.")
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens; 0 or -1 is off.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="1 is off (HF semantics).")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        if value == "":
            raise ValueError("a stop string must not be empty")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _zero_penalty(cls, value: float | None, info) -> float | None:
        if value not in (None, 0.0):
            raise ValueError(f"{info.field_name} is not supported by hotswap (use repetition_penalty)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        return _unsupported("logit_bias", value or None)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
             | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
             | Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]], Field(min_length=1)]) = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists.")
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate at most; default 16.")
    echo: bool = Field(False, description="Return the prompt before the completion (text prompts only).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Not supported: leave unset.")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Only 1 is supported.")
    suffix: str | None = Field(None, description="Not supported: leave unset.")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        return _unsupported("logprobs", value)

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        return _unsupported("best_of", value, allowed=1)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _unsupported("suffix", value or None)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text, or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, description="Ignored.")

    def as_dict(self) -> dict[str, str]:
        """The message for the chat template: `developer` is read as `system`, parts are joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = Field(description="Only plain text output is supported.")


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (the server's default if unset).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens (newer name).")
    logprobs: bool | None = Field(None, description="Not supported: leave unset or false.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Not supported: leave unset.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: leave unset or empty.")
    tool_choice: Literal["none", "auto"] | None = Field(None, description="With no tools, only none/auto.")
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = Field(True, description="Open an assistant turn after the messages.")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        return _unsupported("logprobs", value or None)

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        return _unsupported("top_logprobs", value or None)

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        return _unsupported("tools", value or None)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses ---------------------------------------------------------------------------------
FinishReasonOut = Literal["stop", "length", "cancelled"]


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReasonOut | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str = Field(description="The exact version that served the request, name@version.")
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = Field(None, description="Digest of the entry that served the request.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReasonOut


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(description="The exact version that served the request, name@version.")
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReasonOut | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    """One entry of GET /v1/models, shaped as vLLM gives it (`parent` is the base of an adapter)."""

    id: str = Field(description="What to pass as `model`.")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hotswap"
    root: str = Field(description="The exact version `id` names now, name@version.")
    parent: str | None = Field(None, description="For adapters: the base they apply to.")
    max_model_len: int | None = None
    kind: Literal["base", "adapter", "model"]
    versions: list[int] = Field(default_factory=list, description="On a bare name's card: every servable version.")
    aliases: dict[str, int] = Field(default_factory=dict, description="On a bare name's card: alias -> version.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail
