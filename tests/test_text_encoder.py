"""QwenTextEncoder: parity with diffusers' QwenImagePipeline on a tiny random Qwen2.5-VL."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from tiny_qwen import write_text_snapshot

from apex_dist.config import TEXT_MAX_TOKENS, Config, ConfigError, from_dict
from apex_dist.models.text_encoder import (
    QWEN_IMAGE_MAX_TEXT_TOKENS,
    QWEN_IMAGE_PROMPT_TEMPLATE,
    QWEN_IMAGE_TEMPLATE_PREFIX_TOKENS,
    QwenTextEncoder,
)

# Prompts of different token lengths, including an empty one (only the template's closing
# tokens remain) and one with braces (must not be taken as a format field).
PROMPTS = [
    "A red cat",
    "An old lighthouse at dusk, waves crashing, seagulls in a cloudy sky.",
    "",
    "A sign that says {hello} world",
]
PARITY_TOLERANCE = 1e-5  # fp32, same weights and tokens: only summation order may differ


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """(snapshot_dir, original model, original tokenizer) of a tiny Qwen2.5-VL snapshot."""
    snapshot_dir = tmp_path_factory.mktemp("qwen_image_snapshot")
    model, tokenizer = write_text_snapshot(snapshot_dir)
    return snapshot_dir, model, tokenizer


@pytest.fixture(scope="module")
def encoder(snapshot):
    return QwenTextEncoder.from_snapshot(snapshot[0], dtype=torch.float32)


@pytest.fixture(scope="module")
def pipeline(snapshot):
    """diffusers' QwenImagePipeline holding only the original text encoder and tokenizer."""
    from diffusers import QwenImagePipeline

    _, model, tokenizer = snapshot
    return QwenImagePipeline(
        scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer, transformer=None
    )


def test_features_equal_diffusers_encode_prompt(encoder, pipeline):
    features, mask = encoder.encode(PROMPTS)
    expected, expected_mask = pipeline.encode_prompt(PROMPTS, device=torch.device("cpu"))
    assert features.shape == expected.shape
    assert features.shape[0] == len(PROMPTS) and features.shape[2] == encoder.feature_dim
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected_mask.bool())
    assert (features - expected).abs().max().item() <= PARITY_TOLERANCE
    lengths = mask.sum(dim=1).tolist()
    assert len(set(lengths)) == len(PROMPTS)  # the prompts really differ in length
    assert features.shape[1] == max(lengths)  # S is the longest row
    assert torch.all(features[~mask] == 0)


def test_template_prefix_is_dropped(encoder, snapshot):
    _, model, tokenizer = snapshot
    assert encoder.prefix_tokens == QWEN_IMAGE_TEMPLATE_PREFIX_TOKENS
    # the first kept token is the prompt's first token; the last ones close the template
    text = QWEN_IMAGE_PROMPT_TEMPLATE.format(PROMPTS[0])
    tokens = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = model.model(**tokens).last_hidden_state[0]
    features, mask = encoder.encode(PROMPTS[:1])
    assert features.shape[1] == hidden.shape[0] - QWEN_IMAGE_TEMPLATE_PREFIX_TOKENS
    assert mask.all()
    torch.testing.assert_close(features[0], hidden[QWEN_IMAGE_TEMPLATE_PREFIX_TOKENS:])
    kept = tokenizer.convert_ids_to_tokens(tokens["input_ids"][0, encoder.prefix_tokens :])
    assert tokenizer.convert_tokens_to_string(kept).startswith(PROMPTS[0])


