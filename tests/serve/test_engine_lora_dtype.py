"""``lora_dtype``: adapter rows stored narrower than the base (bfloat16 under a float32 base).

A narrower pool rounds each stored value (A, and B times its scale) once, at load; the math stays in
the base's dtype. So it serves exactly what a float32 pool serves for the adapter rounded the same
way, and exactly what a float32 pool serves when the values are bfloat16 already (an adapter trained
and saved in bfloat16, scales a power of two)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotswap.serve.engine import GenerationRequest, SamplingParams

from .engine_support import ALL, AdapterSpec, World, peft_greedy, preload, publish, save_adapter, start_engine
from .engine_support import tiny_tokenizer, PROMPTS, world  # noqa: F401

NEW = 8
# scales alpha / r (rsLoRA: alpha / sqrt(r)) all powers of two, so rounding B before or after the
# scale is the same rounding
SPECS = [AdapterSpec("w-all", 16, tuple(ALL), alpha=32, seed=11),
         AdapterSpec("w-attn", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), alpha=8, seed=12),
         AdapterSpec("w-mlp", 4, ("gate_proj", "up_proj", "down_proj"), alpha=16, rslora=True, seed=13)]
EDGE = AdapterSpec("w-edge", 8, ("q_proj", "embed_tokens", "lm_head"), alpha=16, seed=14)
DORA = AdapterSpec("w-dora", 8, ("q_proj", "v_proj", "down_proj"), alpha=16, seed=15, extra=(("use_dora", True),))
LORA_WEIGHTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}  # a DoRA magnitude stays float32


def rounded_copy(folder: Path, out: Path, dtype: torch.dtype, save_as: torch.dtype = torch.float32) -> Path:
    """The adapter with every LoRA value rounded to ``dtype``, saved in ``save_as`` (PEFT's copies of
    the base's embedding and lm_head stay as they are)."""
    shutil.copytree(folder, out)
    path = out / "adapter_model.safetensors"
    tensors = {k: v.to(dtype).to(save_as) if set(k.split(".")) & LORA_WEIGHTS else v
               for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def adapters(world: World, tmp_path_factory) -> dict[str, Path]:
    """Each spec as saved (float32), rounded to bfloat16 values (kept in float32), and saved in bfloat16."""
    root = tmp_path_factory.mktemp("lora-dtype")
    folders = {}
    for spec in [*SPECS, EDGE, DORA]:
        folders[spec.name] = original = save_adapter(world.base_dir, root / spec.name, spec)
        folders[f"{spec.name}-r"] = rounded_copy(original, root / f"{spec.name}-r", torch.bfloat16)
        folders[f"{spec.name}-b"] = rounded_copy(original, root / f"{spec.name}-b", torch.bfloat16, torch.bfloat16)
        folders[f"{spec.name}-h"] = rounded_copy(original, root / f"{spec.name}-h", torch.float16)
    publish(world, folders)
    return folders


def run(world: World, models: list[str | None], **config) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities, all models in one batch."""
    tok = tiny_tokenizer()
    engine = start_engine(world.home, **config)
    try:
        preload(engine, [m for m in models if m])
        reqs = [GenerationRequest(prompt_token_ids=tok(PROMPTS[i % len(PROMPTS)])["input_ids"], model=m,
                                  sampling=SamplingParams(max_tokens=NEW, logprobs=0, prompt_logprobs=0))
                for i, m in enumerate(models)]
        outs = engine.generate_sync(reqs)
        return [(list(o.token_ids), [lp.chosen.logprob for lp in (*o.prompt_logprobs[1:], *o.logprobs)])
                for o in outs]
    finally:
        engine.stop_sync()


NAMES = [s.name for s in SPECS]


PATHS = {"native": dict(native_kernels=True), "torch": dict(native_kernels=False),
         "bucketed": dict(native_kernels=False, decode_graphs=True)}  # the GPU's decode steps, run eagerly


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_pool_serves_each_adapter_rounded_to_bfloat16(world, adapters, path):
    # a float32 adapter in a bfloat16 pool == the same adapter rounded to bfloat16 in a float32 pool,
    # to the bit (log-probabilities of prompt and output), in a mixed batch with base rows
    got = run(world, [*NAMES, None, NAMES[0]], lora_dtype="bfloat16", **PATHS[path])
    want = run(world, [*(f"{n}-r" for n in NAMES), None, f"{NAMES[0]}-r"], **PATHS[path])
    assert got == want
    # and the rounding is real: the unrounded adapters give other log-probabilities
    assert run(world, NAMES, **PATHS[path]) != got[:len(NAMES)]


def test_bfloat16_adapters_are_exact_in_a_bfloat16_pool(world, adapters):
    # saved in bfloat16: both pools hold the same values, and greedy output is PEFT's
    names = [f"{n}-b" for n in NAMES]
    got = run(world, names, lora_dtype="bfloat16")
    assert got == run(world, names)
    tok = tiny_tokenizer()
    for i, (name, (tokens, _)) in enumerate(zip(names, got)):
        assert tokens == peft_greedy(world.base_dir, adapters[name], tok(PROMPTS[i])["input_ids"], NEW), name


def test_float16_pool_takes_the_torch_path(world, adapters):
    # float16 rows under a float32 base: no native kernel reads them; the torch path widens them
    rounded = [f"{n}-h" for n in NAMES]
    assert run(world, NAMES, lora_dtype="float16", native_kernels=False) == run(world, rounded, native_kernels=False)
    # beside the native base projections (which sum in another order than torch's matmul)
    got, want = run(world, NAMES, lora_dtype="float16"), run(world, rounded)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    torch.testing.assert_close([lps for _, lps in got], [lps for _, lps in want], rtol=0, atol=1e-4)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_edge_lora_in_a_bfloat16_pool(world, adapters, native):
    # embed_tokens and lm_head rows are rounded the same way as the layers'
    config = dict(native_kernels=native, edge_lora_rows=16)
    got = run(world, [EDGE.name, None, NAMES[1]], lora_dtype="bfloat16", **config)
    assert got == run(world, [f"{EDGE.name}-r", None, f"{NAMES[1]}-r"], **config)


def test_dora_in_a_bfloat16_pool(world, adapters):
    # the DoRA scales are computed from the rounded values the pool holds
    got = run(world, [DORA.name, NAMES[0]], lora_dtype="bfloat16")
    assert got == run(world, [f"{DORA.name}-r", f"{NAMES[0]}-r"])


def test_a_bfloat16_pool_holds_twice_the_rows(world, adapters):
    wide = start_engine(world.home)
    narrow = start_engine(world.home, lora_dtype="bfloat16")
    try:
        # the same lora_capacity_bytes (1 MiB here) holds twice the rank rows
        pools = [e._base.runner.lora for e in (wide, narrow)]
        assert pools[1].max_rows in (2 * pools[0].max_rows, 2 * pools[0].max_rows + 1)
        assert pools[1].a_stacked["qkv"].dtype == torch.bfloat16 and pools[1].compute_dtype == torch.float32
        # the rank-16 adapter on every module takes half the bytes
        for e in (wide, narrow):
            preload(e, [NAMES[0]])
        used = [e.stats().lora_bytes_used for e in (wide, narrow)]
        assert used[1] * 2 == used[0]
    finally:
        wide.stop_sync()
        narrow.stop_sync()


def test_rows_wider_than_the_base_are_refused():
    from hotswap.serve.engine import EngineConfig

    assert EngineConfig(device="cpu", dtype="bfloat16", lora_dtype="bfloat16").torch_lora_dtype() == torch.bfloat16
    for rows in ("float32", "float16"):  # float16 is no narrower than bfloat16, only differently rounded
        with pytest.raises(AssertionError, match=f"lora_dtype {rows} under a bfloat16 base"):
            EngineConfig(device="cpu", dtype="bfloat16", lora_dtype=rows)
