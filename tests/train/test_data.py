"""Data files and encoding: bad lines are named by file and line; only answer tokens carry labels."""

from __future__ import annotations

import json

import pytest

from hotswap.train.data import Example, read_jsonl
from hotswap.train.encode import IGNORE_INDEX, collate, encode_all, encode_example
from hotswap.train.errors import DataError

from .conftest import char_tokenizer


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_both_shapes_read(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "p", "completion": "c", "meta": {"facts": ["1"]}}),
        "",
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                 {"role": "assistant", "content": "a"}]}),
    ])
    first, second = read_jsonl(path)
    assert first == Example(({"role": "user", "content": "p"},), "c", {"facts": ["1"]})
    assert second.messages[0]["role"] == "system" and second.completion == "a"


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "p", "completion": ', "malformed JSON"),
    ('["p", "c"]', "expected a JSON object"),
    ('{"prompt": "p"}', "missing string field 'completion'"),
    ('{"prompt": "p", "completion": "c", "answer": 1}', "unknown field"),
    ('{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}', "last turn"),
    ('{"messages": [{"role": "bot", "content": "u"}, {"role": "assistant", "content": "v"}]}', "role must be"),
    ('{"prompt": "p", "completion": "  "}', "empty"),
])
def test_bad_line_named_with_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "p", "completion": "c"}), bad])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{message}"):
        read_jsonl(path)


def test_lines_end_at_newlines_only(tmp_path):
    """U+2028 and U+2029 may stand raw inside a JSON string (json.dumps writes them so with
    ensure_ascii=False): they do not end a line."""
    path = tmp_path / "data.jsonl"
    records = [{"prompt": "line one\u2028line two\u2029end", "completion": "ok"}, {"prompt": "b", "completion": "c"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records), encoding="utf-8")
    examples = read_jsonl(path)
    assert len(examples) == 2 and examples[0].messages[-1]["content"] == "line one\u2028line two\u2029end"


def test_a_folder_given_as_data_is_named(tmp_path):
    with pytest.raises(DataError, match="not readable"):
        read_jsonl(tmp_path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="holds no examples"):
        read_jsonl(_write(tmp_path / "empty.jsonl", [""]))


def test_only_answer_tokens_carry_labels():
    tokenizer = char_tokenizer()
    example = Example(({"role": "user", "content": "colour of lime?"},), "green")
    encoded, truncated = encode_example(tokenizer, example, "One word.", max_length=256)
    assert not truncated
    labelled = [t for t, l in zip(encoded.input_ids, encoded.labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "green<|im_end|>\n"
    prompt_len = encoded.labels.index(next(l for l in encoded.labels if l != IGNORE_INDEX))
    assert tokenizer.decode(encoded.input_ids[:prompt_len]).endswith("<|im_start|>assistant\n")
    assert "One word." in tokenizer.decode(encoded.input_ids[:prompt_len])
    # labels equal the inputs where they are set (the model shifts them itself)
    assert all(l == t for t, l in zip(encoded.input_ids, encoded.labels) if l != IGNORE_INDEX)


def test_right_truncation_and_dropping():
    tokenizer = char_tokenizer()
    long_answer = Example(({"role": "user", "content": "q"},), "x" * 100)
    encoded, truncated = encode_example(tokenizer, long_answer, None, max_length=40)
    assert truncated and len(encoded.input_ids) == 40 and encoded.labels[-1] == tokenizer.convert_tokens_to_ids("x")
    long_prompt = Example(({"role": "user", "content": "q" * 100},), "a")
    items, stats = encode_all(tokenizer, [long_answer, long_prompt], None, 40, "d.jsonl")
    assert stats.num_dropped == 1 and stats.num_truncated == 1 and len(items) == 1
    with pytest.raises(DataError, match="d.jsonl: no example leaves room"):
        encode_all(tokenizer, [long_prompt], None, 40, "d.jsonl")


def test_collate_pads_right_with_ignored_labels():
    tokenizer = char_tokenizer()
    short = encode_example(tokenizer, Example(({"role": "user", "content": "a"},), "b"), None, 256)[0]
    long = encode_example(tokenizer, Example(({"role": "user", "content": "a much longer prompt"},), "bc"), None, 256)[0]
    batch = collate([short, long], pad_id=tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["labels"][0, :n].tolist() == short.labels
