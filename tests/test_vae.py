"""QwenImageVae and the 2x2 latent packing, against diffusers on a tiny random VAE."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from diffusers import QwenImagePipeline
from tiny_qwen import write_vae_snapshot

from apex_dist.models.vae import QwenImageVae, pack_latents, unpack_latents

Z_DIM = 4
DOWNSAMPLE = 8  # the tiny VAE keeps Qwen-Image's three 2x downsamplings


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    snapshot_dir = tmp_path_factory.mktemp("qwen_image_vae_snapshot")
    model = write_vae_snapshot(snapshot_dir, z_dim=Z_DIM)
    return snapshot_dir, model


@pytest.fixture(scope="module")
def vae(snapshot):
    return QwenImageVae.from_snapshot(snapshot[0], dtype=torch.float32)


def random_images(batch=2, height=32, width=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


@pytest.mark.parametrize("channels", [4, 16])
def test_packing_equals_diffusers_and_round_trips(channels):
    batch, height, width = 2, 6, 10
    latents = torch.randn(batch, channels, height, width)
    packed = pack_latents(latents)
    expected = QwenImagePipeline._pack_latents(latents, batch, channels, height, width)
    assert packed.shape == (batch, (height // 2) * (width // 2), channels * 4)
    assert torch.equal(packed, expected)
    assert torch.equal(pack_latents(latents[:, :, None]), expected)  # (B, C, 1, H, W) as well
    image_shape = (1, height // 2, width // 2)
    unpacked = unpack_latents(packed, image_shape)
    assert torch.equal(unpacked, latents)
    diffusers_unpacked = QwenImagePipeline._unpack_latents(
        packed, height * DOWNSAMPLE, width * DOWNSAMPLE, DOWNSAMPLE
    )
    assert torch.equal(unpacked, diffusers_unpacked[:, :, 0])


def test_packing_layout_by_hand():
    # one channel-major 2x2 patch after another: token (0, 1) of a 2-channel 2x4 latent
    latents = torch.arange(16.0).reshape(1, 2, 2, 4)
    packed = pack_latents(latents)
    assert packed.shape == (1, 2, 8)
    assert packed[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0, 10.0, 11.0, 14.0, 15.0]


def test_encode_is_the_normalised_packed_posterior_mean(vae, snapshot):
    _, model = snapshot
    images = random_images()
    latents, image_shape = vae.encode(images)
    assert image_shape == (1, 32 // 16, 48 // 16)
    assert latents.shape == (2, 2 * 3, Z_DIM * 4)
    with torch.no_grad():
        mean = model.encode(images[:, :, None]).latent_dist.mean  # (B, C, 1, h, w)
    config_mean = torch.tensor(model.config.latents_mean).view(1, Z_DIM, 1, 1, 1)
    config_std = torch.tensor(model.config.latents_std).view(1, Z_DIM, 1, 1, 1)
    normalised = (mean - config_mean) / config_std
    expected = QwenImagePipeline._pack_latents(normalised, 2, Z_DIM, 4, 6)
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=1e-6)
    again, _ = vae.encode(images)
    assert torch.equal(latents, again)  # the mean, not a sample
    assert not latents.requires_grad


def test_decode_inverts_packing_and_normalisation_like_the_pipeline(vae, snapshot):
    _, model = snapshot
    latents, image_shape = vae.encode(random_images())
    images = vae.decode(latents, image_shape)
    assert images.shape == (2, 3, 32, 48)
    assert images.min() >= -1 and images.max() <= 1
    # the pipeline's decode path: unpack, latents / (1 / std) + mean, decode, first frame
    unpacked = QwenImagePipeline._unpack_latents(latents, 32, 48, DOWNSAMPLE)
    config_mean = torch.tensor(model.config.latents_mean).view(1, Z_DIM, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(model.config.latents_std).view(1, Z_DIM, 1, 1, 1)
    with torch.no_grad():
        expected = model.decode(unpacked / inverse_std + config_mean).sample[:, :, 0]
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)


def test_normalisation_round_trip(vae):
    raw = torch.randn(3, Z_DIM, 4, 6) * 3
    torch.testing.assert_close(vae.denormalize(vae.normalize(raw)), raw)
    config_mean = torch.tensor(vae.model.config.latents_mean).view(1, Z_DIM, 1, 1)
    assert vae.normalize(config_mean.expand(1, Z_DIM, 2, 2)).abs().max() < 1e-6
    config_std = torch.tensor(vae.model.config.latents_std).view(1, Z_DIM, 1, 1)
    one_std_above = vae.normalize((config_mean + config_std).expand(1, Z_DIM, 2, 2))
    torch.testing.assert_close(one_std_above, torch.ones(1, Z_DIM, 2, 2))


def test_bf16_load_gives_bf16_latents(snapshot):
    bf16_vae = QwenImageVae.from_snapshot(snapshot[0], dtype=torch.bfloat16)
    latents, image_shape = bf16_vae.encode(random_images(batch=1, height=16, width=16))
    assert latents.dtype == torch.bfloat16 and image_shape == (1, 1, 1)
    assert bf16_vae.decode(latents, image_shape).dtype == torch.bfloat16


@pytest.mark.parametrize(("height", "width"), [(40, 48), (32, 24), (8, 8)])
def test_sizes_not_divisible_by_16_are_rejected(vae, height, width):
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(random_images(batch=1, height=height, width=width))


def test_bad_images_and_latents_are_rejected(vae):
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\].*127.5"):
        vae.encode(random_images() * 127.5 + 127.5)
    with pytest.raises(TypeError, match="floating point"):
        vae.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    latents, image_shape = vae.encode(random_images())
    with pytest.raises(ValueError, match="do not fit image_shape"):
        vae.decode(latents, (1, 3, 3))
    with pytest.raises(ValueError, match="frames = 1"):
        vae.decode(latents, (2, 2, 3))
    with pytest.raises(ValueError, match="VAE has 4"):
        vae.decode(torch.zeros(2, 6, 32), image_shape)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 4, 3, 4))


def test_snapshot_problems_are_named(snapshot, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="vae/ folder"):
        QwenImageVae.from_snapshot(tmp_path, dtype=torch.float32)
    wrong = tmp_path / "wrong"
    shutil.copytree(snapshot[0], wrong)
    config_path = wrong / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "AutoencoderKL"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expected 'AutoencoderKLQwenImage'"):
        QwenImageVae.from_snapshot(wrong, dtype=torch.float32)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if diffusers were not installed
    with pytest.raises(ImportError, match="needs diffusers"):
        QwenImageVae.from_snapshot(snapshot[0], dtype=torch.float32)