def test_a_prompt_encodes_the_same_alone_and_in_a_batch(encoder):
    batch_features, batch_mask = encoder.encode(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        alone, alone_mask = encoder.encode([prompt])
        length = int(alone_mask.sum())
        assert int(batch_mask[row].sum()) == length
        torch.testing.assert_close(batch_features[row, :length], alone[0], atol=1e-6, rtol=0)


def test_max_length_truncates_like_diffusers(snapshot, pipeline, monkeypatch):
    _, model, tokenizer = snapshot
    max_length = 6
    short = QwenTextEncoder(model, tokenizer, max_length=max_length)
    features, mask = short.encode(PROMPTS)
    assert features.shape[1] == max_length
    assert int(mask.sum(dim=1).max()) == max_length
    monkeypatch.setattr(pipeline, "tokenizer_max_length", max_length)
    expected, expected_mask = pipeline.encode_prompt(PROMPTS, device=torch.device("cpu"))
    assert torch.equal(mask, expected_mask.bool())
    assert (features - expected).abs().max().item() <= PARITY_TOLERANCE
    # the causal model's first tokens do not see the ones cut off
    full, _ = QwenTextEncoder(model, tokenizer).encode(PROMPTS[1:2])
    torch.testing.assert_close(features[1], full[0, :max_length], atol=1e-6, rtol=0)
    # every prompt longer than max_length is counted (the trainer logs truncated_prompts)
    lengths = [int(QwenTextEncoder(model, tokenizer).encode([p])[1].sum()) for p in PROMPTS]
    assert short.last_truncated == sum(length > max_length for length in lengths) > 0
    short.encode(["A"])  # with the template's closing tokens, exactly max_length
    assert int(QwenTextEncoder(model, tokenizer).encode(["A"])[1].sum()) <= max_length
    assert short.last_truncated == 0


def test_no_gradients_and_only_the_language_model_is_kept(encoder):
    from transformers import Qwen2_5_VLTextModel

    features, _ = encoder.encode(PROMPTS[:2])
    assert not features.requires_grad
    assert isinstance(encoder.language_model, Qwen2_5_VLTextModel)
    assert not any(parameter.requires_grad for parameter in encoder.language_model.parameters())
    assert not encoder.language_model.training


def test_negative_prompt_is_encoded_once_and_cached(encoder, monkeypatch):
    calls = []
    original = QwenTextEncoder.encode

    def counting_encode(self, prompts):
        calls.append(list(prompts))
        return original(self, prompts)

    monkeypatch.setattr(QwenTextEncoder, "encode", counting_encode)
    negative_prompt = "blurry, low quality, watermark"
    features, mask = encoder.negative(negative_prompt)
    again_features, again_mask = encoder.negative(negative_prompt)
    assert calls == [[negative_prompt]]
    assert again_features is features and again_mask is mask
    assert features.shape[0] == 1 and mask.shape == features.shape[:2]
    torch.testing.assert_close(features, original(encoder, [negative_prompt])[0])
    encoder.negative(" ")  # a different prompt is a different entry
    assert calls == [[negative_prompt], [" "]]


def test_bf16_snapshot_load_gives_bf16_features_close_to_fp32(snapshot, encoder):
    bf16_encoder = QwenTextEncoder.from_snapshot(snapshot[0], dtype=torch.bfloat16)
    features, mask = bf16_encoder.encode(PROMPTS[:2])
    reference, reference_mask = encoder.encode(PROMPTS[:2])
    assert features.dtype == torch.bfloat16 and torch.equal(mask, reference_mask)
    # random tiny weights give features of order 1; bf16 keeps about 3 significant digits
    torch.testing.assert_close(features.float(), reference, atol=0.1, rtol=0.05)


def test_unknown_template_split_is_reported(snapshot, caplog):
    _, model, tokenizer = snapshot
    with caplog.at_level(logging.WARNING, logger="apex_dist.models.text_encoder"):
        custom = QwenTextEncoder(model, tokenizer, template="<|im_start|>user\n{}<|im_end|>")
    assert custom.prefix_tokens == 3
    assert "not the 34" in caplog.text
    with pytest.raises(ValueError, match="exactly one"):
        QwenTextEncoder(model, tokenizer, template="no placeholder")


def test_bad_prompts_are_rejected(encoder):
    with pytest.raises(TypeError, match=r"list of str.*\[prompt\]"):
        encoder.encode("a single string")
    with pytest.raises(TypeError, match="int"):
        encoder.encode(["fine", 3])
    with pytest.raises(ValueError, match="empty"):
        encoder.encode([])
    with pytest.raises(TypeError, match="negative prompt must be a str"):
        encoder.negative(["a list"])


@pytest.mark.parametrize("max_length", [0, QWEN_IMAGE_MAX_TEXT_TOKENS + 1, 2.5])
def test_bad_max_length_is_rejected(snapshot, max_length):
    _, model, tokenizer = snapshot
    with pytest.raises(ValueError, match=r"max_length must be an integer in \[1, 1024\]"):
        QwenTextEncoder(model, tokenizer, max_length=max_length)


def test_snapshot_problems_are_named(snapshot, tmp_path):
    source = snapshot[0]
    for folder in ("text_encoder", "tokenizer"):
        broken = tmp_path / f"without_{folder}"
        shutil.copytree(source, broken)
        shutil.rmtree(broken / folder)
        with pytest.raises(FileNotFoundError, match=f"{folder} is missing"):
            QwenTextEncoder.from_snapshot(broken, dtype=torch.float32)
    wrong = tmp_path / "wrong_architecture"
    shutil.copytree(source, wrong)
    config_path = wrong / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "llama"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type is 'llama', expected 'qwen2_5_vl'"):
        QwenTextEncoder.from_snapshot(wrong, dtype=torch.float32)


def test_config_text_max_length_is_validated():
    assert TEXT_MAX_TOKENS == QWEN_IMAGE_MAX_TEXT_TOKENS
    assert from_dict(Config, {}).model.text_max_length == QWEN_IMAGE_MAX_TEXT_TOKENS
    assert from_dict(Config, {"model": {"text_max_length": 77}}).model.text_max_length == 77
    for bad in (0, TEXT_MAX_TOKENS + 1):
        with pytest.raises(ConfigError) as caught:
            from_dict(Config, {"model": {"text_max_length": bad}})
        assert any("model.text_max_length must be in [1, 1024]" in p for p in caught.value.problems)
