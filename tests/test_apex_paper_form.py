"""The paper-form reading of `apex` (method.apex.reading: paper_form)."""

import pytest
import torch

from apex_dist.config import Config, ConfigError, apply_overrides, from_dict
from apex_dist.data.toy import class_embeddings, sample_data
from apex_dist.method import build_objective
from apex_dist.models import build_model

PAPER_FORM = [
    "method.objective=apex",
    "method.apex.reading=paper_form",
    "method.apex.mix_time_weight=t_times_one_minus_t",
    "method.condition_shift.learnable=true",
    "method.apex.mix_ramp_steps=10",
    "method.loss.kind=l2",
]


def paper_form_config(*extra: str) -> Config:
    return from_dict(Config, apply_overrides({}, [*PAPER_FORM, *extra]), source="test")


def toy_batch(rows: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 8, (rows,), generator=generator)
    return {
        "latents": sample_data(labels, generator),
        "text": class_embeddings()[labels],
        "text_mask": torch.ones(rows, 1, dtype=torch.bool),
    }


def test_paper_form_is_validated():
    with pytest.raises(ConfigError, match="condition_shift.learnable=true"):
        paper_form_config("method.condition_shift.learnable=false")
    with pytest.raises(ConfigError, match="fake_source=noised_data"):
        paper_form_config("method.apex.fake_source=noise")
    with pytest.raises(ConfigError, match="mix_ramp_steps must be >= 0"):
        paper_form_config("method.apex.mix_ramp_steps=-1")


def test_fake_term_trains_only_the_shift_and_mix_term_never_does():
    config = paper_form_config()
    torch.manual_seed(0)
    model = build_model(config)
    objective = build_objective(config.method)
    for fake_weight, mix_weight in ((1.0, 0.0), (0.0, 1.0)):
        config.method.apex.fake_weight, config.method.apex.mix_weight = fake_weight, mix_weight
        model.zero_grad(set_to_none=True)
        loss, _ = objective(model, toy_batch())
        loss.backward()
        shift = [p.grad for n, p in model.named_parameters() if "condition_shift." in n]
        rest = [p.grad for n, p in model.named_parameters() if "condition_shift." not in n]
        if fake_weight:
            assert all(grad is not None and grad.abs().sum() > 0 for grad in shift)
            assert all(grad is None or not grad.any() for grad in rest)
        else:
            assert all(grad is None or not grad.any() for grad in shift)
            assert any(grad is not None and grad.abs().sum() > 0 for grad in rest)
    assert all(p.requires_grad for p in model.parameters())  # switched back after the pass


def test_mix_ratio_ramps_from_zero_over_the_ramp_steps():
    objective = build_objective(paper_form_config().method)
    model = build_model(paper_form_config())
    ratios = []
    for step in (0, 5, 10, 20):
        objective.step = step
        ratios.append(float(objective(model, toy_batch())[1]["mix_ratio"]))
    assert ratios == pytest.approx([0.0, 0.25, 0.5, 0.5])


def test_a_short_run_is_finite_and_changes_the_weights():
    config = paper_form_config()
    torch.manual_seed(0)
    model = build_model(config)
    before = {name: value.detach().clone() for name, value in model.state_dict().items()}
    objective = build_objective(config.method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(6):
        objective.step = step
        loss, metrics = objective(model, toy_batch(seed=step))
        assert all(torch.isfinite(value) for value in metrics.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert not torch.equal(before["condition_shift.scale"], after["condition_shift.scale"])
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > 2  # the network as well as a and b
