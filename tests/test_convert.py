"""Checkpoint conversion against real DeepSpeed checkpoints (ZeRO-2 / ZeRO-3, 1 and 2 ranks).

A module fixture trains the tiny Qwen-Image model for one step with DeepSpeed on gloo (full and
LoRA runs, with an EMA saved in the engine's format) and saves the checkpoints once; the tests
export them and compare with DeepSpeed's own zero_to_fp32, with diffusers, and with apex_dist.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as multiprocessing
import yaml
from corrupt_safetensors import (
    overlap_last_two,
    set_field,
    set_header_length,
    split,
    tensors_in_order,
)
from safetensors.torch import load_file, save_file

from apex_dist.export import torch_archive
from apex_dist.export.convert import (
    APEX_EXTRA_NAME,
    COMFYUI_LORA_NAME,
    DIFFUSERS_LORA_NAME,
    DIFFUSERS_WEIGHTS_NAME,
    EXPORT_INFO_NAME,
    ExportOptions,
    ModelMismatchError,
    export_checkpoint,
)
from apex_dist.export.torch_archive import CheckpointFormatError
from apex_dist.method.sampler import ONE_STEP_TIME
from apex_dist.models.fold import FOLD_BIAS_KEY, FOLD_INFO_KEY, FOLD_MODULE, fold_offset
from apex_dist.models.qwen_image import QwenImageTransformer, is_apex_key
from apex_tools import convert_checkpoint

PRESET = "qwen-image-tiny"
LORA_RANK = 4
LORA_ALPHA = 8  # alpha != rank, so a lost alpha/rank scale shows up in the outputs
LORA_TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "to_out.0", "img_mlp.net.2", "linear_1"]
EMA_FACTOR = 0.5  # the fake EMA is half the trained weights, distinguishable from them
TAG = "step_00000001"
# Tolerance of the issue for outputs of diffusers vs apex_dist in fp32.
OUTPUT_TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(2, 4, 16, generator=generator)  # (B, N = 1*2*2, in_channels)
    t = torch.tensor([0.9, 0.4])
    text = torch.randn(2, 3, 32, generator=generator)
    return x_t, t, text


def _base_model() -> QwenImageTransformer:
    torch.manual_seed(0)
    return QwenImageTransformer.from_preset(PRESET)


def _add_lora(model: torch.nn.Module) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS), model
    )
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_" in name or name.startswith("time_text_embed_2.")


def _train_and_save(stage: int, lora: bool, directory: Path, rank: int) -> None:
    import deepspeed

    model = _base_model()
    if lora:
        _add_lora(model)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(trainable, lr=1e-2),
        config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}},
    )
    x_t, t, text = _inputs(seed=rank)
    velocity = engine(x_t, t, t * 0.5, text, None, None, image_shape=(1, 2, 2))
    engine.backward(velocity.square().mean())
    engine.step()
    checkpoints = directory / "checkpoints"
    engine.save_checkpoint(str(checkpoints), tag=TAG, exclude_frozen_parameters=lora)
    # the engine's EMA contract: ZeRO-3 rank partitions, otherwise whole tensors on rank 0
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    world_size = torch.distributed.get_world_size()
    if stage == 3:
        tensors = {
            name: parameter.ds_tensor.detach().clone() * EMA_FACTOR
            for name, parameter in zip(names, parameters, strict=True)
        }
    else:
        tensors = (
            {
                name: parameter.detach().clone() * EMA_FACTOR
                for name, parameter in zip(names, parameters, strict=True)
            }
            if rank == 0
            else {}
        )
    ema = {"format": "apex_dist.ema/1", "zero_stage": stage, "world_size": world_size}
    torch.save({**ema, "tensors": tensors}, checkpoints / TAG / f"ema_rank_{rank:05d}.pt")
    with deepspeed.zero.GatheredParameters(parameters, enabled=stage == 3):
        expected_ema = {
            name: parameter.detach().clone() * EMA_FACTOR
            for name, parameter in zip(names, parameters, strict=True)
        }
    if rank == 0:
        torch.save(expected_ema, directory / "expected_ema.pt")
        config = {"model": {"preset": PRESET}}
        if lora:
            config["model"]["lora"] = {"enabled": True, "rank": LORA_RANK, "alpha": LORA_ALPHA}
        (checkpoints / TAG / "config.yaml").write_text(yaml.safe_dump(config))
    torch.distributed.barrier()


def _worker(rank: int, world_size: int, port: int, root: str, runs: list) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        DS_ACCELERATOR="cpu",
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for stage, lora in runs:
        name = f"z{stage}_ws{world_size}" + ("_lora" if lora else "")
        _train_and_save(stage, lora, Path(root) / name, rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Run directories z{stage}_ws{world}[_lora], plus a diffusers snapshot of the base model."""
    root = tmp_path_factory.mktemp("deepspeed_runs")
    os.environ["DS_ACCELERATOR"] = "cpu"
    plans = {2: [(2, False), (3, False), (3, True)], 1: [(2, False), (3, False), (2, True)]}
    for world_size, plan in plans.items():
        multiprocessing.spawn(
            _worker, args=(world_size, _free_port(), str(root), plan), nprocs=world_size
        )
    snapshot = root / "base_snapshot" / "transformer"
    snapshot.mkdir(parents=True)
    base = _base_model()
    state = {k: v for k, v in base.state_dict().items() if not is_apex_key(k)}
    save_file(state, snapshot / "diffusion_pytorch_model.safetensors")
    (snapshot / "config.json").write_text(json.dumps(base.diffusers_config()))
    return root


