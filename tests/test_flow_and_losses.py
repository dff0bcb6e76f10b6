import math

import pytest
import torch

from apex_dist.method import (
    build_loss,
    check_times,
    data_estimate,
    interpolate,
    l2_loss,
    noise_estimate,
    robust_loss,
    sample_time,
    velocity_target,
)


def test_interpolation_and_endpoint_estimates_invert_each_other():
    data, noise = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    x_t = interpolate(data, noise, t)
    assert torch.allclose(x_t[0], data[0]) and torch.allclose(x_t[-1], noise[-1])
    velocity = velocity_target(data, noise)
    # with the exact velocity z - x, both endpoints are recovered at every t
    assert torch.allclose(data_estimate(x_t, t, velocity), data, atol=1e-6)
    assert torch.allclose(noise_estimate(x_t, t, velocity), noise, atol=1e-6)


def test_time_sampling_respects_beta_and_scale():
    torch.manual_seed(0)
    uniform = sample_time(20000)
    assert float(uniform.min()) >= 0 and float(uniform.max()) <= 1
    assert abs(float(uniform.mean()) - 0.5) < 0.01
    skewed = sample_time(20000, beta_p=4.0, beta_q=1.0, scale=0.5)
    assert float(skewed.max()) <= 0.5
    assert abs(float(skewed.mean()) - 0.5 * 4 / 5) < 0.01  # Beta(4, 1) has mean 0.8


def test_times_outside_unit_interval_are_rejected():
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\].*1.5"):
        check_times(torch.tensor([0.2, 1.5]), "t")
    with pytest.raises(ValueError, match="nan"):
        check_times(torch.tensor([float("nan")]), "t")
    check_times(torch.tensor([-0.5, 0.5]), "t", allow_negative=True)
    with pytest.raises(ValueError, match="scale must be in"):
        sample_time(4, scale=1.5)


def test_l2_is_the_per_row_mean_squared_error():
    prediction = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert torch.allclose(l2_loss(prediction, target), torch.tensor([2.5, 4.5]))


def test_robust_loss_value_and_per_row_normalised_gradient():
    scale = 1e-3
    target = torch.zeros(3, 8)
    # rows with errors spanning four orders of magnitude, all far above the scale c
    prediction = torch.stack([torch.full((8,), value) for value in (0.1, 1.0, 100.0)])
    prediction.requires_grad_(True)
    loss = robust_loss(prediction, target, scale)
    mse = prediction.detach().square().mean(1)
    expected = mse / scale / torch.sqrt(mse / scale**2 + 1)
    assert torch.allclose(loss, expected)
    loss.sum().backward()
    norms = prediction.grad.norm(dim=1)
    # d/dp [mse * sg(w) / c] = w/c * 2(p - y)/n, with w/c ~ 1/rmse: norm ~ 2/sqrt(n) per row
    assert torch.allclose(norms, torch.full((3,), 2 / math.sqrt(8)), rtol=1e-3)
    # plain l2 gradients grow with the error
    plain = prediction.detach().clone().requires_grad_(True)
    l2_loss(plain, target).sum().backward()
    assert plain.grad.norm(dim=1)[2] / plain.grad.norm(dim=1)[0] > 900


def test_loss_shapes_must_match_and_kind_must_be_known():
    with pytest.raises(ValueError, match=r"prediction \(2, 3\) and target \(2, 4\)"):
        l2_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="method.loss.kind"):
        build_loss("huber")
