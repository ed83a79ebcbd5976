import pytest
import torch
from transformers import AutoModelForCausalLM

from traineagle3.draft import default_aux_layers, to_vllm_layer_ids
from traineagle3.features import TargetFeatures, add_feature_noise
from traineagle3.vocab import VocabMap


def test_hooked_features_equal_hidden_state_slices_and_teacher_is_draft_vocab_logits(tiny_target):
    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)
    target.lm_head.weight.data *= 20  # peaked logits, so top-1 tokens vary
    ids = torch.randint(0, target.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = target(ids, output_hidden_states=True)
    layers = [1, 2, 3]
    top = ref.logits.argmax(-1)
    vm = VocabMap(torch.unique(torch.cat([top[0, :12], torch.arange(100)])), target.config.vocab_size)
    f = TargetFeatures(target, layers, vm)(ids)
    torch.testing.assert_close(f.aux_hidden, torch.cat([ref.hidden_states[i] for i in layers], -1))
    torch.testing.assert_close(f.teacher, ref.logits[..., vm.draft_ids], rtol=1e-4, atol=1e-4)
    assert torch.equal(f.teacher_ok, vm.t2d[top])
    assert f.teacher_ok.any() and not f.teacher_ok.all()


def test_layer_numbering():
    assert default_aux_layers(32) == [2, 16, 29]
    assert to_vllm_layer_ids([1, 15, 28], "sglang") == [2, 16, 29]
    assert to_vllm_layer_ids([2, 16, 29], "vllm") == [2, 16, 29]


@pytest.mark.parametrize(
    "options",
    [{}, {"fc_norm": True}, {"norm_before_fc": True}, {"norm_before_fc": True, "fc_norm": True}],
    ids=lambda o: "+".join(o) or "eagle3",
)
def test_draft_initialised_from_the_target_reproduces_its_output_from_the_high_layer(tiny_target, options):
    """init_from_target: fc passes the high aux layer through, norm + lm_head are the target's
    (draft rows), so on a target hidden state the draft head scores exactly as the target;
    input_norm / fc_norm start at one, only rescaling each token, which the draft's norm undoes."""
    from traineagle3.draft import Eagle3Draft
    from traineagle3.target_tensors import final_norm

    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)
    vm = VocabMap(torch.arange(3, 300, 2), target.config.vocab_size)
    draft = Eagle3Draft.from_target(target.config, vm, [1, 2, 3], overrides=options)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # whatever they were, init_from_target sets them
    features = TargetFeatures(target, [1, 2, 3], vm)
    draft.init_from_target(features.draft_head, final_norm(tiny_target))
    H = target.config.hidden_size
    aux = torch.randn(2, 5, 3 * H) * torch.tensor(
        [0.01] * H + [1.0] * H + [30.0] * H
    )  # layers of very different scales
    high = aux[..., 2 * H :]
    with torch.no_grad():
        expected = target.lm_head(target.model.norm(high))[..., vm.draft_ids]
        got = draft.lm_head(draft.norm(draft.fc(aux)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if "norm_before_fc" in options:
        return  # the low and mid layers enter the one norm's scale, so they are not switched off exactly
    with torch.no_grad():  # the low and mid layers start switched off, not the high one
        assert not torch.allclose(draft.fc(aux), draft.fc(torch.cat([aux[..., :-1], aux[..., -1:] + 1], -1)))
        torch.testing.assert_close(draft.fc(aux), draft.fc(torch.cat([aux[..., :10] + 1, aux[..., 10:]], -1)))


def test_feature_noise_scales_with_each_aux_layer():
    torch.manual_seed(0)
    aux = torch.cat([torch.full((2, 500, 8), 100.0), torch.full((2, 500, 8), -1.0), torch.zeros(2, 500, 8)], dim=-1)
    noise = (add_feature_noise(aux, 0.2) - aux).unflatten(-1, (3, 8))
    assert noise[..., 0, :].std().item() == pytest.approx(20.0, rel=0.05)
    assert noise[..., 1, :].std().item() == pytest.approx(0.2, rel=0.05)
    assert noise[..., 2, :].abs().max().item() == 0  # a zero feature (padding) stays zero


def test_target_head_init_takes_the_head_and_norm_and_draws_fc(tiny_target):
    """--draft_init target_head: the target's head rows and final norm, fc at random (std 0.02,
    seeded), not the pass-through of 'target'."""
    from traineagle3.draft import Eagle3Draft
    from traineagle3.target_tensors import final_norm

    target = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)
    vm = VocabMap(torch.arange(3, 300, 2), target.config.vocab_size)
    head = TargetFeatures(target, [1, 2, 3], vm).draft_head
    drafts = {}
    for init in ("target", "target_head", "target_head"):
        torch.manual_seed(0)
        drafts.setdefault(init, []).append(
            Eagle3Draft.from_target(
                target.config, vm, [1, 2, 3], init=init, head_rows=head, final_norm=final_norm(tiny_target)
            )
        )
    passing, (drawn, again) = drafts["target"][0], drafts["target_head"]
    H = target.config.hidden_size
    for d in (passing, drawn):
        torch.testing.assert_close(d.lm_head.weight, head)
        torch.testing.assert_close(d.norm.weight, final_norm(tiny_target))
    assert torch.equal(passing.fc.weight[:, 2 * H :], torch.eye(H))
    assert drawn.fc.weight.std().item() == pytest.approx(0.02, rel=0.1) and drawn.fc.weight.mean().abs() < 0.002
    assert torch.equal(drawn.fc.weight, again.fc.weight)  # seeded
    with pytest.raises(ValueError, match="target_head"):
        Eagle3Draft.from_target(target.config, vm, [1, 2, 3], init="target_head")
