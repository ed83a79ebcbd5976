import torch

from traineagle3.vocab import VocabMap, build_vocab_map, load_or_build, vocab_key


def test_top_tokens_with_deterministic_ties_and_round_trip():
    ids = [[5, 5, 5, 7, 7, 9, 3, 3, 1]]
    mask = [[1, 1, 1, 1, 1, 1, 1, 1, 0]]  # token 1 is not trainable
    vm = build_vocab_map(ids, mask, vocab_size=12, draft_vocab_size=3)
    assert vm.draft_ids.tolist() == [3, 5, 7]  # 5 x3, then 3 and 7 tie at x2 with 9 x1
    assert vm.d2t.tolist() == [3, 4, 5]
    assert vm.t2d.nonzero().flatten().tolist() == [3, 5, 7]
    draft = vm.to_draft(torch.tensor([7, 3, 5]))
    assert draft.tolist() == [2, 0, 1] and vm.to_target(draft).tolist() == [7, 3, 5]


def test_fills_with_lowest_unused_ids_and_identity_when_large():
    vm = build_vocab_map([[9, 9]], [[1, 1]], vocab_size=10, draft_vocab_size=3)
    assert vm.draft_ids.tolist() == [0, 1, 9]
    full = build_vocab_map([[9]], [[1]], vocab_size=10, draft_vocab_size=10)
    assert full.draft_ids.tolist() == list(range(10)) and full.d2t.abs().sum() == 0 and full.t2d.all()


def test_cached_map_is_keyed_by_data_tokenizer_and_size(tmp_path):
    built = []

    def build(n):
        built.append(n)
        return VocabMap(torch.arange(n), 10)

    k1 = vocab_key("data-a", "tok", 10, 4)
    assert load_or_build(tmp_path, k1, lambda: build(4)).draft_vocab_size == 4
    assert load_or_build(tmp_path, k1, lambda: build(99)).draft_vocab_size == 4  # cache hit
    assert vocab_key("data-b", "tok", 10, 4) != k1 and vocab_key("data-a", "tok", 10, 5) != k1
    assert load_or_build(tmp_path, vocab_key("data-b", "tok", 10, 4), lambda: build(3)).draft_vocab_size == 3
    assert built == [4, 3]
