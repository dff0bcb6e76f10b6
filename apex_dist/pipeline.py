"""A diffusers pipeline that samples an APEX student at 1, 2 or 4 steps with stock parts.

The student's velocity is F(x, t, tt, c) with the time embedding E1(t) + (t - tt) * E2(tt); its
few-step sampler always asks for tt = 0, where the embedding is E1(t) + t * E2(0) and E2(0) is
one constant vector. A stock `QwenImageTransformer2DModel` computes E1(t) alone, so a forward
hook on its `time_text_embed` that adds (t - t_fold) * E2(0) makes it the student at every t:
t_fold = 0 for an unfolded export, and the export's fold time for a folded one (whose E1 bias
already holds t_fold * E2(0), `apex_dist.models.fold`).

`ApexQwenImagePipeline` is diffusers' `QwenImagePipeline` with that hook and apex_dist's
sampler (`apex_dist.method.sample`: the grid of `timestep_grid`, x_hat = x - t * F, re-noised
with fresh noise from the given generator on the packed latents). Prompt encoding, latent
packing and decoding are the parent's. Stock diffusers alone can run a folded export at one
step; two and four steps need this pipeline (docs/generate.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from torch import Tensor

from apex_dist.method import sample
from apex_dist.method.sampler import Generators


class StockVelocity:
    """apex_dist's velocity-model interface, `model(x, t, tt, text, text_mask, fake_rows,
    image_shape=...)`, over a stock diffusers transformer whose time embedding carries the
    student's E2 hook; only tt = 0 (the few-step sampler's target time) is supported."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        target_time: Tensor,
        text: Tensor,
        text_mask: Optional[Tensor] = None,
        fake_rows: Optional[Tensor] = None,
        *,
        image_shape=None,
    ) -> Tensor:
        if bool((target_time != 0).any()):
            raise ValueError("the stock transformer is the student at target time 0 only")
        if image_shape is None:
            raise ValueError("image_shape (frames, height, width) is required")
        dtype = self.transformer.dtype
        if text_mask is not None and bool(text_mask.all()):
            text_mask = None  # as diffusers' encode_prompt: no mask reaches attention
        return self.transformer(
            hidden_states=x.to(dtype),
            timestep=t.to(dtype),
            encoder_hidden_states=text.to(dtype),
            encoder_hidden_states_mask=text_mask,
            img_shapes=[[tuple(image_shape)]] * x.shape[0],
            return_dict=False,
        )[0]


def stock_transformer(export: Path, torch_dtype: torch.dtype):
    """diffusers' transformer of a full or merged export and E2's tensors (fp32).

    A folded export, or one without the APEX keys, loads with `from_pretrained`; an export
    written with `--keep-apex-keys` holds E2 beside diffusers' tensors, which diffusers refuses,
    so its diffusers part is loaded by hand. E2 comes from the model files or from
    `apex_extra_weights.safetensors`.
    """
    from diffusers import QwenImageTransformer2DModel
    from safetensors import safe_open

    from apex_dist.export.student import read_apex_extras
    from apex_dist.models.conditioning import is_apex_key
    from apex_dist.models.fold import E2_KEYS
    from apex_dist.models.loading import read_transformer_config, weight_files

    files = weight_files(export)
    names = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names += list(handle.keys())
    if not any(is_apex_key(name) for name in names):
        transformer = QwenImageTransformer2DModel.from_pretrained(export, torch_dtype=torch_dtype)
        return transformer, read_apex_extras(export, "export")
    state, e2_state = {}, {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - not a mapping
                if name in E2_KEYS:
                    e2_state[name] = handle.get_tensor(name).float()
                elif not is_apex_key(name):
                    state[name] = handle.get_tensor(name)
    if len(e2_state) != len(E2_KEYS):
        e2_state = read_apex_extras(export, "export")
    transformer = QwenImageTransformer2DModel.from_config(read_transformer_config(export))
    transformer.load_state_dict(state, strict=True)
    return transformer.to(torch_dtype).eval(), e2_state


class ApexQwenImagePipeline(QwenImagePipeline):
    """`QwenImagePipeline` sampling an APEX student (module doc).

    Build it with `from_export(base, export)`, or from parts like the parent and then call
    `set_student_embedding(target_at_zero, fold_time)`.

    Args:
        scheduler, vae, text_encoder, tokenizer, transformer: the parent's components; the
            scheduler is kept for compatibility and not used (the student's grid is
            apex_dist's `timestep_grid`).
    """

    target_at_zero: Optional[Tensor] = None
    fold_time: float = 0.0
    _embedding_hook = None

    def set_student_embedding(self, target_at_zero: Tensor, fold_time: float = 0.0) -> None:
        """Hook the transformer's time embedding: + (t - fold_time) * E2(0).

        Args:
            target_at_zero: E2(0), (D,) (`apex_dist.models.fold.target_embedding_at_zero`).
            fold_time: the export's fold time t_fold (0 for an unfolded export).
        """
        if self._embedding_hook is not None:
            self._embedding_hook.remove()
        self.target_at_zero = target_at_zero.detach().float()
        self.fold_time = float(fold_time)

        def add_target_embedding(module, inputs, output):
            timestep = inputs[0].float()  # (B,), the time diffusers feeds E1
            vector = self.target_at_zero.to(output.device)
            return output + ((timestep - self.fold_time)[:, None] * vector).to(output.dtype)

        self._embedding_hook = self.transformer.time_text_embed.register_forward_hook(
            add_target_embedding
        )

    @classmethod
    def from_export(
        cls,
        base: Union[str, Path],
        export: Union[str, Path],
        torch_dtype: torch.dtype = torch.float32,
    ) -> ApexQwenImagePipeline:
        """The pipeline of a base snapshot (text encoder, tokenizer, VAE, and for a LoRA export
        the transformer) and an export directory of apex-convert-checkpoint (full or merged:
        its transformer; LoRA: its adapters, loaded with diffusers' `load_lora_weights`). E2
        comes from the export's `apex_extra_weights.safetensors`."""
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImageTransformer2DModel,
        )
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        from apex_dist.export.convert import DIFFUSERS_LORA_NAME
        from apex_dist.export.student import (
            fold_of,
            read_apex_extras,
            read_export_info,
            read_lora_file,
        )
        from apex_dist.models.fold import target_embedding_at_zero
        from apex_dist.models.lora import to_diffusers_lora

        base, export = Path(base), Path(export)
        for name, path in (("base snapshot", base), ("export", export)):
            if not path.is_dir():
                raise FileNotFoundError(f"{name} {path} does not exist")
        info = read_export_info(export)
        lora = (export / DIFFUSERS_LORA_NAME).is_file()
        if lora:
            # the adapters without the fold's lora_B.bias (diffusers' loader may not read it):
            # E1 stays the base's, so the hook adds all of t * E2(0)
            fold_time = 0.0
            adapters, alpha = read_lora_file(export / DIFFUSERS_LORA_NAME)
            if alpha is None:
                alpha = info.get("lora_alpha")
            e2_state = read_apex_extras(export, "LoRA export")
            transformer = QwenImageTransformer2DModel.from_pretrained(
                base / "transformer", torch_dtype=torch_dtype
            )
        else:
            fold_time = fold_of(info, export) or 0.0
            transformer, e2_state = stock_transformer(export, torch_dtype)
        scheduler_folder = base / "scheduler"
        scheduler = (
            FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_folder)
            if scheduler_folder.is_dir()
            else FlowMatchEulerDiscreteScheduler()
        )
        pipeline = cls(
            scheduler=scheduler,
            vae=AutoencoderKLQwenImage.from_pretrained(base / "vae", torch_dtype=torch_dtype),
            text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(
                base / "text_encoder", dtype=torch_dtype
            ),
            tokenizer=AutoTokenizer.from_pretrained(base / "tokenizer"),
            transformer=transformer,
        )
        if lora:
            # alpha / rank folded into lora_B: the state dict means W + (alpha / rank) B A
            pipeline.load_lora_weights(to_diffusers_lora(adapters, alpha))
        pipeline.set_student_embedding(target_embedding_at_zero(e2_state), fold_time)
        return pipeline

    def image_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(frames, h, w) of the packed token grid of a height x width image."""
        side = self.vae_scale_factor * 2
        return (1, height // side, width // side)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str], None] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 1,
        gap: Optional[float] = None,
        stochastic_ratio: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: Generators = None,
        latents: Optional[Tensor] = None,
        prompt_embeds: Optional[Tensor] = None,
        prompt_embeds_mask: Optional[Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_sequence_length: int = 512,
    ):
        """Sample the student with `num_inference_steps` evaluations (1, 2 or 4).

        Args:
            prompt: prompt(s), or None with `prompt_embeds` (+ `prompt_embeds_mask`).
            height, width: image size in pixels (default: the parent's 1024).
            num_inference_steps: the student's NFE; the grid is `timestep_grid(nfe, gap)`.
            gap, stochastic_ratio: as `apex_dist.method.sample`.
            generator: one generator, or one per image: the starting noise (unless `latents`)
                and the fresh noise of each re-noising.
            latents: packed starting noise (B, N, C), instead of drawing it.
            output_type: "pil", "np", "pt", or "latent" (the packed fp32 latents).
        """
        if self.target_at_zero is None:
            raise ValueError(
                "the student's E2(0) is not set: build the pipeline with from_export, or call "
                "set_student_embedding"
            )
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt,
            height,
            width,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            max_sequence_length=max_sequence_length,
        )
        device = self._execution_device
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt=prompt,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
        )
        rows = prompt_embeds.shape[0]
        latents = self.prepare_latents(
            rows,
            self.transformer.config.in_channels // 4,
            height,
            width,
            torch.float32,
            device,
            generator,
            latents,
        )
        if prompt_embeds_mask is None:
            prompt_embeds_mask = torch.ones(
                prompt_embeds.shape[:2], dtype=torch.bool, device=device
            )
        packed = sample(
            StockVelocity(self.transformer),
            latents.float(),
            prompt_embeds,
            prompt_embeds_mask.bool(),
            nfe=num_inference_steps,
            stochastic_ratio=stochastic_ratio,
            gap=gap,
            generator=generator,
            image_shape=self.image_shape(height, width),
        )
        if output_type == "latent":
            image = packed
        else:
            image = self.image_processor.postprocess(
                self.decode_packed(packed, height, width), output_type=output_type
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return QwenImagePipelineOutput(images=image)

    def decode_packed(self, packed: Tensor, height: int, width: int) -> Tensor:
        """Packed latents (B, N, C) -> images (B, 3, H, W) in [-1, 1] through the VAE, with the
        VAE's latent normalisation undone."""
        latents = self._unpack_latents(packed, height, width, self.vae_scale_factor)
        latents = latents.to(self.vae.dtype)  # (B, C, 1, h, w)
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents)
        std = torch.tensor(config.latents_std).view(shape).to(latents)
        frames = self.vae.decode(latents * std + mean, return_dict=False)[0]
        return frames[:, :, 0]