def _zero_to_fp32(run: Path, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(
        str(run / "checkpoints"), exclude_frozen_parameters=exclude_frozen
    )


def _load_export(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _no_leftovers(parent: Path) -> bool:
    return not any(".partial-" in path.name for path in parent.iterdir())


# --------------------------------------------------------------------------------------------
# equality with DeepSpeed's own reconstruction


@pytest.mark.parametrize("run_name", ["z2_ws1", "z2_ws2", "z3_ws1", "z3_ws2"])
def test_full_export_equals_zero_to_fp32(runs, tmp_path, run_name):
    reference = _zero_to_fp32(runs / run_name)
    output = tmp_path / "export"
    options = ExportOptions(
        dtype="fp32", max_shard_bytes=100_000, keep_apex_keys=True, verify=True, chunk_elements=97
    )
    report = export_checkpoint(runs / run_name, output, options)
    exported = _load_export(output)
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor.to(exported[name].dtype)), name
    index = json.loads((output / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reference)
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert report.verified and report.mode == "full"


def _diffusers_output(model, x_t, t, text):
    with torch.no_grad():
        return model(
            hidden_states=x_t,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=torch.ones(x_t.shape[0], text.shape[1], dtype=torch.bool),
            timestep=t,
            img_shapes=[[(1, 2, 2)]] * x_t.shape[0],
            return_dict=False,
        )[0]


def _one_step(model: QwenImageTransformer, x_t, text) -> torch.Tensor:
    """The student's one-step call F(x, 1, 0, c) (t = ONE_STEP_TIME)."""
    ones = torch.full((x_t.shape[0],), ONE_STEP_TIME)
    with torch.no_grad():
        return model(x_t, ones, torch.zeros_like(ones), text, image_shape=(1, 2, 2))


def test_raw_export_loads_in_diffusers_and_apex_dist(runs, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    output = tmp_path / "export"
    export_checkpoint(runs / "z3_ws2", output, ExportOptions(dtype="fp32", fold_time=None))
    reference = _zero_to_fp32(runs / "z3_ws2")
    exported = _load_export(output)
    assert not any(is_apex_key(name) for name in load_file(output / DIFFUSERS_WEIGHTS_NAME))
    assert json.loads((output / EXPORT_INFO_NAME).read_text())[FOLD_INFO_KEY] is None
    diffusers_model = QwenImageTransformer2DModel.from_pretrained(output).eval()
    apex_model = QwenImageTransformer.from_diffusers_config(
        json.loads((output / "config.json").read_text())
    ).eval()
    assert not apex_model.load_pretrained_state_dict(exported)  # E2 from the extras file
    for name, tensor in diffusers_model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    x_t, t, text = _inputs()
    with torch.no_grad():
        ours = apex_model(x_t, t, t, text, image_shape=(1, 2, 2))
    assert (ours - _diffusers_output(diffusers_model, x_t, t, text)).abs().max() <= OUTPUT_TOLERANCE


def test_default_export_is_the_one_step_student_in_stock_diffusers(runs, tmp_path):
    """The fold: stock diffusers at timestep 1 computes the student's F(x, 1, 0, c)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    output = tmp_path / "export"
    export_checkpoint(runs / "z3_ws2", output, ExportOptions(dtype="fp32", verify=True))
    reference = _zero_to_fp32(runs / "z3_ws2")
    info = json.loads((output / EXPORT_INFO_NAME).read_text())
    assert info[FOLD_INFO_KEY] == {"time": ONE_STEP_TIME, "bias_key": FOLD_BIAS_KEY}
    extras = load_file(output / APEX_EXTRA_NAME)
    assert set(extras) == {name for name in reference if is_apex_key(name)}
    diffusers_model = QwenImageTransformer2DModel.from_pretrained(output).eval()
    state = diffusers_model.state_dict()
    expected_bias = reference[FOLD_BIAS_KEY] + fold_offset(reference, ONE_STEP_TIME)
    assert torch.allclose(state[FOLD_BIAS_KEY], expected_bias, atol=1e-6)
    assert all(torch.equal(state[n], reference[n]) for n in state if n != FOLD_BIAS_KEY)
    student = QwenImageTransformer.from_preset(PRESET).eval()
    student.load_state_dict(reference)
    x_t, _, text = _inputs()
    expected = _one_step(student, x_t, text)
    ones = torch.full((2,), ONE_STEP_TIME)
    folded = _diffusers_output(diffusers_model, x_t, ones, text)
    assert _relative_l2(folded, expected) < 1e-5
    raw = QwenImageTransformer2DModel.from_pretrained(output).eval()
    raw.load_state_dict({**state, FOLD_BIAS_KEY: reference[FOLD_BIAS_KEY]})
    assert _relative_l2(_diffusers_output(raw, x_t, ones, text), expected) > 1e-3  # E2 matters
    # the shipped scheduler samples one step at sigmas [1, 0] (Qwen-Image's own gives NaN)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(output, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=[1.0], mu=0.8)
    assert scheduler.sigmas.tolist() == [1.0, 0.0]


def _relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def test_bf16_export_and_streaming_reads_bounded_pieces(runs, tmp_path, monkeypatch):
    largest = []
    original = torch_archive.LazyTensor.read_range

    def recording_read_range(self, start, count):
        largest.append(count)
        return original(self, start, count)

    monkeypatch.setattr(torch_archive.LazyTensor, "read_range", recording_read_range)
    chunk = 64
    export_checkpoint(runs / "z3_ws2", tmp_path / "export", ExportOptions(chunk_elements=chunk))
    assert largest and max(largest) <= chunk  # never a whole tensor, partition or file
    exported = load_file(tmp_path / "export" / DIFFUSERS_WEIGHTS_NAME)
    reference = _zero_to_fp32(runs / "z3_ws2")
    folded_bias = reference[FOLD_BIAS_KEY] + fold_offset(reference, ONE_STEP_TIME)
    reference[FOLD_BIAS_KEY] = folded_bias
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    # E2 for apex_dist's loaders, in fp32 whatever the export dtype
    extras = load_file(tmp_path / "export" / APEX_EXTRA_NAME)
    assert all(torch.equal(tensor, reference[name]) for name, tensor in extras.items())


@pytest.mark.parametrize("run_name", ["z2_ws2", "z3_ws2", "z3_ws1"])
def test_ema_export(runs, tmp_path, run_name):
    options = ExportOptions(weights="ema", dtype="fp32", keep_apex_keys=True, verify=True)
    export_checkpoint(runs / run_name, tmp_path / "export", options)
    exported = _load_export(tmp_path / "export")
    expected = torch.load(runs / run_name / "expected_ema.pt")
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    trained = _zero_to_fp32(runs / run_name)
    assert not torch.equal(exported["img_in.weight"], trained["img_in.weight"])


# --------------------------------------------------------------------------------------------
# LoRA


def _apex_lora_model(lora_run: Path) -> QwenImageTransformer:
    """apex_dist's model with the checkpoint's trained adapters and E2."""
    model = _base_model()
    _add_lora(model)
    trained = _zero_to_fp32(lora_run, exclude_frozen=True)
    result = model.load_state_dict(trained, strict=False)
    assert not result.unexpected_keys
    return model.eval()


def _diffusers_with_lora(runs: Path, lora_file: Path):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel.from_pretrained(runs / "base_snapshot" / "transformer")
    state_dict, metadata = QwenImagePipeline.lora_state_dict(
        str(lora_file), return_lora_metadata=True
    )
    QwenImagePipeline.load_lora_into_transformer(state_dict, transformer=model, metadata=metadata)
    return model.eval()


@pytest.mark.parametrize("run_name", ["z3_ws2_lora", "z2_ws1_lora"])
def test_raw_lora_export_in_diffusers_reproduces_apex_dist(runs, tmp_path, run_name):
    output = tmp_path / "lora"
    options = ExportOptions(lora_formats=("diffusers", "comfyui"), verify=True, fold_time=None)
    export_checkpoint(runs / run_name, output, options)
    names = load_file(output / DIFFUSERS_LORA_NAME)
    assert all(name.startswith("transformer.") for name in names)
    assert not any(".time_text_embed_2." in name for name in names)  # no such module in diffusers
    assert not any(name.endswith(".bias") for name in names)
    assert "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight" in names
    comfy = load_file(output / COMFYUI_LORA_NAME)
    assert "diffusion_model.transformer_blocks.1.img_mlp.net.2.lora_down.weight" in comfy
    assert comfy["diffusion_model.transformer_blocks.1.img_mlp.net.2.alpha"].item() == LORA_ALPHA
    extras = load_file(output / APEX_EXTRA_NAME)
    assert any(name.startswith("time_text_embed_2.") for name in extras)

    apex_model = _apex_lora_model(runs / run_name)
    x_t, t, text = _inputs()
    with torch.no_grad():
        ours = apex_model(x_t, t, t, text, image_shape=(1, 2, 2))
        base = _base_model().eval()(x_t, t, t, text, image_shape=(1, 2, 2))
    assert (ours - base).abs().max() > 1e-3  # the adapters matter
    for file_name in (DIFFUSERS_LORA_NAME, COMFYUI_LORA_NAME):
        theirs = _diffusers_output(_diffusers_with_lora(runs, output / file_name), x_t, t, text)
        assert (ours - theirs).abs().max() <= OUTPUT_TOLERANCE, file_name


@pytest.mark.parametrize("run_name", ["z3_ws2_lora", "z2_ws1_lora"])
def test_default_lora_export_is_the_one_step_student_in_diffusers_and_comfyui(
    runs, tmp_path, run_name
):
    output = tmp_path / "lora"
    options = ExportOptions(lora_formats=("diffusers", "comfyui"), verify=True)
    export_checkpoint(runs / run_name, output, options)
    student = _apex_lora_model(runs / run_name)
    x_t, _, text = _inputs()
    expected = _one_step(student, x_t, text)
    ones = torch.full((2,), ONE_STEP_TIME)
    # diffusers, loaded the ordinary way: the fold is a lora_B bias on E1's last layer
    names = load_file(output / DIFFUSERS_LORA_NAME)
    fold_bias = f"transformer.{FOLD_MODULE}.lora_B.bias"
    assert fold_bias in names and names[fold_bias].abs().max() > 0
    assert all(
        names[name].abs().max() == 0
        for name in names
        if name.endswith("lora_B.bias") and name != fold_bias
    )
    theirs = _diffusers_output(
        _diffusers_with_lora(runs, output / DIFFUSERS_LORA_NAME), x_t, ones, text
    )
    assert _relative_l2(theirs, expected) < 1e-5
    # ComfyUI: every key maps to a model key, and its patches give the student
    comfy = load_file(output / COMFYUI_LORA_NAME)
    patched = _comfyui_patched_state(runs, comfy)
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel.from_pretrained(runs / "base_snapshot" / "transformer")
    model.load_state_dict(patched)
    assert _relative_l2(_diffusers_output(model.eval(), x_t, ones, text), expected) < 1e-5
    assert json.loads((output / EXPORT_INFO_NAME).read_text())[FOLD_INFO_KEY]["time"] == 1.0
    assert (output / "scheduler" / "scheduler_config.json").is_file()


def _stock_pipeline(transformer, scheduler_folder: Path):
    """diffusers' QwenImagePipeline around `transformer`, with the export's scheduler (the
    tiny VAE and text encoder only fix the geometry: prompts come as embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from apex_dist.models.tiny import build_tiny_text_pair, build_tiny_vae

    tokenizer, text_encoder = build_tiny_text_pair()
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
            scheduler_folder, subfolder="scheduler"
        ),
        vae=build_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


@pytest.mark.parametrize("mode", ["lora", "merged"])
def test_stock_pipeline_at_one_step_reproduces_the_students_sample(runs, tmp_path, mode):
    """QwenImagePipeline(num_inference_steps=1), loaded the ordinary way from the default
    export, gives apex_dist's 1-NFE sample from the same noise and prompt embeddings."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from apex_dist.method import sample

    output = tmp_path / mode
    base = runs / "base_snapshot"
    export_checkpoint(
        runs / "z3_ws2_lora", output, ExportOptions(mode=mode, base=base, dtype="fp32")
    )
    if mode == "lora":
        transformer = QwenImageTransformer2DModel.from_pretrained(base / "transformer")
        pipeline = _stock_pipeline(transformer, output)
        pipeline.load_lora_weights(output)
    else:
        transformer = QwenImageTransformer2DModel.from_pretrained(output)
        pipeline = _stock_pipeline(transformer, output)
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 16, generator=generator)  # packed (B, 2x2 tokens, 16)
    text = torch.randn(2, 3, 32, generator=generator)
    mask = torch.ones(2, 3, dtype=torch.long)
    latents = pipeline(
        prompt_embeds=text,
        prompt_embeds_mask=mask,
        latents=noise,
        height=32,
        width=32,
        num_inference_steps=1,
        true_cfg_scale=1.0,
        output_type="latent",
    ).images
    student = _apex_lora_model(runs / "z3_ws2_lora")
    expected = sample(student, noise, text, mask.bool(), nfe=1, image_shape=(1, 2, 2))
    assert isinstance(pipeline, QwenImagePipeline)
    assert _relative_l2(latents, expected) < 1e-4


def _comfyui_model_keys(runs: Path) -> dict[str, torch.Tensor]:
    """ComfyUI's state dict of a Qwen-Image model: diffusers' module paths under
    `diffusion_model.` (comfy/ldm/qwen_image/model.py names every layer as diffusers does:
    time_text_embed.timestep_embedder.linear_1/2, img_mod.1, attn.to_out.0, img_mlp.net.0.proj,
    norm_out.linear, proj_out)."""
    base = load_file(runs / "base_snapshot" / "transformer" / "diffusion_pytorch_model.safetensors")
    return {f"diffusion_model.{name}": tensor for name, tensor in base.items()}


def _comfyui_patched_state(runs: Path, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's reading of a LoRA file for Qwen-Image, rule by rule (comfy/lora.py):
    `model_lora_keys_unet` maps "<model key without .weight>" to the weight for every
    `diffusion_model.*.weight`; `load_lora` reads "<x>.lora_up.weight" / "<x>.lora_down.weight"
    with "<x>.alpha" (scale alpha / rank), and "<x>.diff_b" as a difference added to
    "<x>.bias". Every key of the file must be consumed and every target must exist."""
    model = _comfyui_model_keys(runs)
    key_map = {name.removesuffix(".weight"): name for name in model if name.endswith(".weight")}
    patched = {name: tensor.clone().float() for name, tensor in model.items()}
    consumed = set()
    for prefix, weight_key in key_map.items():
        up, down = lora.get(f"{prefix}.lora_up.weight"), lora.get(f"{prefix}.lora_down.weight")
        if up is not None and down is not None:
            alpha = lora.get(f"{prefix}.alpha")
            scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
            assert (up @ down).shape == patched[weight_key].shape, prefix
            patched[weight_key] += scale * (up.float() @ down.float())
            consumed |= {f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight"}
            consumed |= {f"{prefix}.alpha"} if alpha is not None else set()
        diff_bias = lora.get(f"{prefix}.diff_b")
        if diff_bias is not None:
            bias_key = f"{prefix}.bias"
            assert bias_key in patched and patched[bias_key].shape == diff_bias.shape, prefix
            patched[bias_key] += diff_bias.float()
            consumed.add(f"{prefix}.diff_b")
    assert set(lora) == consumed, f"keys ComfyUI would not load: {sorted(set(lora) - consumed)}"
    return {name.removeprefix("diffusion_model."): tensor for name, tensor in patched.items()}


def test_merged_export_reproduces_lora_model_with_e2(runs, tmp_path):
    output = tmp_path / "merged"
    options = ExportOptions(
        mode="merged",
        base=runs / "base_snapshot",
        dtype="fp32",
        keep_apex_keys=True,
        max_shard_bytes=50_000,
        verify=True,
    )
    export_checkpoint(runs / "z3_ws2_lora", output, options)
    merged = QwenImageTransformer.from_preset(PRESET)
    missing = merged.load_pretrained_state_dict(_load_export(output))
    assert not [name for name in missing if name.startswith("time_text_embed_2.")]
    apex_model = _apex_lora_model(runs / "z3_ws2_lora")
    x_t, t, text = _inputs()
    with torch.no_grad():  # tt = 0 exercises the trained E2, the one-step generator's call
        expected = apex_model(x_t, t, torch.zeros(2), text, image_shape=(1, 2, 2))
        merged_output = merged.eval()(x_t, t, torch.zeros(2), text, image_shape=(1, 2, 2))
    assert (expected - merged_output).abs().max() <= OUTPUT_TOLERANCE
    # the LoRA export's extras file carries the same E2 (its adapters folded in)
    export_checkpoint(runs / "z3_ws2_lora", tmp_path / "lora", ExportOptions())
    extras = load_file(tmp_path / "lora" / APEX_EXTRA_NAME)
    state = merged.state_dict()
    assert extras and all(torch.equal(tensor, state[name]) for name, tensor in extras.items())


def test_lora_checkpoint_needs_lora_mode_and_alpha(runs, tmp_path):
    with pytest.raises(ModelMismatchError, match="LoRA checkpoint"):
        export_checkpoint(runs / "z3_ws2_lora", tmp_path / "a", ExportOptions(mode="full"))
    with pytest.raises(ModelMismatchError, match="needs --base"):
        export_checkpoint(runs / "z3_ws2_lora", tmp_path / "b", ExportOptions(mode="merged"))
    with pytest.raises(ModelMismatchError, match="needs a LoRA checkpoint"):
        export_checkpoint(runs / "z3_ws2", tmp_path / "c", ExportOptions(mode="lora"))
    assert _no_leftovers(tmp_path) and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# bad input


def test_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="not a DeepSpeed checkpoint directory"):
        export_checkpoint(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_missing_tag_lists_available(runs, tmp_path):
    with pytest.raises(CheckpointFormatError, match=f"step_00000099.*available tags: {TAG}"):
        export_checkpoint(runs / "z3_ws2", tmp_path / "out", tag="step_00000099")
    assert not (tmp_path / "out").exists()


def test_truncated_shard_fails_before_writing(runs, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs / "z3_ws2", copy)
    optimizer_file = copy / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[: optimizer_file.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        export_checkpoint(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def _corrupt_overlap(data):
    return overlap_last_two(data)


def _corrupt_huge_header_length(data):
    return set_header_length(data, 2**63), None


def _corrupt_truncated(data):
    return data[: len(data) - 100], None


def _corrupt_unknown_dtype(data):
    name = tensors_in_order(split(data)[0])[0]
    return set_field(data, name, "dtype", "F7"), name


@pytest.mark.parametrize(
    "corrupt,expected",
    [
        (_corrupt_overlap, "overlaps tensor"),
        (_corrupt_huge_header_length, "header length 9223372036854775808 is larger"),
        (_corrupt_truncated, r"tensor '[^']+' ends at byte .* truncated"),
        (_corrupt_unknown_dtype, "unknown dtype 'F7'"),
    ],
    ids=["overlap", "huge-header-length", "truncated", "unknown-dtype"],
)
def test_merged_export_refuses_a_corrupt_base_and_writes_nothing(runs, tmp_path, corrupt, expected):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(runs / "base_snapshot", base)
    weights = base / "transformer" / "diffusion_pytorch_model.safetensors"
    data, tensor = corrupt(weights.read_bytes())
    weights.write_bytes(data)
    output = tmp_path / "exports" / "merged"
    options = ExportOptions(mode="merged", base=base, dtype="fp32")
    with pytest.raises(CheckpointFormatError, match=expected) as caught:
        export_checkpoint(runs / "z3_ws2_lora", output, options)
    assert str(weights) in str(caught.value)
    if tensor is not None:
        assert f"tensor '{tensor}'" in str(caught.value)
    assert not output.exists()
    assert not (tmp_path / "exports").exists() or not list((tmp_path / "exports").iterdir())


def test_merged_export_refuses_a_base_index_that_does_not_match_its_files(runs, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(runs / "base_snapshot", base)
    folder = base / "transformer"
    weights_name = "diffusion_pytorch_model.safetensors"
    names = tensors_in_order(split((folder / weights_name).read_bytes())[0])
    weight_map = dict.fromkeys(names, weights_name)
    weight_map["not_in_any_file.weight"] = weights_name
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    options = ExportOptions(mode="merged", base=base, dtype="fp32")
    with pytest.raises(CheckpointFormatError, match="'not_in_any_file.weight'.*no file holds it"):
        export_checkpoint(runs / "z3_ws2_lora", tmp_path / "merged", options)
    assert not (tmp_path / "merged").exists() and _no_leftovers(tmp_path)


def test_missing_rank_file(runs, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(runs / "z3_ws2", copy)
    (copy / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointFormatError, match=r"missing ranks \[1\]"):
        export_checkpoint(copy, tmp_path / "out")


def test_model_config_mismatch(runs, tmp_path):
    with pytest.raises(ModelMismatchError, match=r"--preset qwen-image-0.6b.*img_in.weight: shape"):
        export_checkpoint(
            runs / "z2_ws2", tmp_path / "out", ExportOptions(preset="qwen-image-0.6b")
        )
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_existing_output_is_kept_unless_overwrite(runs, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_checkpoint(runs / "z2_ws1", output)
    assert (output / "keep.txt").read_text() == "mine"
    export_checkpoint(runs / "z2_ws1", output, ExportOptions(overwrite=True))
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()
    assert _no_leftovers(tmp_path)


def test_command_line(runs, tmp_path, capsys):
    status = convert_checkpoint.main(
        [
            str(runs / "z3_ws2_lora" / "checkpoints"),
            str(tmp_path / "out"),
            "--verify",
            "--lora-format",
            "comfyui",
        ]
    )
    assert status == 0 and (tmp_path / "out" / COMFYUI_LORA_NAME).is_file()
    assert "verified" in capsys.readouterr().out
    status = convert_checkpoint.main([str(tmp_path / "nothing"), str(tmp_path / "out2")])
    assert status == 1
    assert "does not exist" in capsys.readouterr().err
