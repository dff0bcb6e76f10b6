"""Qwen-Image's text encoder: Qwen2.5-VL hidden states of a templated prompt.

Qwen-Image conditions its transformer on the last hidden state (after the final norm) of
Qwen2.5-VL-7B-Instruct run on the prompt wrapped in a fixed chat template. The template's
system turn and the opening of the user turn (34 tokens with Qwen's tokenizer) are dropped
from the features; the user's prompt and the template's closing tokens remain. At most 1024
tokens are kept per prompt. These facts are those of diffusers' `QwenImagePipeline`
(`prompt_template_encode`, `prompt_template_encode_start_idx`, `tokenizer_max_length`), whose
features this module reproduces (tests/test_text_encoder.py checks the parity).

Differences from the pipeline, none of which change the features of a prompt:
- only the language model is kept (the vision tower and the output head are released after
  loading: about 1.2 B of the 8.3 B parameters);
- padding is always on the right, so a prompt's features do not depend on the other prompts of
  its batch (the causal model never attends to right padding);
- the mask is always returned, as booleans, even when no row is padded.

    encoder = QwenTextEncoder.from_snapshot("/ckpt/Qwen-Image", device="cuda")
    features, mask = encoder.encode(["a red cat", "a lighthouse at dusk"])  # (2, S, 3584), (2, S)
    negative_features, negative_mask = encoder.negative(" ")  # (1, S', 3584), cached
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Qwen-Image's prompt template (diffusers QwenImagePipeline.prompt_template_encode); the prompt
# replaces "{}".
QWEN_IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
# Number of leading template tokens dropped from the features: everything before the prompt,
# as Qwen's tokenizer splits it (diffusers QwenImagePipeline.prompt_template_encode_start_idx).
QWEN_IMAGE_TEMPLATE_PREFIX_TOKENS = 34
# Most text tokens kept per prompt after the drop (diffusers QwenImagePipeline
# tokenizer_max_length; its check_inputs rejects a larger max_sequence_length).
QWEN_IMAGE_MAX_TEXT_TOKENS = 1024
# model_type of Qwen2.5-VL in a transformers config.json.
QWEN2_5_VL_MODEL_TYPE = "qwen2_5_vl"


def _language_model(model: nn.Module) -> nn.Module:
    """The Qwen2.5-VL text decoder inside a full model, its base model, or the decoder itself."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLModel,
        Qwen2_5_VLTextModel,
    )

    if isinstance(model, Qwen2_5_VLForConditionalGeneration):
        return model.model.language_model
    if isinstance(model, Qwen2_5_VLModel):
        return model.language_model
    if isinstance(model, Qwen2_5_VLTextModel):
        return model
    raise TypeError(
        f"QwenTextEncoder needs a Qwen2.5-VL model (Qwen2_5_VLForConditionalGeneration, "
        f"Qwen2_5_VLModel or Qwen2_5_VLTextModel), got {type(model).__name__}"
    )


def _check_max_length(max_length: Any) -> int:
    if (
        isinstance(max_length, bool)
        or not isinstance(max_length, int)
        or not 1 <= max_length <= QWEN_IMAGE_MAX_TEXT_TOKENS
    ):
        raise ValueError(
            f"max_length must be an integer in [1, {QWEN_IMAGE_MAX_TEXT_TOKENS}] (got "
            f"{max_length!r}): Qwen-Image keeps at most {QWEN_IMAGE_MAX_TEXT_TOKENS} text tokens"
        )
    return max_length


