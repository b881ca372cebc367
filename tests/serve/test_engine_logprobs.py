"""Log-probabilities of generated and prompt tokens, and OpenAI's presence and frequency penalties and
logit bias."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from hotswap.serve.engine import GenerationRequest, InvalidRequest, SamplingParams
from hotswap.serve.engine.sampler import apply_presence_frequency, sample

from .engine_support import PROMPTS, engine, preload, tiny_tokenizer, world  # noqa: F401


def reference_logprobs(world, adapter: str | None, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """``[len(generated), V]``: PEFT's (or the bare base's) log-softmax at each generated position."""
    model = LlamaForCausalLM.from_pretrained(world.base_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, world.adapter_dirs[adapter])
    with torch.inference_mode():
        logits = model.eval()(torch.tensor([prompt + generated])).logits[0]
    return logits[len(prompt) - 1:len(prompt) + len(generated) - 1].float().log_softmax(-1)


def test_logprobs_match_peft_for_every_row_of_a_mixed_batch(engine, world):
    tok = tiny_tokenizer()
    models = [None, "chat", "sql", "mlp"]
    preload(engine, models[1:])
    prompts = [tok(PROMPTS[i])["input_ids"] for i in range(len(models))]
    samplings = [SamplingParams(max_tokens=6, logprobs=3), SamplingParams(max_tokens=6, logprobs=3),
                 SamplingParams(max_tokens=6, logprobs=0, temperature=1.3, seed=5),  # tempered: raw logprobs still
                 SamplingParams(max_tokens=6)]  # not asked for: none
    outs = engine.generate_sync([GenerationRequest(prompt_token_ids=p, model=m, sampling=s)
                                 for p, m, s in zip(prompts, models, samplings)])
    assert outs[3].logprobs == ()
    for out, model, prompt, sp in zip(outs[:3], models, prompts, samplings):
        ids = list(out.token_ids)
        assert len(out.logprobs) == len(ids)
        ref = reference_logprobs(world, model, prompt, ids)
        for pos, (entry, token) in enumerate(zip(out.logprobs, ids)):
            assert entry.chosen.token_id == token and entry.chosen.token == tok.decode([token])
            assert entry.chosen.logprob == pytest.approx(float(ref[pos, token]), abs=1e-4)
            assert len(entry.top) == sp.logprobs
            values, top_ids = ref[pos].topk(sp.logprobs)
            assert [t.token_id for t in entry.top] == top_ids.tolist()
            assert [t.logprob for t in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
            if sp.temperature == 0.0:
                assert entry.top[0].token_id == token  # greedy took the most likely token


def test_streamed_events_carry_one_entry_per_token(engine):
    stream = engine.submit(GenerationRequest(prompt=PROMPTS[1], model="chat",
                                             sampling=SamplingParams(max_tokens=5, logprobs=2)))
    events = list(stream)
    assert [len(e.logprobs) for e in events] == [len(e.token_ids) for e in events] == [1] * 5
    assert all(e.logprobs[0].top[0].logprob >= e.logprobs[0].top[1].logprob for e in events)


def test_logprobs_before_min_tokens_keep_the_banned_end_token(engine):
    """EOS is held back until min_tokens, but the log-probabilities are the model's own: EOS keeps its
    finite value, so it can still be listed among the most likely tokens."""
    eos = engine.tokenizer.eos_token_id
    out = engine.generate_sync([GenerationRequest(prompt=PROMPTS[0], sampling=SamplingParams(
        max_tokens=4, min_tokens=4, logprobs=20))])[0]
    assert eos not in out.token_ids
    assert all(lp.chosen.logprob > float("-inf") for lp in out.logprobs)
    assert all(len(lp.top) == 20 and all(t.logprob > float("-inf") for t in lp.top) for lp in out.logprobs)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = apply_presence_frequency(logits.clone(), torch.tensor([3, 3, 1]), presence=0.5, frequency=0.25)
    assert out.tolist() == [1.0, 2.0 - 0.25 - 0.5, 3.0, 4.0 - 2 * 0.25 - 0.5]
    # only generated tokens count: token 3 sits in the prompt, token 2 was generated
    history = [[3, 0, 2]]
    picked = sample(torch.tensor([[0.0, 0.0, 3.9, 4.0]]), [SamplingParams(presence_penalty=2.0)], history, [None],
                    prompt_lens=[2])
    assert picked == [3]
    picked = sample(torch.tensor([[0.0, 0.0, 3.9, 4.0]]), [SamplingParams(presence_penalty=2.0)], [[0, 0, 3]], [None],
                    prompt_lens=[2])
    assert picked == [2]
    # logit bias: a token named twice gets both biases
    assert sample(torch.tensor([[0.0, -1.5]]), [SamplingParams(logit_bias=((1, 1.0), (1, 1.0)))], [[0]], [None]) == [1]


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.7), (-2.0, -0.5)])
def test_penalised_greedy_matches_a_step_by_step_reference(engine, world, presence, frequency):
    ids = tiny_tokenizer()(PROMPTS[2])["input_ids"]
    out = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(
        max_tokens=16, ignore_eos=True, presence_penalty=presence, frequency_penalty=frequency))])[0]
    model, generated = LlamaForCausalLM.from_pretrained(world.base_dir).eval(), []
    with torch.inference_mode():
        for _ in range(16):
            logits = model(torch.tensor([ids + generated])).logits[0, -1]
            counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[0])
            logits = logits - frequency * counts - presence * (counts > 0).float()
            generated.append(int(logits.argmax()))
    assert list(out.token_ids) == generated
    if presence < 0:  # the tiny model never repeats itself unpenalised: these penalties make it
        plain = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(
            max_tokens=16, ignore_eos=True))])[0]
        assert len(set(plain.token_ids)) == 16 and len(set(generated)) < 16


@pytest.mark.parametrize("bad, word", [(dict(presence_penalty=2.5), "presence_penalty"),
                                       (dict(frequency_penalty=-3), "frequency_penalty"),
                                       (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"),
                                       (dict(prompt_logprobs=99), "prompt_logprobs"),
                                       (dict(logit_bias=((5, 101.0),)), "logit_bias"),
                                       (dict(logit_bias=((10 ** 6, 1.0),)), "outside")])
def test_out_of_range_settings_are_refused(engine, bad, word):
    with pytest.raises(InvalidRequest, match=word):
        engine.submit(GenerationRequest(prompt="hi", sampling=SamplingParams(**bad)))


def test_prompt_logprobs_match_peft_across_prefill_chunks(engine, world):
    """A prompt longer than a step's token budget (64) is scored over several chunks, beside other rows."""
    tok = tiny_tokenizer()
    prompt = tok(" ".join(PROMPTS) * 2)["input_ids"][:150]
    assert len(prompt) == 150
    preload(engine, ["chat"])
    outs = engine.generate_sync([
        GenerationRequest(prompt_token_ids=prompt, model="chat",
                          sampling=SamplingParams(max_tokens=2, prompt_logprobs=2)),
        GenerationRequest(prompt_token_ids=prompt[:20], sampling=SamplingParams(max_tokens=4, prompt_logprobs=0)),
        GenerationRequest(prompt=PROMPTS[3], sampling=SamplingParams(max_tokens=3))])
    assert outs[2].prompt_logprobs == ()
    for out, model, ids, k in ((outs[0], "chat", prompt, 2), (outs[1], None, prompt[:20], 0)):
        assert len(out.prompt_logprobs) == len(ids)
        first = out.prompt_logprobs[0]  # nothing predicts the first token
        assert (first.chosen.token_id, first.chosen.token, first.chosen.logprob, first.top) == (
            ids[0], tok.decode([ids[0]]), None, ())
        ref = reference_logprobs(world, model, ids[:1], ids[1:])  # the row before each token predicts it
        for pos, entry in enumerate(out.prompt_logprobs[1:]):
            assert entry.chosen.token_id == ids[pos + 1]
            # float32 sums over a 150-token context in another order: agreement to ~1e-5 relative
            assert entry.chosen.logprob == pytest.approx(float(ref[pos, ids[pos + 1]]), abs=1e-3)
            assert [t.token_id for t in entry.top] == ref[pos].topk(k).indices.tolist()


