"""vLLM's /classify: a sequence classifier's labels for one or more texts.

The classifier is an adapter (PEFT ``task_type`` SEQ_CLS, its head saved beside its LoRA), which runs
in the same batches as generation, or a full fine-tuned sequence-classification model (registry kind
model), served beside the base. Each input's answer is the head's softmax over the labels, read at
its last token that is not padding, as transformers' sequence classifiers read it."""

from __future__ import annotations

from typing import Literal

from litestar import Controller, Request, post
from litestar.di import Provide
from pydantic import BaseModel, ConfigDict, Field

from ..engine import GenerationRequest
from .auth import Principal, provide_principal, require_key
from .generation import Run, drain, unless_gone
from .metrics import MODEL_SCOPE_KEY
from .openai_schemas import ModelRef, Prompt, UsageInfo, split_prompt, union_schema
from .responses import usage_info
from .services import Services, error_responses


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: ModelRef
    input: Prompt = Field(description="A text, a list of texts, a list of token ids, or a list of token-id lists.",
                          **union_schema(Prompt))
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description=(
        "Prefix caching: inputs share computed prefixes only with requests of the same API key and salt."))

    def inputs(self) -> list[str | list[int]]:
        return split_prompt(self.input)


class ClassifyResult(BaseModel):
    index: int
    label: str = Field(description="The most likely label.")
    probs: list[float] = Field(description="The probability of every label, in the head's order.")
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str = Field(description="The adapter or model version that answered, name@version.")
    data: list[ClassifyResult]
    usage: UsageInfo


class ClassifyController(Controller):
    path = "/"
    tags = ["Classification"]
    guards = [require_key]
    dependencies = {"principal": Provide(provide_principal)}
    request_max_body_size = 32 << 20

    @post(["/classify", "/v1/classify"], status_code=200,
          summary="Label texts with a sequence classifier: a PEFT SEQ_CLS adapter or a full classification model",
          responses=error_responses(400, 401, 403, 404, 409, 429, 503))
    async def classify(self, request: Request, data: ClassifyRequest, principal: Principal,
                       services: Services) -> ClassifyResponse:
        target = await services.catalog.resolve(data.model, principal)
        request.scope[MODEL_SCOPE_KEY] = target.ref  # type: ignore[literal-required]
        salt = principal.cache_salt(data.cache_salt)
        jobs = [GenerationRequest(prompt=x, model=target.ref, classify=True, cache_salt=salt)
                if isinstance(x, str) else
                GenerationRequest(prompt_token_ids=x, model=target.ref, classify=True, cache_salt=salt)
                for x in data.inputs()]
        run = Run(services.engine, services.metrics, target, "classify")
        await run.submit(jobs)
        await unless_gone(request, run, drain(run))
        results = [ClassifyResult(index=i, label=c.label, probs=list(c.probs), num_classes=len(c.labels))
                   for i, c in enumerate(choice.classification for choice in run.choices)]
        return ClassifyResponse(id=f"classify-{run.id_suffix}", created=run.created, model=target.ref, data=results,
                                usage=usage_info(run.usage()))