class QwenTextEncoder:
    """Frozen Qwen2.5-VL text encoder with Qwen-Image's prompt template.

    Args:
        model: a Qwen2.5-VL model (`Qwen2_5_VLForConditionalGeneration`, `Qwen2_5_VLModel` or
            `Qwen2_5_VLTextModel`); only its language model is kept, frozen, in eval mode, on
            its current device and dtype.
        tokenizer: the matching tokenizer (a transformers tokenizer that knows the template's
            special tokens `<|im_start|>` and `<|im_end|>`).
        max_length: most tokens kept per prompt after the template prefix is dropped
            (1..1024; the template's closing tokens count, as in diffusers).
        template: the prompt template, with one "{}" where the prompt goes.

    The number of template tokens dropped is measured with the tokenizer (the tokens of the
    text before "{}"); Qwen's tokenizer gives 34, the value diffusers hard-codes. A different
    count is logged as a warning: the features would not be the ones Qwen-Image was trained on.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        max_length: int = QWEN_IMAGE_MAX_TEXT_TOKENS,
        template: str = QWEN_IMAGE_PROMPT_TEMPLATE,
    ):
        if template.count("{}") != 1:
            raise ValueError(
                f"template must contain exactly one '{{}}' where the prompt goes (got {template!r})"
            )
        self.language_model = _language_model(model).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = _check_max_length(max_length)
        self.template = template
        prefix = template.split("{}")[0]
        self.prefix_tokens = len(tokenizer(prefix)["input_ids"])
        if self.prefix_tokens != QWEN_IMAGE_TEMPLATE_PREFIX_TOKENS:
            logger.warning(
                "the tokenizer splits the prompt template's prefix into %d tokens, not the %d of "
                "Qwen-Image's tokenizer: features will differ from Qwen-Image's",
                self.prefix_tokens,
                QWEN_IMAGE_TEMPLATE_PREFIX_TOKENS,
            )
        self._negative_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self.last_truncated = 0  # prompts of the last `encode` call cut at max_length

    @classmethod
    def from_snapshot(
        cls,
        snapshot_dir: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        max_length: int = QWEN_IMAGE_MAX_TEXT_TOKENS,
    ) -> QwenTextEncoder:
        """Load `text_encoder/` and `tokenizer/` of a Hugging Face snapshot directory.

        The folders and the architecture are checked before any weight is read.
        """
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        _check_max_length(max_length)
        snapshot_dir = Path(snapshot_dir)
        model_dir = snapshot_dir / "text_encoder"
        tokenizer_dir = snapshot_dir / "tokenizer"
        for folder in (model_dir, tokenizer_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder} is missing: a Qwen-Image snapshot has text_encoder/ and "
                    f"tokenizer/ folders (download the full snapshot, or point at its root)"
                )
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: text_encoder/ has no config.json")
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type != QWEN2_5_VL_MODEL_TYPE:
            raise ValueError(
                f"{config_path}: model_type is {model_type!r}, expected "
                f"{QWEN2_5_VL_MODEL_TYPE!r} (Qwen-Image's text encoder is Qwen2.5-VL)"
            )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
        language_model = _language_model(model).to(device)
        del model  # releases the vision tower and the output head
        return cls(language_model, tokenizer, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    @property
    def feature_dim(self) -> int:
        """Width D of the features (3584 for Qwen2.5-VL-7B)."""
        return self.language_model.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Encode prompts into (features (B, S, D), mask (B, S) bool), S the longest row.

        Features are in the model's dtype on its device, zero where the mask is False. Prompts
        longer than `max_length` tokens are cut there; `last_truncated` counts them.
        """
        if not isinstance(prompts, (list, tuple)) or not all(
            isinstance(prompt, str) for prompt in prompts
        ):
            raise TypeError(
                f"prompts must be a list of str (got {type(prompts).__name__}"
                + (
                    f" holding {sorted({type(prompt).__name__ for prompt in prompts})})"
                    if isinstance(prompts, (list, tuple))
                    else ")"
                )
                + "; wrap a single prompt as [prompt]"
            )
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        texts = [self.template.format(prompt) for prompt in prompts]
        lengths_untruncated = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        self.last_truncated = sum(
            length > self.max_length + self.prefix_tokens for length in lengths_untruncated
        )
        tokens = self.tokenizer(
            texts,
            max_length=self.max_length + self.prefix_tokens,
            truncation=True,
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        input_ids = tokens["input_ids"].to(self.device)
        token_mask = tokens["attention_mask"].to(self.device).bool()  # (B, L)
        hidden = self.language_model(
            input_ids=input_ids, attention_mask=token_mask.long()
        ).last_hidden_state  # (B, L, D)

        # Keep each row's valid tokens after the first `prefix_tokens`, left-aligned.
        rank = token_mask.long().cumsum(dim=1) - 1  # index of each valid token within its row
        keep = token_mask & (rank >= self.prefix_tokens)  # (B, L)
        lengths = keep.sum(dim=1)  # (B,)
        longest = int(lengths.max())
        rows, columns = keep.nonzero(as_tuple=True)
        features = hidden.new_zeros(len(prompts), longest, hidden.shape[-1])  # (B, S, D)
        features[rows, rank[rows, columns] - self.prefix_tokens] = hidden[rows, columns]
        mask = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]  # (B, S)
        return features, mask

    def negative(self, prompt: str) -> tuple[Tensor, Tensor]:
        """(features (1, S, D), mask (1, S)) of a negative prompt, encoded once and cached.

        The cached tensors are returned as they are: do not modify them in place.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"the negative prompt must be a str (got {type(prompt).__name__})")
        if prompt not in self._negative_cache:
            self._negative_cache[prompt] = self.encode([prompt])
        return self._negative_cache[prompt]
