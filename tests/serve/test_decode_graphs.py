"""Bucketed decode steps (what a GPU replays from CUDA graphs), run eagerly on the CPU against PEFT."""

from __future__ import annotations

import pytest

from hotswap.serve.engine import GenerationRequest, SamplingParams
from hotswap.serve.engine.decode_graphs import batch_bucket, rank_bucket

from .engine_support import (ADAPTERS, PROMPTS, peft_greedy, peft_rows, preload, prompt_requests,  # noqa: F401
                             start_engine, tiny_tokenizer, world)

NEW = 8


def test_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 9, 16, 17, 33)] == [1, 2, 4, 8, 16, 16, 32, 48]
    assert [rank_bucket(r) for r in (0, 1, 8, 9, 16, 17, 64)] == [0, 8, 8, 16, 16, 32, 64]


@pytest.fixture
def bucketed(world):
    eng = start_engine(world.home, decode_graphs=True, native_kernels=False)
    yield eng
    eng.stop_sync()


def test_bucketed_decode_steps_match_peft_with_mixed_ranks_and_base_rows(bucketed, world):
    names = [a.name for a in ADAPTERS]  # ranks 4 to 16 on different modules: bucket 16
    models = names + [None, names[1]]  # 7 rows: padded to 8, the padding row writes the spare block
    preload(bucketed, names)
    outs = bucketed.generate_sync(prompt_requests(models))
    graphs = bucketed._base.graphs
    assert graphs is not None and not graphs.capture and graphs.steps >= NEW - 1
    for i, (m, out, want) in enumerate(zip(models, outs, peft_rows(world, models))):
        assert list(out.token_ids) == want, f"row {i} ({m or 'base'}) differs from PEFT"


def test_bucketed_decode_of_bare_base_rows_and_a_low_rank_adapter(bucketed, world):
    models = [None, "mlp", None]  # no adapter at first, then rank 4 in bucket 8
    outs = bucketed.generate_sync(prompt_requests(models[:1]))
    assert list(outs[0].token_ids) == peft_rows(world, models[:1])[0]
    preload(bucketed, ["mlp"])
    outs = bucketed.generate_sync(prompt_requests(models))
    assert [list(o.token_ids) for o in outs] == peft_rows(world, models)


def test_rows_join_and_leave_between_bucketed_steps(world):
    """A 5-token budget chunks prompts beside other rows' decodes (those steps run eagerly); rows
    leave early. The decode-only steps in between run bucketed, and every row matches PEFT."""
    eng = start_engine(world.home, decode_graphs=True, native_kernels=False, max_batch_tokens=5)
    try:
        preload(eng, ["chat", "sql"])
        first = eng.submit(prompt_requests(["chat"], [1], new=12)[0])
        head = next(iter(first)).token_ids
        later = [eng.submit(r) for r in prompt_requests(["sql", None, "chat"], [2, 3, 4], new=4)]
        got = [list(head + first.result().token_ids)] + [list(s.result().token_ids) for s in later]
        assert eng._base.graphs.steps > 0
    finally:
        eng.stop_sync()
    assert got == peft_rows(world, ["chat"], [1], new=12) + peft_rows(world, ["sql", None, "chat"], [2, 3, 4], new=4)


def test_contexts_past_one_bucket(world, monkeypatch):
    """A context longer than one bucket takes the next bucket's shape (more KV blocks per row)."""
    from hotswap.serve.engine import decode_graphs

    monkeypatch.setattr(decode_graphs, "CTX_BUCKET", 32)  # the tiny base's context is 256 tokens
    eng = start_engine(world.home, decode_graphs=True, native_kernels=False)
    ids = (tiny_tokenizer()(" ".join(PROMPTS))["input_ids"] * 4)[:28]
    try:
        preload(eng, ["attn"])
        sp = SamplingParams(max_tokens=NEW)
        outs = eng.generate_sync([GenerationRequest(prompt_token_ids=ids, model=m, sampling=sp) for m in ("attn", None)])
        shapes = set(eng._base.graphs._shapes)
    finally:
        eng.stop_sync()
    assert {key[1] for key in shapes} == {2, 4}  # 32 and 64 positions of 16-token blocks
    assert [list(o.token_ids) for o in outs] == [peft_greedy(world.base_dir, world.adapter_dirs["attn"], ids, NEW),
                                                 peft_greedy(world.base_dir, None, ids, NEW)]


@pytest.mark.parametrize("triton", [False, True], ids=["gathered", "triton"])
def test_bucketed_steps_hold_nothing_a_cuda_graph_cannot_capture(world, tmp_path_factory, triton):
    """What capture refuses, caught on the CPU: every bucketed step (DoRA, embed_tokens and, with the
    kernels, lm_head rows included) runs a second time on fake tensors, where a read on the host
    (``.item()``, ``.tolist()``) or a shape that depends on values (``nonzero``, ``unique``) raises.
    The Triton launch itself is left out there (fake tensors hold no memory to read)."""
    from dataclasses import replace

    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from .engine_support import publish_specs
    from .test_engine_dora import DORA
    from .test_engine_edges import EDGE

    prefix = f"fake-{'triton' if triton else 'gathered'}-"
    publish_specs(world, tmp_path_factory.mktemp(prefix), [replace(s, name=prefix + s.name) for s in DORA + EDGE])
    edges = ["edge-all", "edge-head"] if triton else []  # lm_head's LoRA decodes eagerly without the kernels
    models = [None, "chat", *(prefix + m for m in ["dora-all", "edge-embed", *edges])]
    eng = start_engine(world.home, decode_graphs=True, native_kernels=False, triton_kernels=triton)
    try:
        graphs, kernels = eng._base.graphs, eng._base.runner.triton
        forward, faked = graphs._forward, []
        if kernels is not None:
            add = kernels.add
            kernels.add = lambda y, *args: None if isinstance(y, FakeTensor) else add(y, *args)

        def twice(shape):
            out = forward(shape)
            with FakeTensorMode(allow_non_fake_inputs=True):
                faked.append(forward(shape).shape)
            return out
        graphs._forward = twice
        preload(eng, [m for m in models if m])
        outs = eng.generate_sync(prompt_requests(models, new=4))
        keys = list(graphs._shapes)
    finally:
        eng.stop_sync()
    assert len(faked) == graphs.steps >= 3 and any(k[3] and k[4] for k in keys)  # a DoRA and edge shape ran
    assert [list(o.token_ids) for o in outs] == peft_rows(world, models, new=4)
