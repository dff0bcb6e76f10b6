"""Typed run configuration: YAML in, validated nested dataclasses out, resolved YAML back.

One `Config` holds every setting of a run. It is built from a YAML file plus dotted command
line overrides (``method.condition_shift.scale=-1``), and every problem found (unknown keys
with the closest valid name, wrong types, values out of range, settings that contradict each
other) is reported together in one `ConfigError`, before any model or process group exists.

Each field carries a help string in its metadata (``option(default, "help")``); `describe()`
prints them all.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

# Numbers like 1e-4 or -2E+3, which PyYAML's YAML 1.1 resolver leaves as strings.
FLOAT_WITHOUT_DOT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")
# Spellings of infinity and not-a-number that PyYAML leaves as strings (it reads only .inf and
# .nan as floats); named in the error so that `optimizer.lr=inf` is not just "not a float".
NON_FINITE_WORD = re.compile(r"[-+]?(inf|infinity|nan)", re.IGNORECASE)
# Default of data.read_timeout_seconds: how long one read of a shard may wait for data. Object
# storage answers within seconds and a cold network filesystem within a minute or so; five
# minutes without a byte means a stalled command or mount, reported instead of waited on.
DEFAULT_READ_TIMEOUT_SECONDS = 300.0
# Largest magnitude of a float; a larger YAML integer cannot be converted.
FLOAT_LIMIT = sys.float_info.max
# Largest seed: numpy's RandomState takes seeds in [0, 2**32 - 1]; torch.manual_seed accepts
# up to 2**64 - 1, so per-rank offsets added by the trainer stay valid for torch as well.
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line, each naming its field path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration{where}:\n{lines}")


def option(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at call sites
    """A dataclass field with a default (copied for lists and dicts) and a help string."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    if dataclasses.is_dataclass(default):
        # a deep copy: a shallow one would share nested sections and lists between configs
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# validation helpers: each returns [] or the one problem, naming the field path


def at_least(path: str, name: str, value: float, minimum: float, reason: str = "") -> list[str]:
    """`value` >= `minimum` (nan is left to the finiteness check); `reason` (": why") is
    appended to the problem."""
    if not value < minimum:
        return []
    return [f"{path}.{name} must be >= {minimum} (got {value}){reason}"]


def positive(path: str, name: str, value: float, reason: str = "") -> list[str]:
    """`value` > 0 (nan fails too)."""
    if value > 0:
        return []
    return [f"{path}.{name} must be > 0 (got {value}){reason}"]


def in_range(
    path: str,
    name: str,
    value: float,
    low: float,
    high: float,
    bounds: str = "[]",
    reason: str = "",
) -> list[str]:
    """`value` in the interval from `low` to `high`; `bounds` says which ends are included,
    as written: "[]", "[)", "(]" or "()"."""
    if bounds not in ("[]", "[)", "(]", "()"):
        raise ValueError(f"bounds must be one of [], [), (], () (got {bounds!r})")
    above = value >= low if bounds[0] == "[" else value > low
    below = value <= high if bounds[1] == "]" else value < high
    if above and below:
        return []
    interval = f"{bounds[0]}{low}, {high}{bounds[1]}"
    return [f"{path}.{name} must be in {interval} (got {value}){reason}"]


# --------------------------------------------------------------------------------------------
# model

# Model presets that apex_dist.models.build_model knows (kept here so that validation needs no
# model code).
# Model presets: the toy MLP and the Qwen-Image sizes of `apex_dist.models.qwen_image`
# (`QWEN_IMAGE_PRESETS`; a test keeps the two lists equal without this module importing torch).
QWEN_IMAGE_PRESET_NAMES = (
    "qwen-image-20b",
    "qwen-image-0.6b",
    "qwen-image-tiny",
    "qwen-image-pixels-tiny",
)
MODEL_PRESETS = ("toy-mlp", *QWEN_IMAGE_PRESET_NAMES)


@dataclass
class ToyModelConfig:
    """The 2-D MLP velocity model used by the toy experiment and the unit tests."""

    data_dim: int = option(2, "dimension of the data points")
    text_dim: int = option(16, "width of the class embedding that plays the text features")
    hidden_size: int = option(256, "width of the MLP")
    num_blocks: int = option(4, "number of residual blocks")

    def validate(self, path: str) -> list[str]:
        problems = []
        for name in ("data_dim", "text_dim", "hidden_size", "num_blocks"):
            problems += at_least(path, name, getattr(self, name), 1)
        return problems


# LoRA target presets of `apex_dist.models.lora` (`LORA_TARGET_PRESETS`; a test keeps the two
# lists equal without this module importing torch).
LORA_TARGET_PRESET_NAMES = ("attention_mlp_time", "attention_mlp", "attention")
# LoRA initialisations that leave the product B @ A zero, so the model starts as the base.
LORA_INITIALISATIONS = ("gaussian", "kaiming", "orthogonal")


