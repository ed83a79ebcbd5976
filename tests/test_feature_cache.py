"""The offline feature cache: same features and losses as online, resumable, never stale."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from traineagle3 import feature_cache
from traineagle3.data import collate
from traineagle3.draft import Eagle3Draft
from traineagle3.feature_cache import MANIFEST, FeatureCache, cache_folder, cache_parts, ensure_cache, shard_path
from traineagle3.features import Features, TargetFeatures
from traineagle3.target_tensors import embedding_and_head
from traineagle3.vocab import VocabMap

LENGTHS = [9, 30, 17, 4, 25, 12, 30]


@pytest.fixture(scope="module")
def setup(tiny_target):
    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)
    target.lm_head.weight.data *= 20  # peaked: some top-1 tokens fall outside the draft vocabulary
    vocab = VocabMap(torch.arange(0, target.config.vocab_size, 2), target.config.vocab_size)  # about half the top-1s
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(0, 4000, (n,), generator=g).tolist(),
            "loss_mask": (torch.rand(n, generator=g) > 0.3).long().tolist(),
        }
        for n in LENGTHS
    ]
    return target, vocab, data, TargetFeatures(target, [1, 2, 3], vocab)


def build(tmp_path, tiny_target, setup, dtype="bfloat16", extract=None, **kw):
    target, vocab, data, features = setup
    parts = cache_parts("data-key", str(tiny_target), "float32", [1, 2, 3], vocab, dtype)
    folder = cache_folder(tmp_path, parts)
    cache = ensure_cache(
        folder,
        parts,
        data,
        lambda: extract or features.hidden,
        hidden_size=64,
        aux_size=192,
        batch_size=2,
        pad_id=0,
        **kw,
    )
    return cache, parts


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(feature_cache, "SHARD_BYTES", 40 * (64 + 192) * 2)  # about 40 bf16 tokens per shard


def losses(draft, f, batch):
    r = draft(f.aux_hidden.float(), batch["input_ids"], batch["loss_mask"], f.teacher, f.teacher_ok, steps=3)
    assert all(int(n) > 0 for n in r.count)
    return torch.stack([r.loss, *r.step_loss]), [int(c) for c in r.correct]


# tolerances: features (bf16 keeps 8 bits of mantissa), then losses (relative, of losses ~25)
@pytest.mark.parametrize("dtype,tol,loss_tol", [("float32", 1e-5, 1e-6), ("bfloat16", 1e-2, 1e-4)])
def test_cached_features_and_losses_equal_online(tmp_path, tiny_target, setup, small_shards, dtype, tol, loss_tol):
    target, vocab, data, features = setup
    cache, _ = build(tmp_path, tiny_target, setup, dtype)
    assert len(list(cache.folder.glob("shard-*.safetensors"))) >= 3 and len(cache) == len(data)
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(target.config, vocab, [1, 2, 3], target.get_input_embeddings().weight.data)
    for ids in ([1, 6], [3, 0, 4], [5]):  # samples from different shards, padded to the longest
        online_batch = collate([data[i] for i in ids], 0)
        online = features(online_batch["input_ids"])
        batch = cache.batch(ids, 0)
        cached = Features.from_last_hidden(
            batch["aux_hidden"], batch["last_hidden"], batch["teacher_ok"], features.draft_head
        )
        for k in ("input_ids", "loss_mask", "attention_mask"):
            assert torch.equal(batch[k], online_batch[k])
        real = online_batch["attention_mask"].bool()
        assert torch.equal(cached.teacher_ok[real], online.teacher_ok[real]) and not cached.teacher_ok[real].all()
        torch.testing.assert_close(cached.aux_hidden[real].float(), online.aux_hidden[real], rtol=tol, atol=tol)
        torch.testing.assert_close(cached.teacher[real], online.teacher[real], rtol=tol, atol=tol * 10)
        (got, got_correct), (want, want_correct) = losses(draft, cached, batch), losses(draft, online, online_batch)
        torch.testing.assert_close(got, want, rtol=loss_tol, atol=0)
        if dtype == "float32":
            assert got_correct == want_correct


def test_a_killed_build_resumes_with_only_the_missing_shards(tmp_path, tiny_target, setup, small_shards):
    calls = []

    def dies_on_third_batch(ids):
        calls.append(ids.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return setup[3].hidden(ids)

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, tiny_target, setup, extract=dies_on_third_batch)
    folder = next(tmp_path.glob("features-*"))
    done = sorted(p.name for p in folder.glob("shard-*.safetensors"))
    assert done and not (folder / MANIFEST).exists()
    with pytest.raises(FileNotFoundError):
        FeatureCache(folder, {})  # no manifest: not a cache to train from
    mtimes = {n: (folder / n).stat().st_mtime_ns for n in done}

    calls.clear()
    resumed, _ = build(
        tmp_path, tiny_target, setup, extract=lambda ids: calls.append(ids.shape[0]) or setup[3].hidden(ids)
    )
    assert {n: (folder / n).stat().st_mtime_ns for n in done} == mtimes  # finished shards were kept as they were
    assert 0 < sum(calls) < len(LENGTHS)  # and only the others' samples went through the target
    fresh, _ = build(tmp_path / "fresh", tiny_target, setup)
    everything = list(range(len(LENGTHS)))
    for k, v in fresh.batch(everything, 0).items():
        assert torch.equal(resumed.batch(everything, 0)[k], v), k


def test_ranks_share_the_shards_and_rank0_completes_the_manifest(tmp_path, tiny_target, setup, small_shards):
    target, vocab, data, features = setup
    parts = cache_parts("data-key", str(tiny_target), "float32", [1, 2, 3], vocab, "bfloat16")
    folder = cache_folder(tmp_path, parts)
    kw = dict(hidden_size=64, aux_size=192, batch_size=2)
    plan = feature_cache.build_shards(folder, parts, data, lambda: features.hidden, rank=1, world=2, **kw)
    assert sorted(p.name for p in folder.glob("shard-*")) == [
        shard_path(folder, j).name for j in range(1, len(plan), 2)
    ]
    with pytest.raises(FileNotFoundError, match="missing"):
        feature_cache.write_manifest(folder, parts, plan)
    cache = ensure_cache(folder, parts, data, lambda: features.hidden, rank=0, world=2, **kw)
    assert len(cache) == len(data)


def test_a_cache_is_keyed_by_what_its_features_depend_on(tmp_path, tiny_target, setup):
    _, vocab, _, _ = setup
    base = cache_parts("data-key", str(tiny_target), "float32", [1, 2, 3], vocab, "bfloat16")
    other_vocab = VocabMap(vocab.draft_ids + 1, vocab.vocab_size)
    variants = [
        cache_parts("other-data", str(tiny_target), "float32", [1, 2, 3], vocab, "bfloat16"),
        cache_parts("data-key", str(tiny_target), "bfloat16", [1, 2, 3], vocab, "bfloat16"),
        cache_parts("data-key", str(tiny_target), "float32", [1, 2, 3], other_vocab, "bfloat16"),
        cache_parts("data-key", str(tiny_target), "float32", [1, 2, 3], vocab, "float16"),
    ]
    assert len({cache_folder(tmp_path, p) for p in [base, *variants]}) == 5
    cache, parts = build(tmp_path, tiny_target, setup)
    with pytest.raises(ValueError, match="built for"):
        FeatureCache(cache.folder, variants[2])


def test_embedding_and_head_are_read_without_the_model(tiny_target, smol_path):
    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)
    embed, head = embedding_and_head(tiny_target, AutoConfig.from_pretrained(tiny_target))
    assert torch.equal(embed.float(), target.get_input_embeddings().weight)
    assert torch.equal(head.float(), target.lm_head.weight) and not torch.equal(head, embed)
    embed, head = embedding_and_head(smol_path, AutoConfig.from_pretrained(smol_path))  # tied: head is the embedding
    assert head is embed and embed.shape[0] == AutoConfig.from_pretrained(smol_path).vocab_size


def test_shards_are_cut_by_bytes_and_by_samples(monkeypatch):
    monkeypatch.setattr(feature_cache, "SHARD_BYTES", 100)
    monkeypatch.setattr(feature_cache, "SHARD_SAMPLES", 3)
    plan = feature_cache.plan_shards([10, 10, 10, 10, 60, 50, 200, 1, 1], bytes_per_token=1)
    # the first shard stops at 3 samples; 10+60 then fits 100 bytes, +50 would not; 200 is alone
    assert plan == [(0, 3), (3, 5), (5, 6), (6, 7), (7, 9)]
    assert [i for a, b in plan for i in range(a, b)] == list(range(9))
