"""Data loading: prompt/response boundaries, masks, counted skips and clear errors."""

import json

import pytest

from rlhf_cluster.lib.data import DataError, encode_conversation, encode_prompt, load_tokenized, pad_batch


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mask_covers_exactly_the_assistant_turns(tokenizer):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Count from 1 to 3."},
        {"role": "assistant", "content": "1 2 3"},
        {"role": "user", "content": "List 2 fruits."},
        {"role": "assistant", "content": "apple, pear."},
    ]
    ids, mask = encode_conversation(tokenizer, conv)
    assert len(ids) == len(mask)
    # the masked tokens decode to the two answers, each followed by the end-of-turn token
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [tokenizer.decode(s) for s in spans] == ["1 2 3</s>", "apple, pear.</s>"]
    # the prompt of the first answer is exactly what generation would be given
    first = mask.index(1)
    assert ids[:first] == encode_prompt(tokenizer, conv[:2])
    assert tokenizer.decode(ids[:first]) == "<s><|system|>Be brief.</s><|user|>Count from 1 to 3.</s><|assistant|>"


def test_sft_file_with_bad_records_is_counted(tmp_path, tokenizer):
    good = {"messages": [{"role": "user", "content": "List 2 fruits."},
                         {"role": "assistant", "content": "apple, pear."}]}
    rows = [
        good,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty response
        {"messages": [{"role": "user", "content": "hi"}]},                                           # no answer
        {"messages": [{"role": "user", "content": "Repeat " * 200}, {"role": "assistant", "content": "x"}]},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"},
                      {"role": "assistant", "content": "z"}]},                                 # no turn before it
        good,
    ]
    samples, report = load_tokenized(_write(tmp_path / "sft.jsonl", rows), tokenizer, "sft", max_tokens=64)
    assert report.kept == len(samples) == 2
    assert dict(report.skipped) == {"empty_response": 1, "no_assistant_turn": 1, "too_long": 1,
                                    "empty_messages": 1, "malformed_messages": 1, "assistant_turn_first": 1}
    with pytest.raises(DataError, match="starts with an assistant turn"):  # chat templates cannot render it
        encode_conversation(tokenizer, rows[6]["messages"])
    assert report.examples["too_long"] == [3]
    assert "2 samples kept" in str(report) and "1 too_long (e.g. records [3])" in str(report)
    with pytest.raises(DataError, match=r"sft\.jsonl, record 1: empty response"):
        load_tokenized(tmp_path / "sft.jsonl", tokenizer, "sft", max_tokens=64, on_bad_sample="error")


def test_preference_pairs(tmp_path, tokenizer):
    p = [{"role": "user", "content": "List 2 fruits."}]
    a = [{"role": "assistant", "content": "apple, pear."}]
    b = [{"role": "assistant", "content": "apple, cat."}]
    rows = [
        {"prompt": p, "chosen": a, "rejected": b, "edited": [{"role": "assistant", "content": "kiwi, plum."}],
         "strength": "better"},
        {"prompt": p, "chosen": a, "rejected": a},                                   # identical pair
        {"prompt": p, "chosen": a, "rejected": [{"role": "assistant", "content": ""}]},
        {"prompt": p, "chosen": None, "rejected": b},                                # missing chosen
        {"prompt": a, "chosen": a, "rejected": b},                                   # prompt is an assistant turn
    ]
    samples, report = load_tokenized(_write(tmp_path / "p.jsonl", rows), tokenizer, "preferences", max_tokens=64)
    assert len(samples) == 1
    assert dict(report.skipped) == {"identical_pair": 1, "empty_response": 1, "empty_chosen": 1,
                                    "assistant_turn_first": 1}
    s = samples[0]
    assert s["strength"] == "better" and set(s) >= {"chosen", "rejected", "edited"}
    # chosen and rejected share the prompt tokens; the response starts where they diverge
    start = s["chosen"].response_start
    assert s["chosen"].input_ids[:start] == s["rejected"].input_ids[:start] == encode_prompt(tokenizer, p)


def test_missing_field_names_the_field(tmp_path, tokenizer):
    f = _write(tmp_path / "prefs.jsonl", [{"prompt": [{"role": "user", "content": "x"}], "chosen": []}])
    with pytest.raises(DataError, match=r"prefs\.jsonl: records have no field 'rejected'"):
        load_tokenized(f, tokenizer, "preferences", max_tokens=64)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenized(tmp_path / "none.jsonl", tokenizer, "sft", max_tokens=64)
    with pytest.raises(DataError, match="unsupported extension"):
        load_tokenized(_write(tmp_path / "x.csv", []), tokenizer, "sft", max_tokens=64)