@dataclass
class LoraConfig:
    """Low-rank adapters on the Qwen-Image transformer (method.md section 8; released recipe:
    rank 64, alpha 64, Gaussian A and zero B, attention + MLPs + timestep embedder)."""

    enabled: bool = option(False, "train LoRA adapters on a frozen base instead of all weights")
    rank: int = option(64, "r, the rank of every adapter")
    alpha: float = option(64.0, "alpha; the adapter output is scaled by alpha / rank")
    init: Literal["gaussian", "kaiming", "orthogonal"] = option(
        "gaussian",
        "initialisation, B @ A = 0 for all: gaussian (A ~ N(0, 1/r^2), B = 0; released code), "
        "kaiming (A Kaiming-uniform, B = 0; peft's default), orthogonal (A, B orthogonal "
        "halves; needs an even rank)",
    )
    targets: Literal["attention_mlp_time", "attention_mlp", "attention"] = option(
        "attention_mlp_time",
        "adapted modules: attention (q/k/v/out of both streams), attention_mlp (+ both MLPs), "
        "attention_mlp_time (+ the timestep embedder; released code)",
    )
    dropout: float = option(0.0, "dropout on the adapter input")

    def validate(self, path: str) -> list[str]:
        problems = at_least(path, "rank", self.rank, 1) + positive(path, "alpha", self.alpha)
        problems += in_range(path, "dropout", self.dropout, 0, 1, "[)")
        if self.init == "orthogonal" and self.rank % 2:
            problems.append(
                f"{path}.init orthogonal needs an even rank (got rank {self.rank}): A and B "
                "take alternate rows of one orthogonal matrix"
            )
        return problems


# Most text tokens Qwen-Image keeps per prompt (diffusers QwenImagePipeline.tokenizer_max_length;
# a test keeps it equal to apex_dist.models.text_encoder.QWEN_IMAGE_MAX_TEXT_TOKENS).
TEXT_MAX_TOKENS = 1024


# Attention backends of apex_kernels.attention (kept here so that validation needs no torch).
ATTENTION_BACKENDS = ("auto", "flash_attn", "cudnn", "flash", "efficient", "math")


@dataclass
class KernelConfig:
    """Attention backend, fused Triton kernels and compilation (docs/performance.md)."""

    attention_backend: Literal["auto", "flash_attn", "cudnn", "flash", "efficient", "math"] = (
        option("auto", "attention kernel; auto picks the fastest that supports each call")
    )
    fused: bool = option(
        True, "fused Triton kernels (q/k RMSNorm+rotary, modulation, gated residual) on CUDA"
    )
    compile_blocks: bool = option(False, "torch.compile each transformer block")

    def validate(self, path: str) -> list[str]:
        if self.compile_blocks and self.fused:
            return [
                f"{path}.compile_blocks=true needs {path}.fused=false: torch.compile generates "
                "its own fused kernels and breaks its graph at every Triton launch"
            ]
        return []


@dataclass
class ModelConfig:
    preset: str = option("toy-mlp", "model preset name (see apex_dist.models)")
    pretrained: Optional[str] = option(
        None, "local checkpoint directory (Hugging Face snapshot layout), or null for random init"
    )
    dtype: Literal["fp32", "bf16", "fp16"] = option("fp32", "dtype of the frozen/base weights")
    toy: ToyModelConfig = option(ToyModelConfig(), "sizes of the toy MLP (preset toy-mlp)")
    lora: LoraConfig = option(LoraConfig(), "LoRA adapters (Qwen-Image presets)")
    text_max_length: int = option(
        1024, "most text-encoder tokens kept per prompt, 1..1024 (Qwen-Image keeps at most 1024)"
    )
    kernels: KernelConfig = option(KernelConfig(), "attention backend and fused kernels")

    def validate(self, path: str) -> list[str]:
        problems = self.toy.validate(f"{path}.toy") + self.lora.validate(f"{path}.lora")
        problems += self.kernels.validate(f"{path}.kernels")
        if self.lora.enabled and self.preset not in QWEN_IMAGE_PRESET_NAMES:
            problems.append(
                f"{path}.lora.enabled needs a Qwen-Image preset (got preset {self.preset!r}): "
                f"LoRA targets the transformer's linear layers; use one of "
                f"{', '.join(QWEN_IMAGE_PRESET_NAMES)} or set {path}.lora.enabled=false"
            )
        if self.preset not in MODEL_PRESETS:
            hint = difflib.get_close_matches(self.preset, MODEL_PRESETS, n=1)
            suggestion = (
                f"did you mean {hint[0]!r}?" if hint else f"known: {', '.join(MODEL_PRESETS)}"
            )
            problems.append(f"{path}.preset {self.preset!r} is unknown: {suggestion}")
        if self.pretrained is not None and not Path(self.pretrained).is_dir():
            problems.append(
                f"{path}.pretrained: directory {self.pretrained!r} does not exist "
                "(give a local snapshot directory or null)"
            )
        problems += in_range(
            path,
            "text_max_length",
            self.text_max_length,
            1,
            TEXT_MAX_TOKENS,
            reason=f": Qwen-Image keeps at most {TEXT_MAX_TOKENS} text tokens",
        )
        return problems


# --------------------------------------------------------------------------------------------
# method (see ../shared/design/method.md; equation numbers are the paper's)


