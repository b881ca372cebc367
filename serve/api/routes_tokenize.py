"""vLLM's /tokenize and /detokenize: a prompt's tokens as the model a request names would read them, so
a client can count tokens against the context or check a chat template's rendering."""

from __future__ import annotations

from litestar import Controller, post
from litestar.di import Provide
from pydantic import BaseModel, ConfigDict, Field

from ..engine import GenerationRequest
from .auth import Principal, provide_principal, require_key
from .exceptions import ApiProblem
from .generation import off_loop
from .openai_schemas import ChatMessage, ModelRef
from .services import Services, error_responses

MAX_DETOKENIZE = 1 << 16


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: ModelRef
    prompt: str | None = Field(None, description="A text to tokenize (give this or `messages`).")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description=(
        "A conversation, rendered with the chat template of the model that `model` names."))
    add_generation_prompt: bool = Field(True, description="With messages: open an assistant turn after them.")
    return_token_strs: bool = Field(False, description="Also return each token's string in the vocabulary.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="Context length of the model that would read these tokens.")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: ModelRef
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE, description="Token ids to turn back into text.")


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizeController(Controller):
    path = "/"
    tags = ["Tokens"]
    guards = [require_key]
    dependencies = {"principal": Provide(provide_principal)}
    request_max_body_size = 32 << 20

    @post("/tokenize", status_code=200, summary="A prompt's token ids, as the named model would read it",
          responses=error_responses(400, 401, 403, 404, 503))
    async def tokenize(self, data: TokenizeRequest, principal: Principal, services: Services) -> TokenizeResponse:
        if (data.prompt is None) == (data.messages is None):
            raise ApiProblem("give exactly one of prompt or messages", "messages" if data.messages else "prompt")
        target = await services.catalog.resolve(data.model, principal)
        messages = None if data.messages is None else [m.as_dict() for m in data.messages]
        request = GenerationRequest(prompt=data.prompt, messages=messages, model=target.ref,
                                    add_generation_prompt=data.add_generation_prompt)
        found = await off_loop(lambda: services.engine.tokenize(request))
        return TokenizeResponse(count=len(found.token_ids), max_model_len=found.max_model_len,
                                tokens=list(found.token_ids),
                                token_strs=list(found.token_strs) if data.return_token_strs else None)

    @post("/detokenize", status_code=200, summary="The text of token ids, under the named model's tokenizer",
          responses=error_responses(400, 401, 403, 404, 503))
    async def detokenize(self, data: DetokenizeRequest, principal: Principal,
                         services: Services) -> DetokenizeResponse:
        target = await services.catalog.resolve(data.model, principal)
        _, text = await off_loop(lambda: services.engine.detokenize(target.ref, data.tokens))
        return DetokenizeResponse(prompt=text)