def test_prompt_logprobs_come_with_the_first_event_only(engine):
    events = list(engine.submit(GenerationRequest(prompt=PROMPTS[1], sampling=SamplingParams(
        max_tokens=3, prompt_logprobs=1))))
    assert len(events[0].prompt_logprobs) == len(engine.tokenizer(PROMPTS[1])["input_ids"])
    assert [e.prompt_logprobs for e in events[1:]] == [(), ()]
    [one] = engine.generate_sync([GenerationRequest(prompt=PROMPTS[1], sampling=SamplingParams(
        max_tokens=1, prompt_logprobs=1))])  # the first event is also the last
    assert one.prompt_logprobs == events[0].prompt_logprobs


def test_a_preempted_prompt_is_not_scored_twice():
    """Preemption frees a sequence's KV and computes its prompt again: only positions without an
    entry yet are scored on the way back."""
    from hotswap.serve.engine.sequence import Sequence
    from hotswap.serve.engine.worker import Worker

    seq = Sequence(request_id="r", target=None, prompt_len=10, token_ids=list(range(10)), stream=None, detok=None,
                   sampling=SamplingParams(prompt_logprobs=0), eos_ids=frozenset(), prompt_logprobs=[None])
    assert Worker._prompt_scores(seq, 4) == range(0, 4)  # positions 0-3 predict tokens 1-4
    seq.prompt_logprobs += [None] * 4
    seq.num_computed = 4
    assert Worker._prompt_scores(seq, 6) == range(0, 5)  # positions 4-8; the last token predicts no prompt token
    seq.num_computed = 0  # preempted after the first chunk: recomputed from the start
    assert Worker._prompt_scores(seq, 3) == range(0)
    assert Worker._prompt_scores(seq, 6) == range(4, 6)
    seq.prompt_logprobs = None  # handed out with the first token: a later recompute scores nothing
    assert Worker._prompt_scores(seq, 10) == range(0)