@dataclass
class TimeSamplingConfig:
    beta_p: float = option(1.0, "t ~ Beta(p, q) * scale: first shape parameter")
    beta_q: float = option(1.0, "t ~ Beta(p, q) * scale: second shape parameter")
    scale: float = option(1.0, "t ~ Beta(p, q) * scale: scale, in (0, 1]")

    def validate(self, path: str) -> list[str]:
        problems = positive(path, "beta_p", self.beta_p) + positive(path, "beta_q", self.beta_q)
        return problems + in_range(
            path, "scale", self.scale, 0, 1, "(]", reason=": times live in [0, 1]"
        )


@dataclass
class LossConfig:
    kind: Literal["robust", "l2"] = option(
        "robust", "per-row loss: robust (mse * sg((mse/c^2 + 1)^-1/2) / c) or plain l2 (mse)"
    )
    robust_scale: float = option(1e-3, "c of the robust loss, about the per-row RMSE")

    def validate(self, path: str) -> list[str]:
        return positive(path, "robust_scale", self.robust_scale)


@dataclass
class ConditionShiftConfig:
    """c_fake = scale * c + bias on the text tokens after the text input projection (Eq. 9)."""

    scale: float = option(-0.5, "a in c_fake = a*c + b (paper's best: -0.5)")
    bias: float = option(1.0, "b in c_fake = a*c + b (paper's best: 1.0)")
    learnable: bool = option(False, "train a and b as parameters of the model")

    def validate(self, path: str) -> list[str]:
        if self.scale == 1.0 and self.bias == 0.0:
            return [
                f"{path}: scale=1, bias=0 is the identity, so the fake branch equals the real "
                "one; choose another shift (default -0.5, 1.0)"
            ]
        return []


@dataclass
class ReferenceConfig:
    mode: Literal["online", "frozen_base", "ema"] = option(
        "online",
        "model for the no-grad auxiliary passes: online (the student), frozen_base (the "
        "starting weights, frozen; free for LoRA), ema (moving average of the student)",
    )
    ema_decay: float = option(0.999, "target EMA decay, reached by a warm-up (mode ema)")

    def validate(self, path: str) -> list[str]:
        if self.mode != "ema":
            return []
        return in_range(path, "ema_decay", self.ema_decay, 0, 1, "()", reason=" for mode ema")


@dataclass
class GuidanceConfig:
    """Guidance baked into the training target (apex_v0 step 4), so sampling needs no CFG.

    Effective classifier-free guidance scale of a ratio w: online or ema reference: 1/(1-w)
    (5 at w = 0.8); frozen_base reference: about 1 + w; data-free mode with a frozen reference:
    w itself is the CFG scale.
    """

    ratio: float = option(0.8, "w; 0 disables guidance (see the class docstring for its scale)")
    negative_prompt: str = option("Generate an image.", "prompt whose embedding is c_neg")

    def validate(self, path: str) -> list[str]:
        return at_least(path, "ratio", self.ratio, 0)

    def validate_with_reference(self, path: str, reference_mode: str) -> list[str]:
        """With the student (online) or its EMA as the reference, the guided target's fixed
        point is CFG of scale 1/(1 - w), which exists only for w < 1."""
        if reference_mode in ("online", "ema") and self.ratio >= 1:
            return [
                f"{path}.ratio must be < 1 with reference mode {reference_mode} (got "
                f"{self.ratio}): the guided target's fixed point is CFG of scale 1/(1 - w), "
                "which does not exist for w >= 1 (0.8 gives scale 5); use a ratio below 1 or "
                "method.reference.mode=frozen_base, where w is the CFG scale itself"
            ]
        return []


