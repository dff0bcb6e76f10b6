import pytest
import torch
from torch import nn

from apex_dist.models import ConditionShift, ToyVelocityModel, init_apex_weights
from apex_dist.models.conditioning import combine_time_embeddings
from apex_dist.models.toy import ModulatedBlock, TimeEmbedder


def test_second_time_embedding_is_its_own_module_set_to_the_first_by_init_apex_weights():
    torch.manual_seed(0)
    model = ToyVelocityModel(text_dim=4, hidden_size=32, num_blocks=2)
    first = dict(model.time_text_embed.named_parameters())
    second = dict(model.time_text_embed_2.named_parameters())
    assert not any(torch.equal(first[name], second[name]) for name in first)  # drawn on its own
    init_apex_weights(model)
    for name, parameter in second.items():
        assert (
            torch.equal(parameter, first[name]) and parameter.data_ptr() != first[name].data_ptr()
        )
    t = torch.rand(6)
    embedding = model.time_text_embed
    assert torch.equal(combine_time_embeddings(embedding(t), embedding(t), t, t), embedding(t))
    tt = t * 0.5
    expected = embedding(t) + embedding(tt) * (t - tt)[:, None]
    combined = combine_time_embeddings(embedding(t), model.time_text_embed_2(tt), t, tt)
    assert torch.allclose(combined, expected, atol=1e-6)


def test_second_time_embedding_is_drawn_last_so_other_weights_keep_their_random_stream():
    """E2 draws after every other module: the other weights are those the network drew before
    E2 was a module of its own (text input, E1, input, blocks, output, in that order)."""
    torch.manual_seed(0)
    model = ToyVelocityModel(text_dim=4, hidden_size=32, num_blocks=2)
    torch.manual_seed(0)
    expected = {
        "text_input": nn.Linear(4, 32),
        "time_text_embed": TimeEmbedder(32),
        "input": nn.Linear(2, 32),
        "blocks": nn.ModuleList(ModulatedBlock(32) for _ in range(2)),
        "output_norm": nn.LayerNorm(32),
        "output": nn.Linear(32, 2),
        "time_text_embed_2": TimeEmbedder(32),
    }
    for name, module in expected.items():
        for key, value in module.state_dict().items():
            assert torch.equal(model.get_submodule(name).state_dict()[key], value), (name, key)


def test_init_apex_weights_refuses_a_model_without_two_time_embeddings():
    with pytest.raises(ValueError, match="time_text_embed_2"):
        init_apex_weights(nn.Linear(2, 2))


def test_dual_time_model_equals_the_pretrained_model_at_tt_equal_t():
    """Replacing E1 by E1 + E2*(t-tt) leaves a pretrained model unchanged when tt = t."""
    torch.manual_seed(0)
    model = ToyVelocityModel(text_dim=4, hidden_size=32, num_blocks=2)
    # train E2 away from E1 so the check is not trivially about identical weights
    with torch.no_grad():
        for parameter in model.time_text_embed_2.parameters():
            parameter.add_(torch.randn_like(parameter))
    x, t = torch.randn(5, 2), torch.rand(5)
    text, mask = torch.randn(5, 2, 4), torch.ones(5, 2, dtype=torch.bool)
    fake = torch.zeros(5, dtype=torch.bool)

    class Pretrained(nn.Module):  # the same network with only the first time embedding
        def forward(self, x_t, t):
            tokens = model.text_input(text)
            condition = model.time_text_embed(t) + tokens.mean(1)
            hidden = model.input(x_t)
            for block in model.blocks:
                hidden = block(hidden, condition)
            return model.output(model.output_norm(hidden))

    assert torch.allclose(model(x, t, t, text, mask, fake), Pretrained()(x, t), atol=1e-6)
    assert not torch.allclose(model(x, t, t * 0.3, text, mask, fake), Pretrained()(x, t), atol=1e-3)


def test_condition_shift_applies_only_to_fake_rows():
    shift = ConditionShift(scale=-0.5, bias=1.0)
    text = torch.randn(4, 3, 5)
    fake = torch.tensor([False, True, False, True])
    shifted = shift(text, fake)
    assert torch.equal(shifted[~fake], text[~fake])
    assert torch.allclose(shifted[fake], -0.5 * text[fake] + 1.0)
    assert torch.equal(shift(text, None), text)


def test_learnable_shift_receives_gradient_and_fixed_shift_has_no_parameters():
    assert list(ConditionShift(learnable=False).parameters()) == []
    shift = ConditionShift(learnable=True)
    shift(torch.randn(2, 3, 4), torch.tensor([True, False])).sum().backward()
    assert shift.scale.grad is not None and shift.bias.grad is not None


def test_toy_model_shifts_after_the_text_projection():
    torch.manual_seed(0)
    model = ToyVelocityModel(
        text_dim=4, hidden_size=16, num_blocks=1, shift_scale=-1.0, shift_bias=0.0
    )
    seen = {}
    model.condition_shift.register_forward_hook(
        lambda m, inputs, out: seen.update(i=inputs[0], o=out)
    )
    text = torch.randn(2, 3, 4)
    model(
        torch.randn(2, 2),
        torch.rand(2),
        torch.rand(2),
        text,
        torch.ones(2, 3, dtype=torch.bool),
        torch.tensor([True, False]),
    )
    assert seen["i"].shape == (2, 3, 16)  # projected tokens, not raw text features
    assert torch.allclose(seen["o"][0], -seen["i"][0]) and torch.equal(seen["o"][1], seen["i"][1])