def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(engine):
    ids = tiny_tokenizer()(PROMPTS[4])["input_ids"]
    scored, with_one = engine.generate_sync([
        GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=0, prompt_logprobs=1)),
        GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=1, prompt_logprobs=1))])
    assert (scored.token_ids, scored.text, scored.finish_reason) == ((), "", "length")
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(ids), 0)
    assert scored.prompt_logprobs == with_one.prompt_logprobs and len(scored.prompt_logprobs) == len(ids)
    assert engine.stats().running == 0
    with pytest.raises(InvalidRequest, match="0 only with prompt_logprobs"):
        engine.submit(GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=0)))


def test_logit_bias_forces_and_forbids_tokens(engine):
    ids = tiny_tokenizer()(PROMPTS[0])["input_ids"]
    plain, forced, forbidden = engine.generate_sync([
        GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=6, ignore_eos=True, logprobs=0)),
        GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=6, ignore_eos=True,
                                                                        logit_bias=((42, 100.0),))),
        GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(max_tokens=6, ignore_eos=True, logprobs=0,
                                                                        logit_bias=((0, 0.0),)))])
    assert forced.token_ids == (42,) * 6
    assert forbidden.token_ids == plain.token_ids  # a zero bias is no bias
    assert [e.chosen.logprob for e in forbidden.logprobs] == pytest.approx([e.chosen.logprob for e in plain.logprobs])
    first = plain.token_ids[0]
    [avoided] = engine.generate_sync([GenerationRequest(prompt_token_ids=ids, sampling=SamplingParams(
        max_tokens=1, logprobs=2, logit_bias=((first, -100.0),)))])
    assert avoided.token_ids[0] != first
    assert avoided.logprobs[0].top[0].token_id == first  # log-probabilities stay the model's own, bias aside


def test_token_bytes_are_exact_even_for_part_of_a_character(engine):
    """The tiny model's byte-level vocabulary: random weights often emit single bytes of multi-byte
    characters, whose text alone is U+FFFD; their bytes still join into the generated text."""
    outs = engine.generate_sync([GenerationRequest(prompt=p, model=m, sampling=SamplingParams(
        max_tokens=16, ignore_eos=True, logprobs=1)) for p in PROMPTS[:4] for m in (None, "chat")])
    partial = 0
    for out in outs:
        raw = b"".join(e.chosen.token_bytes for e in out.logprobs)
        assert raw.decode(errors="replace") == engine.tokenizer.decode(list(out.token_ids))
        partial += sum(e.chosen.token == "\ufffd" for e in out.logprobs)
        assert all(t.token_bytes is not None for e in out.logprobs for t in e.top)
    assert partial > 0  # the case this test is about did occur
