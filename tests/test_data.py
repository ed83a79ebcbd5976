import json

import pytest
import torch
from conftest import CONVERSATION

from traineagle3.data import (
    DataConfig,
    epoch_batches,
    load_tokenized,
    special_token_ids,
    split_train_test,
    tokenize_conversation,
)


def masked_spans(tokenizer, ids, mask):
    """Decoded runs of consecutive trainable tokens."""
    spans, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


@pytest.mark.parametrize("tok_fixture, eot", [("smol_tokenizer", "<|im_end|>"), ("llama3_tokenizer", "<|eot_id|>")])
def test_mask_covers_exactly_the_answers_and_end_of_turn(tok_fixture, eot, request):
    tok = request.getfixturevalue(tok_fixture)
    ids, mask = tokenize_conversation(tok, CONVERSATION, special_token_ids(tok))
    assert ids == tok(tok.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]
    answers = [m["content"] + eot for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_spans(tok, ids, mask) == answers


def test_system_prompt_and_questions_are_never_trained(smol_tokenizer):
    conv = [{"role": "system", "content": "You answer in one word."}] + CONVERSATION
    ids, mask = tokenize_conversation(smol_tokenizer, conv, special_token_ids(smol_tokenizer))
    trained = smol_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert "one word" not in trained and "capital of France?" not in trained and "Paris" in trained


def write_jsonl(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))


def test_too_long_samples_are_truncated_or_dropped_and_counted(smol_tokenizer, tmp_path):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    write_jsonl(tmp_path / "d.jsonl", [CONVERSATION, long, CONVERSATION])
    cfg = DataConfig(str(tmp_path / "d.jsonl"), max_length=128, too_long="truncate")
    ds, counts = load_tokenized(cfg, smol_tokenizer, tmp_path / "cache")
    assert len(ds) == 3 and counts["tokenized"]["too long (truncated)"] == 1
    assert max(len(x) for x in ds["input_ids"]) == 128
    cfg.too_long = "drop"
    ds, counts = load_tokenized(cfg, smol_tokenizer, tmp_path / "cache")
    assert len(ds) == 2 and counts["tokenized"]["too long (dropped)"] == 1


def test_tokenised_cache_is_keyed_by_content(smol_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [CONVERSATION])
    cfg = DataConfig(str(path), max_length=512)
    ds1, _ = load_tokenized(cfg, smol_tokenizer, tmp_path / "cache")
    write_jsonl(path, [CONVERSATION, CONVERSATION])
    ds2, _ = load_tokenized(cfg, smol_tokenizer, tmp_path / "cache")
    assert (len(ds1), len(ds2)) == (1, 2)


def test_one_rank_with_accumulation_sees_what_two_ranks_see():
    idx = list(range(37))
    one = epoch_batches(idx, epoch=3, seed=1, micro_batch=2, accum=2, world=1, rank=0)
    r0 = epoch_batches(idx, epoch=3, seed=1, micro_batch=2, accum=1, world=2, rank=0)
    r1 = epoch_batches(idx, epoch=3, seed=1, micro_batch=2, accum=1, world=2, rank=1)
    assert len(one) == 2 * len(r0) == 18
    for step in range(len(r0)):
        assert sorted(one[2 * step] + one[2 * step + 1]) == sorted(r0[step] + r1[step])
    assert epoch_batches(idx, 4, 1, 2, 2, 1, 0) != one  # a new order each epoch


def test_split_by_content_is_stable_under_growth_and_keeps_copies_together():
    g = torch.Generator().manual_seed(0)
    samples = [
        torch.randint(0, 1000, (int(n),), generator=g).tolist() for n in torch.randint(5, 40, (400,), generator=g)
    ]
    train, test = split_train_test(samples, 0.1, seed=42)
    assert (train, test) == split_train_test(samples, 0.1, seed=42) and 20 <= len(test) <= 60
    assert sorted(train + test) == list(range(400))
    assert split_train_test(samples, 0.1, seed=7)[1] != test
    # the first 100 samples, and the same 400 reversed: each sample keeps its side
    held = {tuple(samples[i]) for i in test}
    sub_test = split_train_test(samples[:100], 0.1, seed=42)[1]
    assert {tuple(samples[i]) for i in sub_test} == held & {tuple(s) for s in samples[:100]}
    rev = samples[::-1]
    assert {tuple(rev[i]) for i in split_train_test(rev, 0.1, seed=42)[1]} == held
    # a copy of a held-out sample is held out too
    twice = samples + [samples[test[0]]]
    assert 400 in split_train_test(twice, 0.1, seed=42)[1]
    # a tiny set still tests on something
    assert len(split_train_test(samples[:3], 0.01, seed=42)[1]) == 1 and split_train_test(samples, 0.0, 42)[1] == []