@dataclass
class ApexConfig:
    """Switches of the paper's objective `apex` (Section 3)."""

    mix_ratio: float = option(0.5, "lam in T_mix = (1-lam)*x + lam*(x_t - t*v_fake) (Eq. 22-24)")
    fake_weight: float = option(1.0, "lambda_p, weight of L_fake (Eq. 25)")
    mix_weight: float = option(1.0, "lambda_e, weight of L_mix (Eq. 25)")
    detach_fake: bool = option(False, "stop the gradient through x_fake (paper: no)")
    correction: Literal["toward_fake", "away_from_fake"] = option(
        "toward_fake",
        "toward_fake: the consistency target is the fake branch's x-prediction (paper, "
        "literal); away_from_fake: the reflected target, moving along v_real - v_fake (DMD)",
    )
    fake_source: Literal["noised_data", "noise"] = option(
        "noised_data",
        "noised_data: x_fake = x_t - t*F, the real branch's x-prediction at the sampled t "
        "(paper, Eq. 11); noise: x_fake = z - F(z, 1, 0, c), the one-step generator from pure "
        "noise, corrected at its own re-noised samples (released code's reading)",
    )
    target_time: Literal["zero", "t"] = option(
        "zero", "target time tt of the real-branch pass: 0 (one jump to data) or t"
    )
    mix_time_weight: Literal["one", "one_minus_t_over_t", "t_times_one_minus_t"] = option(
        "one", "per-time weight of L_mix: 1, w(t) = (1-t)/t (Eq. 16), or t(1-t) (paper_form)"
    )
    reading: Literal["section3", "paper_form"] = option(
        "section3",
        "section3: the objective as method.md section 3 writes it; paper_form: fresh noise and "
        "time for the fake trajectory, x_fake detached, L_fake trains only the condition shift, "
        "L_mix in velocity form, mix_ratio ramped from 0 (needs condition_shift.learnable)",
    )
    mix_ramp_steps: int = option(
        0, "paper_form: optimizer steps over which lam ramps from 0 to mix_ratio (0: no ramp)"
    )
    data_free: bool = option(
        False,
        "train without images (prompt-only data): the supervised target is the model's own "
        "one-step sample; needs fake_source noise, whose correction needs no data",
    )

    def validate(self, path: str) -> list[str]:
        problems = []
        if self.data_free and self.fake_source != "noise":
            problems.append(
                f"{path}.data_free needs {path}.fake_source=noise (got "
                f"{self.fake_source!r}): the paper's fake samples are predictions from noised "
                "data, which prompt-only training does not have"
            )
        if self.reading == "paper_form" and (self.fake_source != "noised_data" or self.data_free):
            problems.append(
                f"{path}.reading=paper_form takes its fake samples from the real branch's "
                f"one-step prediction on data: it needs {path}.fake_source=noised_data and "
                f"{path}.data_free=false (got {self.fake_source!r}, {self.data_free})"
            )
        problems += in_range(path, "mix_ratio", self.mix_ratio, 0, 1)
        problems += at_least(path, "mix_ramp_steps", self.mix_ramp_steps, 0)
        problems += at_least(path, "fake_weight", self.fake_weight, 0)
        return problems + at_least(path, "mix_weight", self.mix_weight, 0)


@dataclass
class ApexV0Config:
    """Switches of the released code's objective `apex_v0` (method.md section 4)."""

    fake_flag: Literal["shift", "shift+neg_time", "neg_time"] = option(
        "shift", "how the adversarial (fake) rows are marked for the model"
    )
    mul_jitter: float = option(0.05, "mul rows: tt = t * (1 - jitter * u), u ~ U(0, 1)")
    consistency_order: int = option(2, "N, steps of the no-grad roll-out of the target (RCGM)")
    consistency_delta: float = option(0.01, "delta, the size of the first target step (RCGM)")
    residual_clamp: float = option(1.0, "clamp of the consistency residual and of delta_F")
    distribution_matching_weight: float = option(0.5, "weight of the e2e rows' DMD term")
    time_weight: bool = option(True, "weight rows by tan((1 - (|t| - |tt|)) * pi / 2.5) + 1")
    data_free: bool = option(
        False, "replace every row's data by the model's one-step sample (prompt-only data)"
    )

    def validate(self, path: str) -> list[str]:
        return [
            *in_range(path, "mul_jitter", self.mul_jitter, 0, 1),
            *at_least(path, "consistency_order", self.consistency_order, 1),
            *in_range(path, "consistency_delta", self.consistency_delta, 0, 1, "()"),
            *positive(path, "residual_clamp", self.residual_clamp),
            *at_least(path, "distribution_matching_weight", self.distribution_matching_weight, 0),
        ]


@dataclass
class MethodConfig:
    objective: Literal["apex_v0", "apex", "fm"] = option(
        "apex_v0", "apex_v0 (released code, default), apex (paper, Section 3), fm (flow matching)"
    )
    time_sampling: TimeSamplingConfig = option(TimeSamplingConfig(), "training time distribution")
    loss: LossConfig = option(LossConfig(), "per-row loss")
    condition_shift: ConditionShiftConfig = option(
        ConditionShiftConfig(), "condition shift of the fake branch"
    )
    reference: ReferenceConfig = option(ReferenceConfig(), "reference model for no-grad passes")
    guidance: GuidanceConfig = option(GuidanceConfig(), "guidance baked into the target")
    apex: ApexConfig = option(ApexConfig(), "objective apex")
    apex_v0: ApexV0Config = option(ApexV0Config(), "objective apex_v0")
    check_finite: bool = option(
        True, "raise NonFiniteLossError naming the term when a loss term is nan or inf"
    )

    def validate(self, path: str) -> list[str]:
        problems = []
        for name in (
            "time_sampling",
            "loss",
            "condition_shift",
            "reference",
            "guidance",
            "apex",
            "apex_v0",
        ):
            problems += getattr(self, name).validate(f"{path}.{name}")
        if self.objective == "apex_v0":
            problems += self.guidance.validate_with_reference(
                f"{path}.guidance", self.reference.mode
            )
        if (
            self.objective == "apex"
            and self.apex.reading == "paper_form"
            and not self.condition_shift.learnable
        ):
            problems.append(
                f"{path}.apex.reading=paper_form trains only the condition shift with L_fake: "
                f"set {path}.condition_shift.learnable=true (it is false, so L_fake would train "
                "nothing)"
            )
        if self.apex_v0.data_free and self.objective != "apex_v0":
            problems.append(
                f"{path}.apex_v0.data_free is only implemented by objective apex_v0 "
                f"(objective is {self.objective!r})"
            )
        return problems