def test_all_bad_is_an_error(tmp_path, tokenizer):
    f = _write(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": ""}]}])
    with pytest.raises(DataError, match="no usable samples.*1 empty_prompt"):
        load_tokenized(f, tokenizer, "prompts", max_tokens=64)


def test_parquet_and_builtin_files_load(tmp_path, tokenizer, builtin_assets):
    from datasets import Dataset

    rows = [{"messages": [{"role": "user", "content": "Count from 1 to 3."}]}] * 3
    Dataset.from_list(rows).to_parquet(tmp_path / "prompts.parquet")
    samples, _ = load_tokenized(tmp_path / "prompts.parquet", tokenizer, "prompts", max_tokens=64)
    assert len(samples) == 3 and samples[0]["prompt_ids"][0] == tokenizer.bos_token_id
    for name, kind in [("sft_train.jsonl", "sft"), ("preferences_train.jsonl", "preferences"),
                       ("prompts_test.jsonl", "prompts")]:
        samples, report = load_tokenized(builtin_assets.file(name), tokenizer, kind, max_tokens=128)
        assert not report.skipped, report


def test_pad_batch_left_and_right():
    ids, att = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and att.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, att = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and att.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_first_fit_packing_and_token_budget_micro_batches():
    from rlhf_cluster.lib.packing import first_fit, micro_batch_rows, packed_batch, place, take

    lengths = [5, 2, 7, 3, 1, 6]
    # longest first, each into the first row with room (capacity 7): 7 | 6+1 | 5+2 | 3
    assert first_fit(lengths, 7) == [[2], [5, 4], [0, 1], [3]]
    assert first_fit([9, 2], 7) == [[0], [1]]  # too long for a row: a row of its own
    # padded: micro_batch_size sequences, one per row; packed: rows no wider than the longest (7),
    # then as many rows as fit the budget (15 // 7 = 2)
    assert micro_batch_rows(lengths, 4, None) == [[[0], [1], [2], [3]], [[4], [5]]]
    assert micro_batch_rows(lengths, 4, 15) == [[[2], [5, 4]], [[0, 1], [3]]]
    assert micro_batch_rows(lengths, 4, 3) == [[[2]], [[5, 4]], [[0, 1]], [[3]]]  # at least one row each
    seqs = [[11, 12, 13], [21, 22], [31]]
    p = packed_batch(seqs, [[0], [1, 2]], pad_id=0)
    assert p.input_ids.tolist() == [[11, 12, 13], [21, 22, 31]]
    assert p.position_ids.tolist() == [[0, 1, 2], [0, 1, 0]]  # positions restart per sequence
    assert p.places == {0: (0, 0), 1: (1, 0), 2: (1, 2)}
    # row 1: token 31 attends to itself only, not to 21/22 (block-diagonal causal mask)
    assert p.attention_mask[1, 0].long().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert p.attention_mask[0, 0].long().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    laid = place(p, [[0.5, 0.25], [0.75], []], 2)
    assert laid.tolist() == [[0.5, 0.25], [0.75, 0.0]]
    assert take(p, laid, {0: 2, 1: 1, 2: 0}) == {0: [0.5, 0.25], 1: [0.75], 2: []}
    unpacked = packed_batch(seqs, [[0], [1]], pad_id=0)  # one sequence per row: a plain padding mask
    assert unpacked.position_ids is None and unpacked.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


# --------------------------------------------------------------------------- the shapes people's data has
CANONICAL_PAIR = {"prompt": [{"role": "user", "content": "List 3 fruits."}],
                  "chosen": [{"role": "assistant", "content": "apple, pear, plum."}],
                  "rejected": [{"role": "assistant", "content": "I will not."}]}


def _canonical_pair(tmp_path, tokenizer):
    path = tmp_path / "canonical.jsonl"
    path.write_text(json.dumps(CANONICAL_PAIR) + "\n")
    return load_tokenized(path, tokenizer, "preferences", 128)[0][0]


@pytest.mark.parametrize("name", ["prefs_strings.jsonl", "prefs_hh.jsonl", "prefs_ultrafeedback.jsonl"])
def test_preference_shapes_encode_as_the_canonical_pair(name, tmp_path, tokenizer):
    """prompt/chosen/rejected strings, Anthropic HH transcripts (no prompt field) and UltraFeedback's whole
    conversations all give the tokens of the same pair written in this project's shape."""
    pairs, report = load_tokenized(f"tests/data/{name}", tokenizer, "preferences", 128)
    want = _canonical_pair(tmp_path, tokenizer)
    assert pairs[0]["chosen"] == want["chosen"] and pairs[0]["rejected"] == want["rejected"]
    assert pairs[0]["messages"] == CANONICAL_PAIR["prompt"]
    if name == "prefs_hh.jsonl":  # a multi-turn transcript keeps its earlier turns as the prompt
        assert [t["role"] for t in pairs[1]["messages"]] == ["user", "assistant", "user"]
        assert report.skipped == {"transcripts_without_a_shared_prompt": 1} and report.examples[
            "transcripts_without_a_shared_prompt"] == [2]


def test_key_mapping_sft_and_prompt_transcripts_and_errors(tmp_path, tokenizer):
    rows, report = load_tokenized("tests/data/sft_hh.jsonl", tokenizer, "sft", 128, keys={"messages": "text"})
    assert len(rows) == 1 and report.skipped == {"no_assistant_turn": 1}  # "Human: ..." alone: a user turn
    ids, mask = encode_conversation(tokenizer, [{"role": "user", "content": "List 3 fruits."},
                                                {"role": "assistant", "content": "apple, pear, plum."}])
    assert (rows[0].input_ids, rows[0].loss_mask) == (ids, mask)
    with pytest.raises(DataError, match=r"sft_hh.jsonl, record 1: no assistant turn"):
        load_tokenized("tests/data/sft_hh.jsonl", tokenizer, "sft", 128, "error", keys={"messages": "text"})
    with pytest.raises(DataError, match=r"sft_hh.jsonl: records have no field 'messages'"):
        load_tokenized("tests/data/sft_hh.jsonl", tokenizer, "sft", 128)  # the mapping not given
    prompts, _ = load_tokenized("tests/data/prompts_hh.jsonl", tokenizer, "prompts", 128)
    assert prompts[0]["messages"] == [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                                      {"role": "user", "content": "List 3 fruits."}]
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"question": "List 3 fruits.", "good": "apple, pear, plum.", "bad": "I will not."})
                       + "\n")
    pairs, _ = load_tokenized(renamed, tokenizer, "preferences", 128,
                              keys={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert pairs[0]["chosen"] == _canonical_pair(tmp_path, tokenizer)["chosen"]
    with pytest.raises(DataError, match=r"records have no field 'good'"):
        load_tokenized("tests/data/prefs_strings.jsonl", tokenizer, "preferences", 128, keys={"chosen": "good"})
