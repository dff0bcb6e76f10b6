import torch
from torch import nn

from apex_dist.models import ConditionShift, DualTimeEmbedding, ToyVelocityModel
from apex_dist.models.toy import TimeEmbedder


def test_second_time_embedding_starts_as_a_copy_and_vanishes_at_tt_equal_t():
    torch.manual_seed(0)
    embedder = TimeEmbedder(32)
    dual = DualTimeEmbedding(embedder)
    for first, second in zip(dual.primary.parameters(), dual.target.parameters(), strict=True):
        assert torch.equal(first, second) and first.data_ptr() != second.data_ptr()
    t = torch.rand(6)
    assert torch.equal(dual(t, t), embedder(t))
    tt = t * 0.5
    expected = embedder(t) + embedder(tt) * (t - tt)[:, None]
    assert torch.allclose(dual(t, tt), expected, atol=1e-6)


def test_dual_time_model_equals_the_pretrained_model_at_tt_equal_t():
    """Replacing E1 by E1 + E2*(t-tt) leaves a pretrained model unchanged when tt = t."""
    torch.manual_seed(0)
    model = ToyVelocityModel(text_dim=4, hidden_size=32, num_blocks=2)
    # train E2 away from E1 so the check is not trivially about identical weights
    with torch.no_grad():
        for parameter in model.time_embedding.target.parameters():
            parameter.add_(torch.randn_like(parameter))
    x, t = torch.randn(5, 2), torch.rand(5)
    text, mask = torch.randn(5, 2, 4), torch.ones(5, 2, dtype=torch.bool)
    fake = torch.zeros(5, dtype=torch.bool)

    class Pretrained(nn.Module):  # the same network with only the first time embedding
        def forward(self, x_t, t):
            tokens = model.text_input(text)
            condition = model.time_embedding.primary(t) + tokens.mean(1)
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
