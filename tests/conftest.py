"""Shared test helpers: tiny batches and instrumented velocity models."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def make_batch(rows: int = 8, data_dim: int = 2, text_dim: int = 4, tokens: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(rows, data_dim, generator=generator),
        "text": torch.randn(rows, tokens, text_dim, generator=generator),
        "text_mask": torch.ones(rows, tokens, dtype=torch.bool),
        "neg_text": torch.randn(1, tokens, text_dim, generator=generator),
        "neg_text_mask": torch.ones(1, tokens, dtype=torch.bool),
    }


class RecordingModel(nn.Module):
    """A linear velocity model that records every call (inputs and whether grad was enabled).

    Its output depends on x, t, tt, the mean text feature and the fake flag, so every input
    matters; `fake_offset` is added to rows flagged fake.
    """

    def __init__(self, data_dim: int = 2, fake_offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(data_dim) * 0.5)
        self.time_weight = nn.Parameter(torch.full((data_dim,), 0.1))
        self.fake_offset = fake_offset
        self.calls: list[dict] = []

    def forward(self, x_t, t, tt, text, text_mask, fake_rows):
        self.calls.append(
            {
                "x_t": x_t.detach().clone(),
                "t": t.detach().clone(),
                "tt": tt.detach().clone(),
                "text": text.detach().clone(),
                "fake_rows": fake_rows.clone(),
                "grad": torch.is_grad_enabled(),
            }
        )
        out = x_t @ self.weight + (t - tt)[:, None] * self.time_weight
        out = out + text.mean(dim=(1, 2))[:, None] * 0.01
        return out + self.fake_offset * fake_rows[:, None].float()


@pytest.fixture
def recording_model():
    return RecordingModel()
