"""The OpenAI-compatible endpoints: completions, chat completions, models."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, get, post
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import Stream

from .auth import Principal, provide_principal, require_key
from .errors import describe
from .generation import Run, completion_jobs, drain, echo_texts, off_loop, submit_chat, unless_gone
from .metrics import MODEL_SCOPE_KEY
from .openai_schemas import (
    MODEL_MAX_LEN,
    MODEL_PATTERN,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from .responses import ChunkWriter, chat_body, chunk_stream, completion_body
from .services import Services, error_responses

GENERATION_ERRORS = error_responses(400, 401, 403, 404, 409, 429, 503)
ModelPath = Annotated[str, Parameter(description="A model id from GET /v1/models, or a combination of adapters.",
                                     min_length=1, max_length=MODEL_MAX_LEN, schema_extra={"pattern": MODEL_PATTERN})]
SSE_NOTE = " With `stream: true` the answer is `text/event-stream`: one `data: <chunk>` per event, then `data: [DONE]`."


class OpenAIController(Controller):
    path = "/v1"
    tags = ["OpenAI-compatible"]
    guards = [require_key]
    dependencies = {"principal": Provide(provide_principal)}
    request_max_body_size = 32 << 20  # prompts, not uploads

    @post("/completions", status_code=200, summary="Complete a prompt with the base, an adapter or a full model",
          description="OpenAI's completions API." + SSE_NOTE,
          responses={200: ResponseSpec(CompletionResponse, description="The completion (or its chunks)."),
                     **GENERATION_ERRORS})
    async def completions(self, request: Request, data: CompletionRequest, principal: Principal,
                          services: Services) -> Response:
        target = await services.catalog.resolve(data.model, principal)
        request.scope[MODEL_SCOPE_KEY] = target.ref  # type: ignore[literal-required]
        data = data.model_copy(update={"cache_salt": principal.cache_salt(data.cache_salt)})
        jobs = completion_jobs(data, target)
        run = Run(services.engine, services.metrics, target, "completions")
        echoes = await off_loop(lambda: echo_texts(services.engine, jobs)) if data.echo else None
        await run.submit(jobs, n=data.n, echoes=echoes)
        if data.stream:
            return await _stream(request, run, ChunkWriter(run, chat=False, include_usage=data.include_usage()), services)
        await unless_gone(request, run, drain(run))
        return Response(completion_body(run))

    @post("/chat/completions", status_code=200, summary="Answer a conversation (the model's chat template)",
          description="OpenAI's chat completions API." + SSE_NOTE,
          responses={200: ResponseSpec(ChatCompletionResponse, description="The answer (or its chunks)."),
                     **GENERATION_ERRORS})
    async def chat_completions(self, request: Request, data: ChatCompletionRequest, principal: Principal,
                               services: Services) -> Response:
        target = await services.catalog.resolve(data.model, principal)
        request.scope[MODEL_SCOPE_KEY] = target.ref  # type: ignore[literal-required]
        data = data.model_copy(update={"cache_salt": principal.cache_salt(data.cache_salt)})
        run = Run(services.engine, services.metrics, target, "chat")
        # A chat without max_tokens gets the server's default, kept to half the context so that ordinary
        # prompts fit; a longer prompt gets the rest of the context (submit_chat).
        default = min(services.settings.default_max_tokens, max(1, services.engine.max_model_len // 2))
        await submit_chat(run, data, target, default)
        if data.stream:
            return await _stream(request, run, ChunkWriter(run, chat=True, include_usage=data.include_usage()), services)
        await unless_gone(request, run, drain(run))
        return Response(chat_body(run))

    @get("/models", summary="List what `model` may name: the base, adapters (with versions and aliases), full models",
         responses=error_responses(401, 503))
    async def list_models(self, principal: Principal, services: Services) -> ModelList:
        return ModelList(data=await services.catalog.model_cards(principal))

    @get("/models/{model:str}", summary="Describe one model id", responses=error_responses(400, 401, 403, 404, 503))
    async def get_model(self, model: ModelPath, principal: Principal, services: Services) -> ModelCard:
        return await services.catalog.model_card(model, principal)


async def _stream(request: Request, run: Run, writer: ChunkWriter, services: Services) -> Stream:
    """Wait for the first event before answering 200, so that a refusal found at load (an adapter that
    cannot be applied, say) is still an HTTP error; later errors become an error event in the stream."""
    events = run.events()
    try:
        first = await unless_gone(request, run, anext(events, None))
    except BaseException:
        run.cancel()
        raise
    path = request.url.path
    on_error = lambda exc: services.metrics.failed(run.target.ref, describe(exc, path)[0])  # noqa: E731
    return Stream(chunk_stream(writer, first, events, path, on_error), media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