def image_requirement(method: MethodConfig) -> Optional[str]:
    """Why `method` needs images or latents in the data, or None when it trains on prompts
    alone (data-free). The message names the setting to change."""
    if method.objective == "fm":
        return (
            "method.objective=fm learns the velocity of data, so it needs images: use "
            "method.objective=apex_v0 with method.apex_v0.data_free=true for prompt-only data"
        )
    if method.objective == "apex_v0" and not method.apex_v0.data_free:
        return (
            "method.objective=apex_v0 trains on data unless method.apex_v0.data_free=true "
            "(the model's own one-step samples replace the images)"
        )
    if method.objective == "apex" and not method.apex.data_free:
        return (
            "method.objective=apex trains on data unless method.apex.data_free=true (with "
            "method.apex.fake_source=noise)"
        )
    return None


# --------------------------------------------------------------------------------------------
# data, optimizer, train, parallel, checkpoint, logging


@dataclass
class DataConfig:
    """The data stream (apex_dist.data.build_stream; docs/data.md)."""

    kind: Literal["toy", "synthetic", "webdataset"] = option(
        "toy",
        "toy (2-D classes of apex_dist.data.toy), synthetic (coloured shapes generated on "
        "the fly, scored by apex_dist.data.evaluate_images), webdataset (tar shards)",
    )
    urls: list[str] = option(
        [],
        "webdataset sources, one entry each: a local path, a brace pattern "
        "(data/p-{000000..000099}.tar) or pipe:COMMAND writing a tar to stdout",
    )
    weights: list[float] = option(
        [], "mixing weight per entry of urls, by samples (empty: equal weights)"
    )
    sample_kind: Literal["prompt", "image_text", "precomputed"] = option(
        "prompt",
        "prompt (txt or json caption), image_text (jpg/png/webp + caption), precomputed "
        "(safetensors text features + mask, optional latents)",
    )
    caption_key: str = option("caption", "caption field of json members (when no txt member)")
    resolution: int = option(
        512, "image side in pixels: images are resized to it; prompt-only data generates it"
    )
    aspect_buckets: list[float] = option(
        [],
        "width/height ratios of image buckets of about resolution^2 pixels (empty: square); "
        "prompt-only data draws one bucket per micro-batch, the same on every rank",
    )
    shuffle_buffer: int = option(1000, "samples per shuffled chunk; 1 keeps the read order")
    shuffle_shards: int = option(4, "shards open at once per source and reader, interleaved")
    epoch_samples: int = option(
        0, "samples per epoch over all ranks; 0: from make_shards' index.json, if found"
    )
    max_bad_fraction: float = option(
        0.01, "stop with an error when more than this fraction of samples is bad"
    )
    synthetic_size: int = option(100000, "number of distinct synthetic scenes (kind synthetic)")
    num_workers: int = option(0, "data loader worker processes per rank")
    read_timeout_seconds: float = option(
        DEFAULT_READ_TIMEOUT_SECONDS,
        "seconds one read of a shard (file or pipe: command) may wait for data; a stalled "
        "shard is then skipped as bad, and three stalled shards in a row stop the run",
    )
    text_dropout: float = option(0.0, "fraction of rows whose text is replaced by c_neg")

    def validate(self, path: str) -> list[str]:
        problems = []
        if self.kind == "webdataset" and not self.urls:
            problems.append(f"{path}.urls is empty: kind webdataset needs at least one shard")
        if self.weights and len(self.weights) != len(self.urls):
            problems.append(
                f"{path}.weights has {len(self.weights)} entries but urls has {len(self.urls)}: "
                "give one weight per source, or none for equal weights"
            )
        if any(weight < 0 for weight in self.weights) or (
            self.weights and not sum(self.weights) > 0
        ):
            problems.append(f"{path}.weights must be >= 0 with a positive sum (got {self.weights})")
        if self.kind == "synthetic" and self.sample_kind == "precomputed":
            problems.append(
                f"{path}.sample_kind precomputed is not generated by kind synthetic: use "
                "prompt or image_text"
            )
        # the synthetic scenes use a 4x4 grid of cells whose objects need about 6 pixels
        minimum_resolution = 32 if self.kind == "synthetic" else 16
        if self.resolution < minimum_resolution or self.resolution % 16:
            problems.append(
                f"{path}.resolution must be a multiple of 16 and >= {minimum_resolution} for kind "
                f"{self.kind} (got {self.resolution})"
            )
        if any(not ratio > 0 for ratio in self.aspect_buckets):
            problems.append(f"{path}.aspect_buckets must be > 0 (got {self.aspect_buckets})")
        for name in ("shuffle_buffer", "shuffle_shards", "synthetic_size"):
            problems += at_least(path, name, getattr(self, name), 1)
        problems += at_least(path, "epoch_samples", self.epoch_samples, 0)
        problems += in_range(path, "max_bad_fraction", self.max_bad_fraction, 0, 1)
        problems += at_least(path, "num_workers", self.num_workers, 0)
        problems += positive(path, "read_timeout_seconds", self.read_timeout_seconds)
        return problems + in_range(path, "text_dropout", self.text_dropout, 0, 1, "[)")


