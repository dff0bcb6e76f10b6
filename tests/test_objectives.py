import math

import pytest
import torch
from conftest import RecordingModel, make_batch

from apex_dist.config import MethodConfig, from_dict
from apex_dist.data.batch import TrainBatch
from apex_dist.method import NonFiniteLossError, build_objective, data_estimate, interpolate
from apex_dist.method.objectives import consistency_target, time_weight


def method(**sections) -> MethodConfig:
    return from_dict(MethodConfig, sections)


def grads(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    return [p.grad.clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------ fm


def test_fm_is_plain_flow_matching_at_tt_equal_t(recording_model):
    batch = make_batch()
    objective = build_objective({"objective": "fm", "loss": {"kind": "l2"}})
    torch.manual_seed(3)
    loss, metrics = objective(recording_model, batch)
    torch.manual_seed(3)
    t = torch.rand(8)
    noise = torch.randn(8, 2)
    (call,) = recording_model.calls
    assert torch.equal(call["t"], t) and torch.equal(call["tt"], t) and not call["fake_rows"].any()
    x_t = interpolate(batch["latents"], noise, t)
    prediction = recording_model(x_t, t, t, batch["text"], batch["text_mask"], call["fake_rows"])
    expected = (prediction - (noise - batch["latents"])).square().mean()
    assert torch.allclose(loss, expected) and torch.allclose(metrics["loss_fm"], expected)


# ---------------------------------------------------------------------------------- apex


def test_apex_mixed_target_gradient_is_the_lambda_mix_of_both_gradients():
    """grad L_mix = (1-lam) grad L_sup + lam grad L_cons (Eq. 22-24), plain l2."""
    lam = 0.3
    batch = make_batch()
    model = RecordingModel(fake_offset=0.7)
    config = method(
        objective="apex", loss={"kind": "l2"}, apex={"mix_ratio": lam, "fake_weight": 0.0}
    )
    torch.manual_seed(5)
    loss, _ = build_objective(config)(model, batch)
    mixed = grads(model, loss)

    torch.manual_seed(5)
    t = torch.rand(8)
    noise = torch.randn(8, 2)
    x, text, mask = batch["latents"], batch["text"], batch["text_mask"]
    x_t = interpolate(x, noise, t)
    fake = torch.ones(8, dtype=torch.bool)
    x_prediction = data_estimate(x_t, t, model(x_t, t, torch.zeros(8), text, mask, ~fake))
    with torch.no_grad():
        fake_x_prediction = data_estimate(x_t, t, model(x_t, t, t, text, mask, fake))
    supervised = grads(model, (x_prediction - x).square().mean(1).mean())
    consistency = grads(model, (x_prediction - fake_x_prediction).square().mean(1).mean())
    for got, sup, cons in zip(mixed, supervised, consistency, strict=True):
        assert torch.allclose(got, (1 - lam) * sup + lam * cons, atol=1e-6)


@pytest.mark.parametrize("correction", ["toward_fake", "away_from_fake"])
def test_apex_correction_sign(correction):
    """toward_fake pulls the x-prediction to the fake branch's; away_from_fake pushes it away."""
    batch = make_batch()
    model = RecordingModel(fake_offset=0.5)  # fake velocity larger: fake x-prediction smaller
    config = method(
        objective="apex",
        loss={"kind": "l2"},
        apex={"mix_ratio": 1.0, "fake_weight": 0.0, "correction": correction},
    )
    torch.manual_seed(0)
    loss, _ = build_objective(config)(model, batch)
    model.zero_grad()
    loss.backward()
    # the x-prediction is x_t - t*F: its offset from the fake one is +t*0.5 per coordinate.
    # toward_fake lowers the x-prediction, i.e. raises F: gradient on the bias-like time weight
    # is negative (loss decreases as F grows); away_from_fake does the opposite.
    direction = -torch.sign(model.time_weight.grad).mean()
    assert direction == (1 if correction == "toward_fake" else -1)


def test_apex_detach_fake_stops_gradient_through_x_fake():
    batch = make_batch()
    gradients = {}
    for detach in (False, True):
        model = RecordingModel(fake_offset=0.2)
        config = method(
            objective="apex", loss={"kind": "l2"}, apex={"mix_weight": 0.0, "detach_fake": detach}
        )
        torch.manual_seed(1)
        loss, _ = build_objective(config)(model, batch)
        gradients[detach] = grads(model, loss)
        # the real-branch call has tt = 0 (default target_time: zero); the fake branch tt = t
        real, fake_branch = model.calls[0], model.calls[1]
        assert torch.equal(real["tt"], torch.zeros(8)) and not real["fake_rows"].any()
        assert torch.equal(fake_branch["tt"], fake_branch["t"]) and fake_branch["fake_rows"].all()
    assert not all(
        torch.allclose(a, b) for a, b in zip(gradients[False], gradients[True], strict=True)
    )


# ------------------------------------------------------------------------------- apex_v0


def v0(**apex_v0):
    return build_objective(
        method(objective="apex_v0", loss={"kind": "l2"}, guidance={"ratio": 0.8}, apex_v0=apex_v0)
    )


def test_apex_v0_assigns_four_contiguous_roles():
    model = RecordingModel()
    torch.manual_seed(0)
    v0(fake_flag="shift")(model, make_batch(rows=16))
    grad_calls = [call for call in model.calls if call["grad"]]
    assert len(grad_calls) == 1  # the single gradient pass
    call = grad_calls[0]
    t, tt, fake = call["t"], call["tt"], call["fake_rows"]
    e2e, mul, anystep, adv = slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)
    assert torch.equal(t[e2e], torch.ones(4)) and torch.equal(tt[e2e], torch.zeros(4))
    assert ((tt[mul] <= t[mul]) & (tt[mul] >= t[mul] * 0.95)).all()
    assert ((tt[anystep] >= 0) & (tt[anystep] <= t[anystep])).all()
    assert torch.equal(tt[adv], t[adv])
    assert fake.tolist() == [False] * 12 + [True] * 4
    assert (t >= 0).all()


def test_apex_v0_negative_time_flag():
    model = RecordingModel()
    v0(fake_flag="neg_time")(model, make_batch(rows=8))
    (call,) = [call for call in model.calls if call["grad"]]
    assert not call["fake_rows"].any()
    assert (call["t"][6:] < 0).all() and (call["t"][:6] >= 0).all()
    assert torch.equal(call["tt"][6:], call["t"][6:])
    model = RecordingModel()
    v0(fake_flag="shift+neg_time")(model, make_batch(rows=8))
    (call,) = [call for call in model.calls if call["grad"]]
    assert call["fake_rows"].tolist() == [False] * 6 + [True] * 2 and (call["t"][6:] < 0).all()


def test_apex_v0_adv_rows_train_on_one_step_samples():
    model = RecordingModel()
    batch = make_batch(rows=8)
    v0()(model, batch)
    first = model.calls[0]  # the one-step sample of the adv rows, before the gradient pass
    assert not first["grad"] and first["x_t"].shape[0] == 2
    assert torch.equal(first["t"], torch.ones(2)) and torch.equal(first["tt"], torch.zeros(2))
    with torch.no_grad():
        generated = first["x_t"] - model(
            first["x_t"],
            first["t"],
            first["tt"],
            first["text"],
            None,
            torch.zeros(2, dtype=torch.bool),
        )
    (grad_call,) = [call for call in model.calls if call["grad"]]
    t = grad_call["t"][6:].abs()[:, None]
    noise = (grad_call["x_t"][6:] - (1 - t) * generated) / t
    # x_t of the adv rows is an interpolation of the generated samples (not of the latents)
    assert noise.abs().max() < 10 and not torch.allclose(generated, batch["latents"][6:])


def test_apex_v0_only_the_single_grad_pass_carries_gradient():
    model = RecordingModel(fake_offset=0.3)
    loss, metrics = v0()(model, make_batch(rows=8))
    assert sum(call["grad"] for call in model.calls) == 1
    assert len(model.calls) > 5  # one-step, guidance x2, roll-out x2, DMD x2, grad pass
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert metrics["nograd_batch_equivalents"] == pytest.approx(3.25)


def test_apex_v0_rejects_a_micro_batch_that_is_not_a_multiple_of_four():
    with pytest.raises(ValueError, match=r"multiple of 4 \(got 6\).*four roles"):
        v0()(RecordingModel(), make_batch(rows=6))


def test_time_weight_is_one_at_gap_one_and_about_4_08_at_gap_zero():
    weights = time_weight(torch.tensor([1.0, 0.5, -0.3]), torch.tensor([0.0, 0.5, -0.3]))
    assert weights[0] == pytest.approx(1.0)
    assert (
        weights[1] == pytest.approx(math.tan(math.pi / 2.5) + 1) == pytest.approx(4.0777, abs=1e-3)
    )
    assert weights[2] == pytest.approx(weights[1])  # signed (fake-flagged) times use |t|


class PointMassFlow(torch.nn.Module):
    """Exact mean velocity of data concentrated at `point`: F = (x_t - point) / t for any tt."""

    def __init__(self, point, error=0.0):
        super().__init__()
        self.point, self.error = point, error

    def forward(self, x_t, t, tt, text, text_mask, fake_rows):
        return (x_t - self.point) / t.abs()[:, None] + self.error


def test_consistency_target_is_the_prediction_when_already_consistent():
    point = torch.tensor([[0.5, -1.0]])
    exact = PointMassFlow(point)
    t = torch.tensor([1.0, 0.8, 0.6, 0.3])
    tt = torch.tensor([0.0, 0.2, 0.595, 0.1])  # the third row has a gap below delta
    noise = torch.randn(4, 2)
    x_t = interpolate(point.expand(4, 2), noise, t)
    velocity = noise - point
    prediction = exact(x_t, t, tt, None, None, None)
    arguments = (x_t, t, tt, velocity, None, None, 2, 0.01, 1.0)
    target = consistency_target(exact, prediction, *arguments)
    assert torch.allclose(target, prediction, atol=1e-4)
    # a prediction that is off by +0.003 in position over the step (t - tt) gets pulled back
    wrong = prediction + 0.05
    target = consistency_target(exact, wrong, *arguments)
    gap = (t - tt)[:, None]
    expected_residual = torch.where(gap < 0.01, torch.full_like(gap, 0.05), gap * 0.05 / 0.01)
    assert torch.allclose(wrong - target, expected_residual.clamp(-1, 1).expand(4, 2), atol=1e-4)


def test_guidance_is_baked_into_the_target_of_mul_and_any_rows():
    """Rows whose target is v (small gap) get v + w*(F(c) - F(c_neg)) exactly."""
    batch = make_batch(rows=8)

    class Constant(torch.nn.Module):  # reference: velocity 1 with the text, 0 with neg_text
        def forward(self, x_t, t, tt, text, text_mask, fake_rows):
            with_text = (text - batch["neg_text"]).abs().sum(dim=(1, 2)) > 0
            return with_text.float()[:, None].expand_as(x_t)

    model = RecordingModel()
    config = method(
        objective="apex_v0",
        loss={"kind": "l2"},
        guidance={"ratio": 0.8},
        apex_v0={"mul_jitter": 0.0, "distribution_matching_weight": 0.0},
    )
    torch.manual_seed(0)
    _, metrics = build_objective(config)(model, batch, reference=Constant())
    (call,) = [c for c in model.calls if c["grad"]]
    x_t, t = call["x_t"], call["t"]
    # reconstruct the mul rows' data and noise: latents are the data for non-adv rows
    data = batch["latents"][2:4]
    noise = (x_t[2:4] - (1 - t[2:4, None]) * data) / t[2:4, None]
    with torch.no_grad():
        prediction = model(
            x_t[2:4],
            t[2:4],
            call["tt"][2:4],
            batch["text"][2:4],
            None,
            torch.zeros(2, dtype=torch.bool),
        )
    goal = noise - data + 0.8 * (1.0 - 0.0)  # v + w * (F_ref(c) - F_ref(c_neg))
    target = prediction - (prediction - goal).clamp(-1, 1)  # gap < delta: residual F - v
    expected = (prediction - target).square().mean(1).mean()
    assert torch.allclose(metrics["loss_mul"], expected, atol=1e-5)
    unguided = prediction - (prediction - (noise - data)).clamp(-1, 1)
    assert not torch.allclose(metrics["loss_mul"], (prediction - unguided).square().mean(1).mean())


def test_data_free_mode_needs_no_latents_and_uses_the_teachers_guided_velocity():
    batch = make_batch(rows=8)
    del batch["latents"]
    batch["latent_shape"] = (2,)
    model = RecordingModel()
    config = method(
        objective="apex_v0",
        loss={"kind": "l2"},
        guidance={"ratio": 4.0},
        reference={"mode": "frozen_base"},
        apex_v0={"data_free": True},
    )
    loss, metrics = build_objective(config)(model, batch, reference=RecordingModel())
    assert torch.isfinite(loss)
    first = model.calls[0]  # every row first gets the model's own one-step sample
    assert first["x_t"].shape[0] == 8 and torch.equal(first["t"], torch.ones(8))
    assert metrics["nograd_batch_equivalents"] == pytest.approx(4.0)
    with pytest.raises(KeyError, match="latent_shape"):
        del batch["latent_shape"]
        build_objective(config)(model, batch, reference=RecordingModel())


def test_distribution_matching_moves_along_fake_minus_real():
    model = RecordingModel(fake_offset=0.3)  # the shifted branch predicts 0.3 more
    config = method(objective="apex_v0", loss={"kind": "l2"}, guidance={"ratio": 0.0})
    _, metrics = build_objective(config)(model, make_batch(rows=8))
    # target F - clamp(F_fake - F_real) = F - 0.3: l2 = 0.09
    assert metrics["loss_distribution"] == pytest.approx(0.09, rel=1e-4)


# ------------------------------------------------------------------------------ bad input


def test_batch_errors_name_the_key():
    objective = build_objective({"objective": "fm"})
    batch = make_batch()
    with pytest.raises(KeyError, match="'text_mask'"):
        objective(RecordingModel(), {k: v for k, v in batch.items() if k != "text_mask"})
    with pytest.raises(ValueError, match=r"batch.text_mask \(8, 2\)"):
        objective(RecordingModel(), {**batch, "text_mask": torch.ones(8, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"batch.latents has 4 rows but batch.text has 8"):
        objective(RecordingModel(), {**batch, "latents": torch.randn(4, 2)})
    with pytest.raises(KeyError, match="data_free"):
        objective(RecordingModel(), {k: v for k, v in batch.items() if k != "latents"})
    guided = v0()
    with pytest.raises(KeyError, match=r"guidance.ratio"):
        guided(RecordingModel(), {k: v for k, v in batch.items() if not k.startswith("neg")})


def test_model_output_of_the_wrong_shape_is_reported():
    class Wrong(torch.nn.Module):
        def forward(self, x_t, *rest):
            return x_t[:, :1]

    with pytest.raises(ValueError, match=r"velocity of shape \(8, 1\) for x_t of shape \(8, 2\)"):
        build_objective({"objective": "fm"})(Wrong(), make_batch())


def test_non_finite_loss_names_the_term():
    model = RecordingModel()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="objective fm: non-finite loss term"):
        build_objective({"objective": "fm"})(model, make_batch())
    with pytest.raises(NonFiniteLossError) as caught:
        build_objective({"objective": "apex"})(model, make_batch())
    assert "loss_fake" in caught.value.terms and "loss_mix" in caught.value.terms
    # the check is switchable
    loss, _ = build_objective({"objective": "fm", "check_finite": False})(model, make_batch())
    assert torch.isnan(loss)


# ---------------------------------------------------------------------------- the batch type


class GridRecordingModel(RecordingModel):
    """A RecordingModel that takes Qwen-Image's `image_shape` keyword and records it."""

    def __init__(self, **named):
        super().__init__(**named)
        self.image_shapes = []

    def forward(self, x_t, t, tt, text, text_mask, fake_rows, image_shape=None):
        self.image_shapes.append(image_shape)
        return super().forward(x_t, t, tt, text, text_mask, fake_rows)


@pytest.mark.parametrize(
    "sections",
    [
        {"objective": "fm"},
        {"objective": "apex", "apex": {"fake_source": "noise"}},
        {"objective": "apex_v0", "reference": {"mode": "frozen_base"}},
    ],
    ids=["fm", "apex", "apex_v0"],
)
def test_objectives_read_a_typed_batch_and_give_its_image_shape_to_every_model_call(sections):
    """The batch's token grid reaches the model and the reference with every call, from a
    TrainBatch built by hand as from the equivalent dict."""
    fields = make_batch(rows=8)
    batch = TrainBatch(**fields, image_shape=(1, 2, 1))
    losses = []
    for given in (batch, {**fields, "image_shape": (1, 2, 1)}):
        model, reference = GridRecordingModel(), GridRecordingModel()
        torch.manual_seed(0)
        loss, _ = build_objective(sections)(model, given, reference=reference)
        losses.append(loss)
        calls = model.image_shapes + reference.image_shapes
        assert model.image_shapes and calls == [(1, 2, 1)] * len(calls)
        if sections["objective"] != "fm":
            assert reference.image_shapes  # the no-grad passes went to the reference
    assert torch.equal(losses[0], losses[1])


def test_a_data_free_batch_generates_its_latent_shape():
    batch = TrainBatch(
        text=torch.randn(8, 3, 4), text_mask=torch.ones(8, 3, dtype=torch.bool), latent_shape=(2,)
    )
    assert batch.generated_shape() == (8, 2)
    model = RecordingModel()
    config = {"objective": "apex_v0", "guidance": {"ratio": 0.0}, "apex_v0": {"data_free": True}}
    build_objective(config)(model, batch)
    assert model.calls[0]["x_t"].shape == (8, 2)
    with pytest.raises(TypeError, match="TrainBatch or a dict"):
        build_objective(config)(model, [batch])
