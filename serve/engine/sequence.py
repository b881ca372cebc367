"""One request's state inside the engine (engine thread only)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .detok import Detokenizer
from .requests import Classification, RequestStream, SamplingParams, Target


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    target: Target
    prompt_len: int
    token_ids: list[int]  # prompt + generated
    sampling: SamplingParams
    stream: RequestStream
    detok: Detokenizer
    eos_ids: frozenset[int]
    generator: torch.Generator | None = None
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    slot: int = -1  # adapter slot while running; -1: bare base (or a full model)
    pinned: bool = False  # holds a pin on its adapter
    owner: object = None  # the Scheduler holding it (None: waiting for its model to load)
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    # with sampling.prompt_logprobs: entries of the prompt tokens scored so far (the first has no
    # logprob), handed out with the first generated token
    prompt_logprobs: list | None = None
    # prefix caching: what keys this sequence's KV (version digest and salt), the hashes of its full
    # blocks so far, how many of them are registered, and the prompt tokens found cached when it started
    cache_key: bytes = b""
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    cached_tokens: int | None = None
    classify: bool = False  # a classification request (see classify.py)
    classification: Classification | None = None  # its result, once its prompt is computed

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_pending(self) -> int:
        """Tokens known but not in the cache yet (the prompt's rest, or the last sampled token)."""
        return len(self.token_ids) - self.num_computed

    @property
    def max_total(self) -> int:
        return self.prompt_len + self.sampling.max_tokens