@dataclass
class OptimizerConfig:
    lr: float = option(1e-4, "AdamW learning rate")
    betas: list[float] = option([0.9, 0.99], "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "global gradient-norm clip; 0 disables")
    warmup_steps: int = option(0, "linear learning-rate warm-up steps, then constant")
    schedule: Literal["constant", "cosine"] = option(
        "constant", "learning rate after the warm-up: constant, or cosine decay to min_lr_ratio"
    )
    min_lr_ratio: float = option(0.0, "final learning rate / lr of the cosine schedule")

    def validate(self, path: str) -> list[str]:
        problems = positive(path, "lr", self.lr)
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            problems.append(f"{path}.betas must be two numbers in [0, 1) (got {self.betas})")
        problems += positive(
            path,
            "eps",
            self.eps,
            reason=": AdamW divides by sqrt(v) + eps, which is 0/0 for a parameter whose "
            "gradients are all zero",
        )
        for name in ("weight_decay", "grad_clip", "warmup_steps"):
            problems += at_least(path, name, getattr(self, name), 0)
        if self.lr > 0 and not self.lr * self.weight_decay < 1:
            problems.append(
                f"{path}.lr * {path}.weight_decay must be < 1 (got {self.lr} * "
                f"{self.weight_decay}): AdamW multiplies every weight by 1 - lr * weight_decay "
                "each step, which flips or zeroes the weights from 1 on"
            )
        return problems + in_range(path, "min_lr_ratio", self.min_lr_ratio, 0, 1)


# Default of train.watchdog_seconds: the longest legitimate silence of a rank is one
# checkpoint save or one validation grid (the loop marks progress every step and around saves).
# A 20B full fine-tuning save writes about 240 GB (bf16 weights, fp32 master weights and two
# Adam moments), about 8 minutes through one node's 0.5 GB/s to shared storage; 20 minutes
# leaves 2.5x that, and stays below the 30-minute collective timeout DeepSpeed gives the process
# group, so a stuck rank is named before the collective fails without naming it.
DEFAULT_WATCHDOG_SECONDS = 1200.0


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps")
    micro_batch_size: int = option(8, "rows per rank per forward (apex_v0: a multiple of 4)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    seed: int = option(0, "base random seed (each rank adds its rank)")
    output_dir: str = option("runs/default", "run directory: resolved config, checkpoints, logs")
    max_nonfinite_steps: int = option(
        3, "stop the run after this many optimizer steps in a row skipped for nan/inf"
    )
    watchdog_seconds: float = option(
        DEFAULT_WATCHDOG_SECONDS,
        "end the run (exit code 3, naming the rank and step) when a rank sends no heartbeat or "
        "its training loop makes no progress for this long; 0 disables",
    )

    def validate(self, path: str) -> list[str]:
        problems = []
        for name in (
            "steps",
            "micro_batch_size",
            "gradient_accumulation_steps",
            "max_nonfinite_steps",
        ):
            problems += at_least(path, name, getattr(self, name), 1)
        problems += in_range(
            path, "seed", self.seed, 0, MAX_SEED, reason=": numpy accepts only seeds in this range"
        )
        return problems + at_least(
            path, "watchdog_seconds", self.watchdog_seconds, 0, reason=", 0 disabling the watchdog"
        )


@dataclass
class ParallelConfig:
    zero_stage: Literal[0, 1, 2, 3] = option(
        3, "DeepSpeed ZeRO stage: 2 (gradients + optimizer states sharded) or 3 (also weights)"
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = option("none", "optimizer state offload")
    offload_params: Literal["none", "cpu", "nvme"] = option("none", "parameter offload (ZeRO-3)")
    nvme_path: str = option("/local_nvme", "directory on a local NVMe drive (nvme offload)")
    activation_checkpointing: int = option(0, "checkpoint every k-th block; 0 disables")
    hierarchical_partition_size: int = option(
        1,
        "ZeRO++ hpZ: ranks holding a secondary weight partition, usually the GPUs per node "
        "(ZeRO-3 only; 1 disables)",
    )

    def validate(self, path: str) -> list[str]:
        problems = []
        if self.zero_stage in (0, 1):
            problems.append(
                f"{path}.zero_stage {self.zero_stage} is not supported: use 2 (gradients and "
                "optimizer states sharded) or 3 (weights sharded as well)"
            )
        problems += at_least(
            path, "hierarchical_partition_size", self.hierarchical_partition_size, 1
        )
        if self.hierarchical_partition_size > 1 and self.zero_stage != 3:
            problems.append(
                f"{path}.hierarchical_partition_size={self.hierarchical_partition_size} (ZeRO++ "
                f"hpZ) needs zero_stage 3 (got {self.zero_stage})"
            )
        if self.offload_params != "none" and self.zero_stage != 3:
            problems.append(
                f"{path}.offload_params={self.offload_params!r} needs zero_stage 3 "
                f"(got {self.zero_stage})"
            )
        return problems + at_least(
            path, "activation_checkpointing", self.activation_checkpointing, 0
        )


@dataclass
class CheckpointConfig:
    every_steps: int = option(0, "save every N steps; 0 saves only at the end")
    keep_last: int = option(2, "number of checkpoints kept")
    resume: Optional[str] = option(
        None,
        "null, 'latest' (the newest complete checkpoint of output_dir, or a fresh start when "
        "there is none), or a checkpoint directory <output_dir>/checkpoints/step_XXXXXXXX",
    )
    allow_config_changes: bool = option(
        False,
        "resume even when the checkpoint's model settings or world size differ from this run's "
        "(the differences are still listed)",
    )
    save_on_signal: bool = option(
        True, "on SIGTERM or SIGUSR1 (preemption), save a checkpoint and stop cleanly"
    )
    overwrite: bool = option(
        False,
        "start fresh in an output_dir that holds checkpoints of an earlier run, deleting them "
        "at start (without it such a start is refused); not with resume=latest",
    )

    def validate(self, path: str) -> list[str]:
        problems = []
        if self.overwrite and self.resume == "latest":
            problems.append(
                f"{path}.overwrite=true deletes the checkpoints of output_dir at start, and "
                f"{path}.resume=latest resumes from them: set resume=null to start over, or "
                "overwrite=false to continue"
            )
        return (
            problems
            + at_least(path, "every_steps", self.every_steps, 0)
            + at_least(path, "keep_last", self.keep_last, 1)
        )


@dataclass
class LoggingConfig:
    every_steps: int = option(10, "console and wandb logging interval")
    wandb: Literal["disabled", "offline", "online"] = option("disabled", "wandb mode")
    project: str = option("apex_dist", "wandb project")
    run_name: Optional[str] = option(None, "wandb run name (default: the output directory name)")
    sample_every_steps: int = option(
        0, "write a validation grid (student 1 NFE beside the teacher) every N steps; 0 never"
    )
    sample_count: int = option(8, "validation prompts per grid")
    teacher_steps: int = option(50, "Euler steps of the teacher in the validation grid")
    teacher_guidance_scale: float = option(
        4.0,
        "classifier-free guidance scale of the teacher in the validation grid (1 disables; "
        "4 is Qwen-Image's default true_cfg_scale)",
    )
    peak_tflops: float = option(
        0.0,
        "peak dense TFLOP/s of one device for MFU; 0 looks the device up (H100/H200/A100 bf16)",
    )
    eval_every_steps: int = option(
        0,
        "score the student at 1 NFE with GenEval-style rules and CLIP score every N steps and at "
        "step 0 (apex_dist.evaluation; docs/evaluation.md); 0 never",
    )
    eval_prompt_count: int = option(
        60, "prompts of the fixed evaluation subset (taken round-robin over GenEval's six tasks)"
    )
    eval_clip: Optional[str] = option(
        None,
        "local snapshot folder of the CLIP model (openai/clip-vit-large-patch14); needed by "
        "eval_every_steps",
    )
    eval_detector: Optional[str] = option(
        None,
        "local snapshot folder of the COCO instance detector "
        "(facebook/mask2former-swin-small-coco-instance); null scores CLIP score only",
    )

    def validate(self, path: str) -> list[str]:
        problems = []
        for name in ("every_steps", "sample_count", "teacher_steps", "eval_prompt_count"):
            problems += at_least(path, name, getattr(self, name), 1)
        for name in (
            "sample_every_steps",
            "peak_tflops",
            "teacher_guidance_scale",
            "eval_every_steps",
        ):
            problems += at_least(path, name, getattr(self, name), 0)
        if self.eval_every_steps and not self.eval_clip:
            problems.append(
                f"{path}.eval_every_steps={self.eval_every_steps} needs {path}.eval_clip, the "
                "local snapshot folder of a CLIP model (docs/evaluation.md), or set "
                "eval_every_steps=0"
            )
        return problems


@dataclass
class Config:
    model: ModelConfig = option(ModelConfig(), "the velocity model")
    method: MethodConfig = option(MethodConfig(), "the APEX objective and its switches")
    data: DataConfig = option(DataConfig(), "the data stream")
    optimizer: OptimizerConfig = option(OptimizerConfig(), "AdamW and clipping")
    train: TrainConfig = option(TrainConfig(), "steps, batch, seed, run directory")
    parallel: ParallelConfig = option(ParallelConfig(), "DeepSpeed ZeRO and memory savers")
    checkpoint: CheckpointConfig = option(CheckpointConfig(), "saving and resuming")
    logging: LoggingConfig = option(LoggingConfig(), "console and wandb")

    def validate(self, path: str = "") -> list[str]:
        # a config loaded from YAML has no non-finite numbers left (they are refused when read);
        # one built or changed in code is checked here
        problems = non_finite_problems(self, path)
        for section in dataclasses.fields(self):
            problems += getattr(self, section.name).validate(section.name)
        if self.data.sample_kind == "prompt" and self.data.kind != "toy":
            requirement = image_requirement(self.method)
            if requirement is not None:
                problems.append(f"data.sample_kind=prompt has no images, but {requirement}")
        if self.logging.eval_every_steps and self.model.preset == "toy-mlp":
            problems.append(
                "logging.eval_every_steps needs a model that generates images; model.preset "
                "toy-mlp generates 2-D points: set logging.eval_every_steps=0"
            )
        if self.method.objective == "apex_v0" and self.train.micro_batch_size % 4:
            problems.append(
                "train.micro_batch_size must be a multiple of 4 for objective apex_v0 "
                f"(got {self.train.micro_batch_size}): the batch is split into four roles"
            )
        return problems


# --------------------------------------------------------------------------------------------
# building dataclasses from plain data, with every problem collected


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def non_finite_problems(config: Any, path: str = "") -> list[str]:
    """One problem per float option (or list item) of a dataclass tree that is nan or inf."""
    problems = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        where = f"{path}.{item.name}" if path else item.name
        if dataclasses.is_dataclass(value):
            problems += non_finite_problems(value, where)
        elif isinstance(value, (list, tuple)):
            problems += [
                f"{where}[{index}] must be a finite number (got {entry})"
                for index, entry in enumerate(value)
                if _non_finite(entry)
            ]
        elif _non_finite(value):
            problems.append(f"{where} must be a finite number (got {value})")
    return problems


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is list:
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _convert(value: Any, annotation: Any, path: str, problems: list[str]) -> Any:
    """Check `value` against a type annotation; return the converted value (or None on error)."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{path} must be a mapping of options (got {value!r})")
            return None
        return _build(annotation, value, path, problems)
    if origin in (typing.Union, types.UnionType):
        arguments = typing.get_args(annotation)
        if value is None and type(None) in arguments:
            return None
        inner = [arg for arg in arguments if arg is not type(None)]
        return _convert(value, inner[0], path, problems)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value in choices and type(value) in {type(choice) for choice in choices}:
            return value
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        problems.append(
            f"{path} must be one of {_type_name(annotation)} (got {value!r}){suggestion}"
        )
        return None
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path} must be a {_type_name(annotation)} (got {value!r})")
            return None
        (item_type,) = typing.get_args(annotation)
        known = len(problems)
        items = [
            _convert(item, item_type, f"{path}[{i}]", problems) for i, item in enumerate(value)
        ]
        # a list with a bad item keeps its default, so that range checks see only good values
        return items if len(problems) == known else None
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # an integer beyond the float range (10**400) counts as infinite
            number = float(value) if abs(value) <= FLOAT_LIMIT else math.inf
        # YAML 1.1 (PyYAML) reads exponent numbers without a dot, such as 1e-4, as strings.
        elif isinstance(value, str) and FLOAT_WITHOUT_DOT.fullmatch(value.strip()):
            number = float(value)  # 1e400 overflows to inf, refused below
        elif isinstance(value, str) and NON_FINITE_WORD.fullmatch(value.strip()):
            number = float(value)
        if number is not None:
            if math.isfinite(number):
                return number
            problems.append(f"{path} must be a finite number (got {value!r})")
            return None
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {annotation!r} at {path}")
    problems.append(f"{path} must be {_type_name(annotation)} (got {value!r})")
    return None


def _build(cls: type, data: dict, path: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            hint = difflib.get_close_matches(str(key), names, n=1)
            suggestion = f"did you mean {hint[0]!r}?" if hint else f"valid keys: {', '.join(names)}"
            problems.append(f"unknown key {where}: {suggestion}")
    values = {}
    for name in names:
        if name in data:
            where = f"{path}.{name}" if path else name
            converted = _convert(data[name], hints[name], where, problems)
            if converted is not None or data[name] is None:
                values[name] = converted
    try:
        return cls(**values)
    except TypeError as error:  # a required field missing; not expected with defaults
        problems.append(f"{path or 'config'}: {error}")
        return None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError([f"override {text!r} must look like section.key=value"])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys (``method.condition_shift.scale=-1``) in a plain nested dict, in place."""
    problems = []
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                problems.append(
                    f"override {text!r}: {'.'.join(keys[: depth + 1])} is a value, not a section"
                )
                break
            node = child
        else:
            node[keys[-1]] = value
    if problems:
        raise ConfigError(problems)
    return data


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict | None, source: str | None = None) -> T:
    """Build and validate dataclass `cls` from plain data; raise ConfigError with every problem."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"the top level must be a mapping of sections (got {type(data).__name__})"], source
        )
    config = _build(cls, data, "", problems)
    if config is not None and hasattr(config, "validate"):
        # fields with type problems kept their defaults, so range checks still see a typed config
        problems += config.validate("")
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML file (or the defaults when path is None), apply overrides, validate."""
    data: dict = {}
    source = None
    if path is not None:
        source = str(path)
        try:
            with open(path) as handle:
                data = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise ConfigError([f"config file {source!r} does not exist"]) from None
        except yaml.YAMLError as error:
            raise ConfigError([f"invalid YAML: {error}"], source) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [f"the top level must be a mapping of sections (got {type(data).__name__})"], source
        )
    apply_overrides(data, list(overrides))
    return from_dict(Config, data, source)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temporary name, then rename)."""
    from apex_dist.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per option: dotted name, default and help."""
    lines = []
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        name = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(hints[item.name]):
            lines += describe(hints[item.name], f"{name}.")
            continue
        default = (
            item.default if item.default is not dataclasses.MISSING else item.default_factory()
        )
        lines.append(f"{name} = {default!r}: {item.metadata.get('help', '')}")
    return lines
