"""The public engine: submit requests from any thread or event loop; a background thread steps the model."""

from __future__ import annotations

import threading
import uuid

import torch

from .classify import CLASSIFY_SAMPLING, NO_HEAD, head_mismatch, pooled_prompt
from .config import EngineConfig
from .core import Core
from .detok import Detokenizer
from .errors import EngineError, EngineNotReady, InvalidRequest, QueueFull
from .intake import check_fits, check_logit_bias, check_sampling, prompt_ids
from .lifecycle import Lifecycle
from .requests import Completion, GenerationRequest, Logprob, RequestStream, Target, Tokenized, TokenLogprobs
from .residency_commands import ResidencyCommands
from .sampler import token_piece
from .sequence import Sequence
from .stats import EngineStats, StatsRecorder
from .worker import Worker


class Engine(Lifecycle, ResidencyCommands):
    """One frozen base with per-request adapters in shared batches, plus full models on demand.

    Usage::

        engine = Engine(Registry(home), "smollm2", EngineConfig())
        await engine.start()
        stream = engine.submit(GenerationRequest(prompt="hi", model="sql@prod"))
        async for event in stream: ...
        await engine.stop()
    """

    def __init__(self, registry, base_ref: str, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.registry = registry
        self._base_ref = base_ref
        self._recorder = StatsRecorder()
        self._lock = threading.Lock()
        self._num_queued = 0  # submitted, not yet running (for QueueFull)
        self._init_lifecycle()

    @property
    def base(self) -> Target:
        return self._require_ready().base.target

    @property
    def tokenizer(self):
        """The base's tokenizer (chat template included)."""
        return self._require_ready().base.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._require_ready().base.max_model_len

    @property
    def lora_kernels(self) -> str:
        """What computes the base's adapter rows: "native" (the CPU kernels), "triton" (GPU decode
        steps; prefill gathers) or "torch" (gather + batched matmuls)."""
        runner = self._require_ready().base.runner
        return "native" if runner.lora.kernels is not None else "triton" if runner.triton is not None else "torch"

    # --- requests -------------------------------------------------------------------
    def resolve(self, model: str | None) -> Target:
        """Resolve a reference through the registry now (aliases are read at call time)."""
        self._require_ready()
        return self.resolver.resolve(model)

    def tokenize(self, request: GenerationRequest) -> Tokenized:
        """The prompt of ``request`` (text, chat messages rendered with the template, or ids) as the
        model it names would read it; nothing is queued and sampling is not looked at."""
        base = self._require_ready().base
        target = self.resolver.resolve(request.model)
        tokenizer, limit = self._tokenizer_of(target, base)
        ids = prompt_ids(tokenizer, request, len(tokenizer), limit)
        return Tokenized(target, tuple(ids), tuple(tokenizer.convert_ids_to_tokens(ids)), limit)

    def detokenize(self, model: str | None, token_ids: list[int]) -> tuple[Target, str]:
        """The text of ``token_ids`` under the tokenizer of the model ``model`` names."""
        base = self._require_ready().base
        target = self.resolver.resolve(model)
        tokenizer, _ = self._tokenizer_of(target, base)
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < len(tokenizer)]
        if bad:
            raise InvalidRequest(f"token ids outside [0, {len(tokenizer)}): {bad[:5]}", param="tokens")
        return target, tokenizer.decode(token_ids)

    def _tokenizer_of(self, target: Target, base: Worker):
        """(tokenizer, context length) of what serves ``target``: the base's for the base and its
        adapters, a full model's own."""
        if target.kind == "model":
            info = self.resolver.model_info(target, self.config)
            return info.tokenizer, info.max_model_len
        return base.tokenizer, base.max_model_len

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate, resolve and queue a request; returns at once. Raises the engine's typed errors.

        Errors found later (an adapter refused when its files are read) end the stream by raising.
        """
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[GenerationRequest]) -> list[RequestStream]:
        """Submit several requests that join the running batch at the same step (all or none:
        if one is refused, none is queued)."""
        core = self._require_ready()  # this one throughout, should stop() clear the engine's meanwhile
        prepared: list[Sequence] = []
        try:
            try:
                for request in requests:
                    prepared.append(self._prepare(request, core))
            except EngineError as exc:
                self._recorder.incr("requests_rejected", type(exc).__name__)
                raise
            for seq in prepared:
                if seq.target.kind == "adapter":
                    core.residency.request(seq.target.ref, seq.target.digest)
                elif seq.target.kind == "model":
                    core.models.request(seq.target.ref, seq.target.digest,
                                        self.resolver.model_info(seq.target, self.config).estimate_bytes)
                self._recorder.count_submit(seq.prompt_len)

            def admit() -> None:
                for seq in prepared:
                    core.admit(seq)
            admit.seqs = prepared  # type: ignore[attr-defined]  # failed by Core.abort if never run
            core.post(admit)
        except BaseException as exc:
            for seq in prepared:
                self._unqueue()
            if core.dead is not None and not isinstance(exc, EngineError):  # a loader closed by a stop meanwhile
                raise EngineNotReady(f"the engine is not running ({core.dead})") from exc
            raise
        return [seq.stream for seq in prepared]

    def _prepare(self, request: GenerationRequest, core: Core) -> Sequence:
        cfg = self.config
        p = CLASSIFY_SAMPLING if request.classify else request.sampling
        if not request.classify:
            check_sampling(p, cfg.max_tokens_limit)
        target = self.resolver.resolve(request.model)
        if request.classify and target.kind == "base":
            raise InvalidRequest(f"{target.ref} is a base: {NO_HEAD}", param="model")
        base = core.base
        tokenizer, limit, fits_kv = base.tokenizer, base.max_model_len, base.fits_kv
        pad_id, vocab = base.runner.config.pad_token_id, base.runner.embed.shape[0]
        if target.kind == "model":
            info = self.resolver.model_info(target, cfg)
            if (mismatch := head_mismatch(target.ref, "model", request.classify, info.labels is not None)) is not None:
                raise mismatch
            core.models.check_fits(target.ref, info.estimate_bytes)
            tokenizer, limit, fits_kv, pad_id = info.tokenizer, info.max_model_len, info.fits_kv, info.pad_token_id
            vocab = info.vocab_size
        # the ids its tokenizer knows and its embedding holds (either may be the larger)
        vocab = min(len(tokenizer), vocab)
        ids = prompt_ids(tokenizer, request, vocab, limit)
        if request.classify:
            ids = pooled_prompt(ids, pad_id)
        check_logit_bias(p, vocab)
        check_fits(len(ids), p.max_tokens, limit, fits_kv)
        with self._lock:
            if self._num_queued >= cfg.max_queue:
                raise QueueFull(f"the queue is full: {self._num_queued} requests waiting (max_queue {cfg.max_queue}); retry later")
            self._num_queued += 1
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        stream = RequestStream(rid, target, len(ids), self._cancel_stream, self._thread)
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=cfg.torch_device()).manual_seed(p.seed)
        scored = None
        if p.prompt_logprobs is not None:  # nothing predicts the first prompt token: its entry has no value
            text, raw = token_piece(tokenizer, ids[0])
            scored = [TokenLogprobs(Logprob(ids[0], text, None, raw), ())]
        return Sequence(request_id=rid, target=target, prompt_len=len(ids), token_ids=ids, sampling=p,
                        stream=stream, detok=Detokenizer(tokenizer, p.stop), eos_ids=frozenset(),
                        generator=generator, prompt_logprobs=scored, classify=request.classify,
                        cache_key=f"{target.digest}\0{request.cache_salt or ''}".encode())

    def _unqueue(self) -> None:
        with self._lock:
            self._num_queued -= 1

    async def generate(self, request: GenerationRequest) -> Completion:
        """``submit`` and wait for the whole completion."""
        return await self.submit(request).collect()

    def generate_sync(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Submit all, then wait for all (callers without an event loop: benchmarks, scripts)."""
        return [s.result() for s in self.submit_many(requests)]

    def cancel(self, request_id: str) -> None:
        """Stop a request; its KV blocks and adapter pin are freed before the next step."""
        self._cancel(request_id, None)

    def _cancel_stream(self, stream: RequestStream) -> None:
        """``stream.cancel()``: that request only, not one that holds its request_id (this one refused as a
        duplicate, but not yet told so)."""
        self._cancel(stream.request_id, stream)

    def _cancel(self, request_id: str, stream: RequestStream | None) -> None:
        core = self._core
        if core is not None and core.dead is None:  # a dead or stopped loop has ended every stream already
            try:
                core.post(lambda: core.cancel(request_id, stream))
            except EngineNotReady:  # the loop ended since: it ended the stream too
                pass

    # --- metrics --------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self._recorder.snapshot()
