import itertools

import pytest
import torch
from conftest import RecordingModel

from apex_dist.method import (
    EmaReference,
    FrozenReference,
    build_reference,
    ema_update_,
    sample,
    sample_euler,
    timestep_grid,
)
from apex_dist.method.reference import warmed_up_decay


class PointMass(torch.nn.Module):
    """Exact flow of data concentrated at `point` (per row): F = (x_t - point) / t."""

    def __init__(self, point):
        super().__init__()
        self.point = point

    def forward(self, x_t, t, tt, text, text_mask, fake_rows):
        return (x_t - self.point) / t[:, None]


def test_ema_decay_warm_up_follows_the_released_schedule():
    decays, decay = [], 0.0
    for _ in range(3):
        decay = warmed_up_decay(decay, 0.9)
        decays.append(decay)
    assert decays[0] == pytest.approx(0.45)  # 0 + 1 * 0.9 / 2
    assert decays[1] == pytest.approx(0.45 + 0.55 * 0.45 / 2)
    decay = 0.0
    for _ in range(200):
        decay = warmed_up_decay(decay, 0.9)
    assert decay == pytest.approx(0.9, abs=1e-4) and decay < 0.9


def test_ema_update_is_an_in_place_lerp_on_any_tensor_lists():
    averages = [torch.zeros(3), torch.ones(2)]
    ema_update_(averages, [torch.full((3,), 10.0), torch.full((2,), 3.0)], decay=0.75)
    assert torch.allclose(averages[0], torch.full((3,), 2.5))
    assert torch.allclose(averages[1], torch.full((2,), 1.5))
    with pytest.raises(ValueError, match="EMA has 1 tensors but the model has 2"):
        ema_update_([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)], 0.5)


def test_ema_reference_tracks_only_trainable_weights_and_round_trips():
    model = RecordingModel()
    model.time_weight.requires_grad_(False)
    ema = EmaReference(model, target_decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
        model.time_weight.add_(1.0)
    ema.update(model)  # decay 0.25 at the first step
    assert torch.allclose(ema.model.weight, torch.eye(2) * 0.5 + 0.75)
    assert torch.allclose(ema.model.time_weight, torch.full((2,), 0.1))
    assert not any(p.requires_grad for p in ema.parameters())
    copy = EmaReference(RecordingModel(), target_decay=0.5)
    copy.load_state_dict(ema.state_dict())
    assert copy.decay == ema.decay == 0.25
    assert torch.equal(copy.model.weight, ema.model.weight)


def test_reference_modes():
    model = RecordingModel()
    assert build_reference("online", model) is None
    frozen = build_reference("frozen_base", model)
    assert isinstance(frozen, FrozenReference)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(frozen.model.weight, model.weight)
    assert isinstance(build_reference("ema", model, 0.99), EmaReference)
    with pytest.raises(ValueError, match="method.reference.mode"):
        build_reference("teacher", model)


def test_timestep_grids():
    assert timestep_grid(1) == [1.0, 0.0]
    assert timestep_grid(2) == pytest.approx([0.999, 0.6, 0.0])
    four = timestep_grid(4)
    assert four[0] == pytest.approx(0.999) and four[3] == pytest.approx(0.5) and four[-1] == 0.0
    assert all(a > b for a, b in itertools.pairwise(four))
    with pytest.raises(ValueError, match="nfe must be >= 1"):
        timestep_grid(0)
    with pytest.raises(ValueError, match="gap"):
        timestep_grid(2, gap=1.5)


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_few_step_sampler_is_exact_on_an_exact_flow(nfe):
    point = torch.randn(6, 3)
    noise = torch.randn(6, 3)
    samples = sample(PointMass(point), noise, torch.zeros(6, 1, 1), torch.ones(6, 1), nfe=nfe)
    assert torch.allclose(samples, point, atol=1e-5)


def test_few_step_sampler_calls_the_model_with_target_time_zero():
    model = RecordingModel()
    sample(model, torch.randn(4, 2), torch.zeros(4, 1, 1), torch.ones(4, 1), nfe=2)
    assert [float(call["t"][0]) for call in model.calls] == pytest.approx([0.999, 0.6])
    assert all(torch.equal(call["tt"], torch.zeros(4)) for call in model.calls)


def test_euler_sampler_with_classifier_free_guidance():
    point = torch.randn(5, 2)
    noise = torch.randn(5, 2)
    text, mask = torch.zeros(5, 1, 1), torch.ones(5, 1)
    assert torch.allclose(
        sample_euler(PointMass(point), noise, text, mask, steps=7), point, atol=1e-5
    )

    class Conditional(torch.nn.Module):  # velocity 1 with text, 0 with the negative prompt
        def forward(self, x_t, t, tt, text, text_mask, fake_rows):
            return text[:, :1, 0].expand_as(x_t)

    guided = sample_euler(
        Conditional(),
        noise,
        torch.ones(5, 1, 1),
        mask,
        steps=4,
        guidance_scale=3.0,
        neg_text=torch.zeros(1, 1, 1),
        neg_text_mask=torch.ones(1, 1),
    )
    assert torch.allclose(guided, noise - 3.0)  # x - sum(dt) * (0 + 3 * (1 - 0))
    with pytest.raises(ValueError, match="needs neg_text"):
        sample_euler(Conditional(), noise, text, mask, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        sample_euler(Conditional(), noise, text, mask, times=torch.tensor([1.5, 0.0]))


def test_samplers_give_the_image_shape_to_every_model_call():
    shapes = []

    class Grid(torch.nn.Module):
        def forward(self, x_t, t, tt, text, text_mask, fake_rows, image_shape=None):
            shapes.append(image_shape)
            return torch.zeros_like(x_t)

    noise, text, mask = torch.randn(2, 4, 3), torch.zeros(2, 1, 1), torch.ones(2, 1)
    sample(Grid(), noise, text, mask, nfe=2, image_shape=(1, 2, 2))
    sample_euler(Grid(), noise, text, mask, steps=3, image_shape=(1, 2, 2))
    assert shapes == [(1, 2, 2)] * 5
    sample(PointMass(torch.zeros(2, 3)), torch.randn(2, 3), text, mask)  # no keyword: none given


def test_fresh_noise_per_row_generators_make_each_row_its_own():
    from apex_dist.method.sampler import fresh_noise

    like = torch.zeros(3, 5, 7)
    rows = fresh_noise(like, [torch.Generator().manual_seed(seed) for seed in (4, 5, 6)])
    for index, seed in enumerate((4, 5, 6)):
        alone = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(rows[index], alone)
    # one generator: one draw of the whole tensor, as before per-row generators existed
    whole = fresh_noise(like, torch.Generator().manual_seed(4))
    assert torch.equal(whole, torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="one per row"):
        fresh_noise(like, [torch.Generator()])
