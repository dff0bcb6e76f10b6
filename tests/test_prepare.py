"""The batch preparer: prompt-only shapes and buckets, text dropout, encoders from the config,
and which methods need images."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from apex_dist.config import ConfigError, load_config
from apex_dist.data.batch import TrainBatch
from apex_dist.data.prepare import BatchPreparer, LatentGeometry, latent_geometry
from apex_dist.distributed.launcher_watch import LauncherWatch, launcher_ancestors

CPU = torch.device("cpu")


def prompt_config(*overrides: str):
    return load_config(
        None,
        [
            "model.preset=qwen-image-tiny",
            "data.kind=synthetic",
            "data.sample_kind=prompt",
            "data.resolution=32",
            "method.apex_v0.data_free=true",
            "method.guidance.ratio=0",
            *overrides,
        ],
    )


def features(rows: int, tokens: int = 3, width: int = 32) -> dict:
    return {
        "key": [f"k{row}" for row in range(rows)],
        "text": torch.randn(rows, tokens, width),
        "text_mask": torch.ones(rows, tokens, dtype=torch.bool),
    }


def test_prompt_only_batches_carry_the_generated_shape_of_their_bucket():
    config = prompt_config("data.aspect_buckets=[1.0,4.0]", "data.resolution=64")
    preparer = BatchPreparer(config, CPU, rank_seed=0)
    # 64 px square -> 4x4 tokens; ratio 4 -> 128 x 32 px -> 2 x 8 tokens (16 px per token)
    seen = set()
    for step in range(12):
        batch = preparer(features(4), step=step)
        frames, height, width = batch.image_shape
        assert frames == 1 and batch.latent_shape == (height * width, 16)
        seen.add(batch.image_shape)
    assert seen == {(1, 4, 4), (1, 2, 8)}  # both buckets are drawn


class CountingEncoder:
    """A text encoder stand-in: one token per word, prompts of over 3 words are cut."""

    max_length = 3

    def encode(self, prompts):
        self.last_truncated = sum(len(prompt.split()) > self.max_length for prompt in prompts)
        text = torch.ones(len(prompts), self.max_length, 32)
        return text, torch.ones(len(prompts), self.max_length, dtype=torch.bool)


def test_prompts_become_a_typed_batch_with_their_keys_prompts_and_truncation_count():
    preparer = BatchPreparer(prompt_config("data.resolution=64"), CPU, rank_seed=0)
    preparer._text_encoder = CountingEncoder()
    raw = {
        "key": ["a", "b", "c"],
        "prompt": ["a red cube", "two blue balls on grass", "one green cone on top"],
        "metadata": [{}, {}, {}],
    }
    batch = preparer(raw)
    assert isinstance(batch, TrainBatch)
    assert batch.keys == ["a", "b", "c"] and batch.prompts == raw["prompt"]
    assert batch.labels() == raw["prompt"]
    assert batch.truncated_prompts == 2 and batch.text_dropped == 0
    assert batch.text.shape == (3, 3, 32) and batch.text.dtype == torch.float32
    assert batch.latents is None and batch.image_shape == (1, 4, 4)
    assert batch.latent_shape == (16, 16)
    assert batch.generated_shape() == (3, 16, 16)
    # a second batch counts its own prompts only
    assert preparer({"key": ["d"], "prompt": ["short"]}).truncated_prompts == 0


def test_collated_image_shapes_become_one_shape_per_batch():
    rows = {"text": torch.zeros(2, 1, 4), "text_mask": torch.ones(2, 1, dtype=torch.bool)}
    batch = TrainBatch.from_dict({**rows, "image_shape": torch.tensor([[1, 2, 3], [1, 2, 3]])})
    assert batch.image_shape == (1, 2, 3)
    with pytest.raises(ValueError, match="differs between rows"):
        TrainBatch.from_dict({**rows, "image_shape": [(1, 2, 3), (1, 3, 2)]})
    with pytest.raises(KeyError, match="'text_mask'"):
        TrainBatch.from_dict({"text": rows["text"]})


def test_every_rank_draws_the_same_bucket_at_a_step():
    config = prompt_config("data.aspect_buckets=[0.5,1.0,2.0]")
    ranks = [BatchPreparer(config, CPU, rank_seed=seed) for seed in (0, 1, 7)]
    for step in range(10):
        for micro_batch in range(2):
            shapes = {r.bucket(step, micro_batch) for r in ranks}
            assert len(shapes) == 1
    # resuming draws the same sequence: the bucket depends on (seed, step, micro-batch) only
    again = BatchPreparer(config, CPU, rank_seed=3)
    assert [again.bucket(step, 0) for step in range(10)] == [
        ranks[0].bucket(step, 0) for step in range(10)
    ]


def test_geometry_follows_the_model():
    assert latent_geometry(prompt_config()) == LatentGeometry("vae", 16, 16)
    pixels = latent_geometry(prompt_config("model.preset=qwen-image-pixels-tiny"))
    assert pixels.latent_shape(32, 64) == (8 * 16, 48)  # 4 px per token side, 48 features
    toy = latent_geometry(load_config(None, []))
    assert toy.latent_shape(32, 32) == (2,)
    with pytest.raises(ValueError, match="multiple of 16"):
        LatentGeometry("vae", 16, 16).image_shape(24, 32)


def test_text_dropout_replaces_that_fraction_of_rows_by_the_negative_prompt():
    config = prompt_config("data.text_dropout=0.5")
    preparer = BatchPreparer(config, CPU, rank_seed=0)
    negative = torch.full((1, 5, 32), 7.0)
    dropped = 0
    for step in range(20):
        raw = {
            **features(8),
            "neg_text": negative,
            "neg_text_mask": torch.ones(1, 5, dtype=torch.bool),
        }
        batch = preparer(raw, step=step)
        rows = (batch.text == 7.0).all(dim=(1, 2))
        assert batch.text.shape[1] == 5  # padded to the longer of the two
        assert int(rows.sum()) == batch.text_dropped
        dropped += int(rows.sum())
        kept = ~rows
        assert not batch.text_mask[kept, 3:].any()  # kept rows: their own 3 tokens
    assert 50 <= dropped <= 110  # about half of 160 rows
    validation = preparer(
        {**raw, "neg_text_mask": torch.ones(1, 5, dtype=torch.bool)}, step=0, training=False
    )
    assert not (validation.text == 7.0).all(dim=(1, 2)).any()


def test_prompt_only_data_with_a_method_that_needs_images_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.kind=synthetic", "data.sample_kind=prompt"])
    assert "method.apex_v0.data_free=true" in str(caught.value)
    with pytest.raises(ConfigError, match="method.objective=fm learns the velocity of data"):
        load_config(None, ["data.kind=synthetic", "method.objective=fm"])
    with pytest.raises(ConfigError, match="method.apex.data_free needs method.apex.fake_source"):
        load_config(None, ["method.objective=apex", "method.apex.data_free=true"])
    load_config(
        None,
        [
            "data.kind=synthetic",
            "method.objective=apex",
            "method.apex.data_free=true",
            "method.apex.fake_source=noise",
        ],
    )
    # precomputed features without latents meet the same rule at run time
    config = load_config(None, ["data.kind=synthetic", "data.sample_kind=image_text"])
    preparer = BatchPreparer(config, CPU, rank_seed=0)
    with pytest.raises(ValueError, match="prompt-only.*apex_v0.data_free=true"):
        preparer(features(4))


def test_apex_trains_without_images_on_its_own_samples():
    from conftest import RecordingModel

    from apex_dist.method import build_objective

    config = load_config(
        None,
        ["method.objective=apex", "method.apex.data_free=true", "method.apex.fake_source=noise"],
    )
    objective = build_objective(config.method)
    model = RecordingModel()
    batch = {
        "text": torch.randn(4, 3, 4),
        "text_mask": torch.ones(4, 3, dtype=torch.bool),
        "latent_shape": (2,),
    }
    loss, _ = objective(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.weight.grad is not None
    first = model.calls[0]  # the data stand-in: a one-step sample from noise, without gradient
    assert not first["grad"] and torch.all(first["t"] == 1) and torch.all(first["tt"] == 0)


def test_launcher_watch_raises_the_flag_when_the_launcher_exits():
    class Flag:
        reason = None

        def raise_flag(self, reason):
            self.reason = reason

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    flag = Flag()
    watch = LauncherWatch(flag, {launcher.pid: "torchrun train.py"}, interval=0.05)
    time.sleep(0.3)
    assert flag.reason is None  # alive: nothing happens
    launcher.kill()  # left unreaped: a zombie counts as gone
    deadline = time.monotonic() + 10
    while flag.reason is None and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.stop()
    launcher.wait()
    assert flag.reason is not None and str(launcher.pid) in flag.reason
    assert launcher_ancestors() == {}  # pytest has no launcher among its ancestors


def test_kernels_of_the_config_are_applied_and_a_forced_backend_that_cannot_run_is_refused():
    import apex_kernels
    from apex_dist.distributed.build import apply_kernels
    from apex_dist.models.qwen_image import QwenImageTransformer

    model = QwenImageTransformer.from_preset("qwen-image-tiny")
    try:
        config = prompt_config("model.kernels.attention_backend=math", "model.kernels.fused=false")
        description = apply_kernels(model, config, CPU)
        assert apex_kernels.get_attention_backend() == "math"
        assert apex_kernels.get_fused_kernels() == "never"
        assert "attention math" in description and "fused kernels off" in description
        cuda_only = prompt_config("model.kernels.attention_backend=cudnn")
        with pytest.raises(ValueError, match="attention_backend='cudnn' cannot run here"):
            apply_kernels(model, cuda_only, CPU)
    finally:
        apex_kernels.configure()  # the process-wide defaults for the other tests


def test_the_text_encoder_follows_model_dtype_and_text_max_length(tmp_path, monkeypatch):
    from apex_dist.models import text_encoder

    seen = {}

    def fake_from_snapshot(snapshot, dtype, device, max_length):
        seen.update(dtype=dtype, max_length=max_length)
        raise RuntimeError("stop here")

    from apex_dist.models.tiny import write_transformer_snapshot

    write_transformer_snapshot(tmp_path)
    monkeypatch.setattr(text_encoder.QwenTextEncoder, "from_snapshot", fake_from_snapshot)
    config = prompt_config(
        f"model.pretrained={tmp_path}", "model.dtype=bf16", "model.text_max_length=77"
    )
    with pytest.raises(RuntimeError, match="stop here"):
        BatchPreparer(config, CPU, rank_seed=0).text_encoder()
    assert seen == {"dtype": torch.bfloat16, "max_length": 77}


def test_text_dropout_on_precomputed_features_without_a_snapshot_names_the_negative_prompt():
    """Precomputed shards hold the prompts' features but not the negative prompt's: the error
    says what the text encoder is for and does not advise precomputing what already is."""
    config = prompt_config(
        "data.sample_kind=precomputed",
        "data.kind=webdataset",
        'data.urls=["unused.tar"]',
        "data.text_dropout=0.1",
    )
    preparer = BatchPreparer(config, CPU, rank_seed=0)
    with pytest.raises(ValueError) as error:
        preparer(features(8), step=0)
    message = str(error.value)
    assert "method.guidance.negative_prompt" in message and "model.pretrained is null" in message
    assert "text_encoder/" in message and "encode_prompts" not in message
