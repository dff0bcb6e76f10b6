"""Golden losses: refactors keep the numbers.

Five tiny runs on 2 gloo ranks (ZeRO-3 and ZeRO-2; LoRA and full; the three objectives;
references online, frozen_base and ema; guidance; prompt-only data-free), 20 optimizer steps for
the ZeRO-3 full and LoRA runs and 5 for the others, with fixed seeds; every rank's loss at
every step must equal the values recorded in `tests/golden_losses.json` to
GOLDEN_RELATIVE_TOLERANCE.

A change that is meant to change the numbers regenerates the file, and says why in its commit:

    APEX_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden_losses.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from test_engine import TinyLatentStream, _spawn, _trainer, tiny_config

GOLDEN_FILE = Path(__file__).with_name("golden_losses.json")
# Relative difference allowed between a loss and its golden value: fp32 on CPU with fixed seeds
# repeats to the last bit on one machine (the issue asks for 1e-6).
GOLDEN_RELATIVE_TOLERANCE = 1e-6
# Optimizer steps per run: the two main recipes longer, the other variants shorter.
STEPS = {
    "apex_v0_zero3_full_ema_guided": 20,
    "apex_v0_zero3_lora_frozen_base": 20,
    "apex_paper_noise_zero3_online": 5,
    "fm_zero2": 5,
    "apex_v0_data_free_zero3": 5,
}

RUNS = {
    "apex_v0_zero3_full_ema_guided": [],
    "apex_v0_zero3_lora_frozen_base": [
        "model.lora.enabled=true",
        "model.lora.rank=4",
        "model.lora.alpha=4.0",
        "method.reference.mode=frozen_base",
        "parallel.activation_checkpointing=1",
    ],
    "apex_paper_noise_zero3_online": [
        "method.objective=apex",
        "method.apex.fake_source=noise",
        "method.apex.correction=away_from_fake",
        "method.reference.mode=online",
        "method.guidance.ratio=0",
    ],
    "fm_zero2": [
        "method.objective=fm",
        "method.reference.mode=online",
        "method.guidance.ratio=0",
        "parallel.zero_stage=2",
    ],
    "apex_v0_data_free_zero3": [
        "method.apex_v0.data_free=true",
        "method.reference.mode=online",
        "data.resolution=32",
    ],
}


class PromptOnlyStream(TinyLatentStream):
    """The tiny stream without latents: text features only (prompt-only, precomputed)."""

    def __iter__(self):
        for batch in super().__iter__():
            del batch["latents"], batch["image_shape"]
            yield batch


def scenario_golden(rank: int, directory: Path) -> dict:
    from apex_dist.distributed.runtime import init_distributed
    from apex_dist.trainer import Trainer

    losses = {}
    for name, overrides in RUNS.items():
        config = tiny_config(
            directory / name,
            f"train.steps={STEPS[name]}",
            "checkpoint.every_steps=0",
            "model.preset=qwen-image-tiny",
            *overrides,
        )
        if name == "apex_v0_data_free_zero3":
            trainer = Trainer(config, init_distributed(), stream_factory=PromptOnlyStream)
        else:
            trainer = _trainer(config)
        summary = trainer.train()
        trainer.close()
        losses[name] = [entry["loss"] for entry in summary.history]
    return losses


def test_losses_equal_the_golden_values(tmp_path):
    results = _spawn("test_golden_losses.scenario_golden", tmp_path)
    measured = {name: [rank[name] for rank in results] for name in RUNS}  # name -> rank -> step
    for name, per_rank in measured.items():
        assert all(len(losses) == STEPS[name] for losses in per_rank), name
        assert all(math.isfinite(loss) for losses in per_rank for loss in losses), name
    if os.environ.get("APEX_REGENERATE_GOLDEN"):
        GOLDEN_FILE.write_text(json.dumps(measured, indent=1) + "\n")
    golden = json.loads(GOLDEN_FILE.read_text())
    assert sorted(golden) == sorted(measured)
    for name in RUNS:
        torch.testing.assert_close(
            torch.tensor(measured[name], dtype=torch.float64),
            torch.tensor(golden[name], dtype=torch.float64),
            rtol=GOLDEN_RELATIVE_TOLERANCE,
            atol=0.0,
            msg=lambda message, name=name: f"{name}: {message}",
        )
