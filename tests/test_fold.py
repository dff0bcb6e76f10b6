"""The one-step fold (apex_dist.models.fold): E2 written into E1's last bias."""

from __future__ import annotations

import pytest
import torch

from apex_dist.models.fold import (
    E2_KEYS,
    FOLD_BIAS_KEY,
    fold_offset,
    target_embedding_at_zero,
    unfold_offset,
)
from apex_dist.models.qwen_image import QWEN_IMAGE_PRESETS, QwenImageTransformer

TINY = QWEN_IMAGE_PRESETS["qwen-image-tiny"]
IMAGE_SHAPE = (1, 2, 2)


def student(seed: int = 0) -> QwenImageTransformer:
    """A tiny model whose E2 differs from E1, as after APEX training."""
    torch.manual_seed(seed)
    model = QwenImageTransformer(**TINY).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def inputs(rows: int = 3):
    generator = torch.Generator().manual_seed(1)
    tokens = IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    return (
        torch.randn(rows, tokens, TINY["in_channels"], generator=generator),
        torch.randn(rows, 5, TINY["joint_attention_dim"], generator=generator),
        torch.ones(rows, 5, dtype=torch.bool),
    )


def velocity(model, x, t, tt, text, mask):
    rows = x.shape[0]
    times = torch.full((rows,), t)
    with torch.no_grad():
        return model(
            x,
            times,
            torch.full((rows,), tt),
            text,
            mask,
            torch.zeros(rows, dtype=torch.bool),
            image_shape=IMAGE_SHAPE,
        )


def folded_copy(model, time):
    """The model with d folded into E1 and E2 made inert (an ordinary transformer at tt = t)."""
    state = model.state_dict()
    folded = student()
    changed = dict(state)
    changed[FOLD_BIAS_KEY] = state[FOLD_BIAS_KEY] + fold_offset(state, time)
    folded.load_state_dict(changed)
    return folded


@pytest.mark.parametrize("time", [1.0, 0.999, 0.5])
def test_the_folded_model_at_tt_equal_t_is_the_student_at_one_step(time):
    model = student()
    x, text, mask = inputs()
    expected = velocity(model, x, time, 0.0, text, mask)
    # tt = t: E2 contributes nothing, as in a stock client that has no E2
    folded = velocity(folded_copy(model, time), x, time, time, text, mask)
    assert torch.allclose(folded, expected, atol=1e-5)
    # without the fold the stock reading is a different model
    plain = velocity(model, x, time, time, text, mask)
    assert (plain - expected).abs().max() > 1e-3


def test_the_fold_is_exact_only_at_its_time_and_unfolding_restores_other_times():
    model = student()
    x, text, mask = inputs()
    folded = folded_copy(model, 1.0)
    expected = velocity(model, x, 0.6, 0.0, text, mask)
    assert (velocity(folded, x, 0.6, 0.6, text, mask) - expected).abs().max() > 1e-3
    state = folded.state_dict()
    state[FOLD_BIAS_KEY] = state[FOLD_BIAS_KEY] + unfold_offset(model.state_dict(), 1.0, 0.6)
    folded.load_state_dict(state)
    assert torch.allclose(velocity(folded, x, 0.6, 0.6, text, mask), expected, atol=1e-5)


def test_e2_at_zero_is_the_models_e2_and_missing_tensors_are_named():
    model = student()
    at_zero = model.time_text_embed_2(torch.zeros(1), torch.float32)[0]
    assert torch.allclose(target_embedding_at_zero(model.state_dict()), at_zero, atol=1e-6)
    partial = {key: value for key, value in model.state_dict().items() if key != E2_KEYS[2]}
    with pytest.raises(KeyError, match=E2_KEYS[2]):
        target_embedding_at_zero(partial)
