"""Request and response bodies of the OpenAI-compatible endpoints (pydantic: the HTTP edge).

Fields follow OpenAI's API; unknown fields are ignored (new client versions send more), but a known
field whose meaning hotswap cannot honour (tools, best_of, suffix, ...) is refused with a 400 that names
it, never silently dropped. vLLM's extensions ``top_k``, ``repetition_penalty`` and
``ignore_eos`` are accepted too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter

from ..engine import MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOPS
from ..lora.compose import MAX_PARTS
from .logprobs import ChatLogprobs, CompletionLogprobs

MAX_CHOICES = 128  # n x prompts per request (OpenAI's bound on n); more waits in the engine's queue
# The registry's reference grammar (hub.refs), for the schema; requests are checked by hub.parse_ref.
NAME_PATTERN = r"^(?!.*\.\.)[a-z0-9][a-z0-9._-]{0,63}$"
REF_PATTERN = r"^(?!.*\.\.)[a-z0-9][a-z0-9._-]{0,63}(@([1-9][0-9]{0,17}|(?![0-9]+$)[a-z0-9][a-z0-9._-]{0,63}))?$"
# `model` may also combine up to MAX_PARTS adapters, each a whole reference with a weight (`sql*0.7+extract@2*0.3`):
# one reference's 129 characters would refuse most combinations of eight.
_PART = rf"{REF_PATTERN[1:-1]}(\*[^*+]{{1,32}})?"
MODEL_PATTERN = rf"^{_PART}(\+{_PART}){{0,{MAX_PARTS - 1}}}$"
MODEL_MAX_LEN = MAX_PARTS * (129 + 1 + 32) + MAX_PARTS - 1
ModelRef = Annotated[str, Field(min_length=1, max_length=MODEL_MAX_LEN, json_schema_extra={"pattern": MODEL_PATTERN}, description=(
    "What serves the request: the base's name, an adapter (`sql`, `sql@3`, `sql@prod`), a full model's name, "
    "or a weighted combination of adapters (`sql*0.7+extract@2*0.3`)."))]


def Unsupported(field: str, *neutral: Any, hint: str = "leave it unset") -> Any:
    """An OpenAI field hotswap cannot honour: its schema admits only null; a neutral value (false, 0, an
    empty list) is read as null, anything else is refused with a message naming the field."""

    def check(value: Any) -> None:
        if value is None or any(value == n and type(value) is type(n) for n in neutral):
            return None
        raise ValueError(f"{field} is not supported by hotswap ({hint})")

    return Annotated[None, BeforeValidator(check), Field(description=f"Not supported: {hint}.")]


def NullIs(kind: Any, default: Any) -> Any:
    """A field OpenAI's reference marks nullable (`"n": null`, `"stream": null`): clients that fill every
    parameter send null for "not given", so null reads as the default instead of failing validation."""
    return Annotated[kind, BeforeValidator(lambda value: default if value is None else value)]


def _bound(**schema: float) -> dict[str, Any]:
    """Zero bounds for the OpenAPI schema (the schema generator drops bounds that are 0)."""
    return {"json_schema_extra": schema}


def union_schema(union: Any) -> dict[str, Any]:
    """The alternatives of a union as pydantic sees them, constraints included, for the OpenAPI schema
    (the generator drops the constraints inside union members, and fuzzers rely on them)."""
    return {"json_schema_extra": {"one_of": TypeAdapter(union).json_schema()["anyOf"]}}


def list_of(item: Any) -> Any:
    return Annotated[list[item], Field(min_length=1, max_length=MAX_CHOICES)]


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TextPrompt = Annotated[str, Field(min_length=1)]
TokenPrompt = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = TextPrompt | list_of(TextPrompt) | TokenPrompt | list_of(TokenPrompt)
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None
LogitBias = dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]]


class StreamOptions(BaseModel):
    include_usage: NullIs(bool, False) = Field(False, description=(
        "Send a last chunk with the usage counts and no choices."))


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: ModelRef
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.", **_bound(minimum=0))
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; default 1 (off).",
                                **_bound(exclusive_minimum=0))
    n: NullIs(int, 1) = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate for each prompt.")
    stream: NullIs(bool, False) = Field(False, description="Answer with server-sent events ending with `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    stop: Stop = Field(None, description=(f"Up to {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters; "
                                          "the matched string is not returned."), **union_schema(Stop))
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed, same sample.", **_bound(minimum=0))
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description=(
        "Subtracted once from the logit of every token already generated; default 0."))
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description=(
        "Subtracted from a token's logit once per time it was generated; default 0."))
    logit_bias: LogitBias | None = Field(None, max_length=300, description=(
        "Token id (as a string) -> bias in [-100, 100] added to its logit before sampling."))
    user: str | None = Field(None, max_length=256, description="Ignored.")
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens; 0 or -1 is off.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="1 is off (HF semantics).",
                                             **_bound(exclusive_minimum=0))
    ignore_eos: NullIs(bool, False) = Field(False, description="Keep generating past the end-of-sequence token.")
    min_tokens: NullIs(int, 0) = Field(0, ge=0, description="Do not end before this many tokens (EOS is held back).",
                                       **_bound(minimum=0))
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description=(
        "Prompt prefixes are reused only between requests of the same API key with the same salt (keys never "
        "share them, so no tenant learns, by timing, which prompts another sent)."))

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def split_prompt(p: Any) -> list[str | list[int]]:
    """A ``Prompt`` value as a list of single prompts (text, or token ids)."""
    if isinstance(p, str):
        return [p]
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return list(p)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt = Field(description="A string, a list of strings, a list of token ids, or a list of token-id lists.",
                           **union_schema(Prompt))
    max_tokens: int | None = Field(16, ge=0, description=(
        "Tokens to generate at most; default 16. 0 only with echo and logprobs: the prompt is scored, "
        "nothing generated."), **_bound(minimum=0))
    echo: NullIs(bool, False) = Field(False, description=(
        "Return the prompt before the completion (token ids as the model's tokenizer decodes them)."))
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "Return each token's log-probability and those of this many most likely tokens."), **_bound(minimum=0))
    best_of: Unsupported("best_of", 1, hint="leave it unset or 1") = None
    suffix: Unsupported("suffix", "") = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text, or token ids)."""
        return split_prompt(self.prompt)


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
    logprobs: NullIs(bool, False) = Field(False, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "With logprobs: also this many most likely tokens at each position."), **_bound(minimum=0))
    tools: Unsupported("tools", [], hint="leave it unset or empty") = None
    tool_choice: Literal["none", "auto"] | None = Field(None, description="With no tools, only none/auto.")
    response_format: ResponseFormat | None = None
    add_generation_prompt: NullIs(bool, True) = Field(True, description=(
        "Open an assistant turn after the messages."))

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses ---------------------------------------------------------------------------------
FinishReasonOut = Literal["stop", "length", "cancelled"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV came from the prefix cache.")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    labels: list[str] | None = Field(None, description="For a classifier (answers /v1/classify, not generation): "
                                     "its label names, in the order of a classification's `probs`.")


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
