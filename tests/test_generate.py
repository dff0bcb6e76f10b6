"""apex-generate and the student pipeline on tiny runs.

A module fixture trains two tiny Qwen-Image runs for one step through the real launcher (a LoRA
run and a full one, one process each, ZeRO-2 on one CPU rank) and exports the LoRA run as
merged and LoRA files, raw and folded (the converter's default, `apex_dist.models.fold`). Every
source must load the same student and give the same images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from apex_dist import generate
from apex_dist.export import student as sources
from apex_dist.export.convert import (
    APEX_EXTRA_NAME,
    DIFFUSERS_LORA_NAME,
    ExportOptions,
    export_checkpoint,
)
from apex_dist.method.sampler import ONE_STEP_TIME
from apex_dist.models.fold import E2_KEYS, FOLD_MODULE

ROOT = Path(__file__).resolve().parents[1]
LORA_RANK, LORA_ALPHA = 4, 8.0  # alpha != rank: a lost alpha / rank scale shows
RESOLUTION = 32
PROMPTS = ["a red cube on a table", "two blue balls"]
# Tolerance on weights loaded from different sources of one checkpoint (fp32; a fold adds and
# subtracts E2(0), which rounds at one ulp of the bias).
WEIGHT_TOLERANCE = 1e-6
# Largest difference of 8-bit pixels between images of the same student from two sources.
PIXEL_TOLERANCE = 1
# The pipeline's reproduction of apex_dist's sampler (relative L2 of the latents, fp32).
PIPELINE_TOLERANCE = 1e-4


def train_tiny_run(config: str, snapshot: Path, output: Path, *overrides: str) -> Path:
    """One optimizer step of a shipped config made tiny, through launcher/run.py."""
    command = [sys.executable, str(ROOT / "launcher" / "run.py"), "--config", str(config)]
    command += [
        "model.preset=qwen-image-tiny",
        f"model.pretrained={snapshot}",
        "model.dtype=fp32",
        "data.kind=synthetic",
        "data.sample_kind=image_text",
        f"data.resolution={RESOLUTION}",
        "data.num_workers=0",
        "logging.wandb=disabled",
        "logging.sample_every_steps=0",
        "train.steps=1",
        "checkpoint.every_steps=1",
        "optimizer.lr=1.0e-2",  # large enough that one step moves every trained tensor
        "parallel.zero_stage=2",
        "parallel.hierarchical_partition_size=1",
        "parallel.activation_checkpointing=0",
        f"train.output_dir={output}",
        *overrides,
    ]
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        environment.pop(name, None)
    finished = subprocess.run(
        command, capture_output=True, text=True, env=environment, timeout=600, cwd=ROOT
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The snapshot, a LoRA run and a full run, and the LoRA run's exports."""
    from apex_dist.models.tiny import write_tiny_snapshot

    root = tmp_path_factory.mktemp("generate")
    snapshot = write_tiny_snapshot(root / "Qwen-Image-tiny")
    lora_run = train_tiny_run(
        ROOT / "configs" / "qwen_image_lora.yaml",
        snapshot,
        root / "lora_run",
        f"model.lora.rank={LORA_RANK}",
        f"model.lora.alpha={LORA_ALPHA}",
    )
    full_run = train_tiny_run(ROOT / "configs" / "qwen_image_full.yaml", snapshot, root / "full")
    fp32 = {"dtype": "fp32"}
    merged = root / "merged"  # raw, E2 kept in the model files
    export_checkpoint(
        lora_run, merged, ExportOptions(mode="merged", base=snapshot, keep_apex_keys=True, **fp32)
    )
    merged_folded = root / "merged_folded"  # the converter's default: folded, E2 in the extras
    export_checkpoint(lora_run, merged_folded, ExportOptions(mode="merged", base=snapshot, **fp32))
    lora = root / "lora"
    export_checkpoint(lora_run, lora, ExportOptions(mode="lora", fold_time=None, **fp32))
    lora_folded = root / "lora_folded"
    export_checkpoint(lora_run, lora_folded, ExportOptions(mode="lora", **fp32))
    plain = root / "plain"  # a folded merged export that lost its extras file: not a student
    shutil.copytree(merged_folded, plain)
    (plain / APEX_EXTRA_NAME).unlink()
    return {
        "snapshot": snapshot,
        "lora_run": lora_run,
        "full_run": full_run,
        "merged": merged,
        "lora": lora,
        "plain": plain,
        "merged_folded": merged_folded,
        "lora_folded": lora_folded,
    }


# --------------------------------------------------------------------------------------------
# loading


def _state(loaded) -> dict[str, torch.Tensor]:
    return {key: tensor.float() for key, tensor in loaded.model.state_dict().items()}


def _assert_same_student(first, second) -> None:
    left, right = _state(first), _state(second)
    keys = [key for key in left if not key.startswith("condition_shift.")]
    for key in keys:
        torch.testing.assert_close(
            right[key], left[key], rtol=0, atol=WEIGHT_TOLERANCE, msg=lambda m, k=key: f"{k}: {m}"
        )


def test_every_source_loads_the_same_student(tiny):
    snapshot = tiny["snapshot"]
    from_run = sources.load_student(tiny["lora_run"])
    assert from_run.kind == sources.SOURCE_RUN and from_run.snapshot == snapshot
    # the LoRA changed the base and E2 is the run's own, not E1
    base = sources.load_teacher(snapshot)
    merged_module = f"{FOLD_MODULE}.weight"
    assert not torch.equal(_state(from_run)[merged_module], _state(base)[merged_module])
    assert not torch.equal(
        _state(from_run)[E2_KEYS[0]],
        _state(from_run)["time_text_embed.timestep_embedder.linear_1.weight"],
    )
    for name in ("merged", "merged_folded"):
        loaded = sources.load_student(tiny[name])
        assert loaded.kind == sources.SOURCE_EXPORT
        _assert_same_student(from_run, loaded)
    for name in ("lora", "lora_folded"):
        loaded = sources.load_student(tiny[name], base=snapshot)
        assert loaded.kind == sources.SOURCE_LORA_EXPORT
        _assert_same_student(from_run, loaded)
    folded = sources.load_student(tiny["merged_folded"])
    assert folded.details["fold"] == ONE_STEP_TIME and "undone" in folded.description
    # the full run: built from the run's config, every tensor from the checkpoint
    full = sources.load_student(tiny["full_run"], weights="trained", tag="step_00000001")
    assert full.details["tag"] == "step_00000001"
    assert not any(tensor.is_meta for tensor in full.model.state_dict().values())


# --------------------------------------------------------------------------------------------
# the tool


def run_tool(arguments, capsys) -> tuple[int, str, str]:
    code = generate.main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _array(image) -> torch.Tensor:
    return torch.from_numpy(numpy.array(image.convert("RGB"))).to(torch.int32)


def _pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return _array(image)


def test_tool_writes_the_same_images_from_each_source_with_their_metadata(tiny, tmp_path, capsys):
    common = [*PROMPTS, "--nfe", "2", "--images-per-prompt", "2", "--seed", "10", "--quiet"]
    outputs = {}
    for name, extra in (
        ("lora_run", []),
        # exports know no training resolution: the size is given
        ("merged_folded", ["--base", tiny["snapshot"], "--resolution", str(RESOLUTION)]),
        ("lora_folded", ["--base", tiny["snapshot"], "--height", "32", "--width", "32"]),
    ):
        out = tmp_path / name
        command = [*common, *extra, "--source", tiny[name], "--out", out]
        code, printed, err = run_tool(command, capsys)
        assert code == 0, err
        assert "images/s" in printed and "student: 4 images" in printed
        outputs[name] = out
    names = ["00000_0.png", "00000_1.png", "00001_0.png", "00001_1.png"]
    reference = outputs["lora_run"]
    assert sorted(path.name for path in reference.glob("0*.png")) == names
    for name in names:
        for other in ("merged_folded", "lora_folded"):
            difference = (_pixels(reference / name) - _pixels(outputs[other] / name)).abs().max()
            assert int(difference) <= PIXEL_TOLERANCE, (other, name)
    with Image.open(reference / "00001_1.png") as image:
        assert image.size == (RESOLUTION, RESOLUTION)
        chunks = dict(image.text)
    assert chunks["prompt"] == PROMPTS[1] and chunks["seed"] == "13"
    assert chunks["nfe"] == "2" and chunks["dtype"] == "fp32" and chunks["model"] == "student"
    assert chunks["size"] == f"{RESOLUTION}x{RESOLUTION}" and "step_00000001" in chunks["source"]
    from apex_dist.evaluation.images import read_image_folder

    records = read_image_folder(reference)
    assert [(record.prompt, record.seed) for record in records] == [
        (PROMPTS[0], 10),
        (PROMPTS[0], 11),
        (PROMPTS[1], 12),
        (PROMPTS[1], 13),
    ]
    with Image.open(reference / "contact_sheet.png") as sheet:
        assert sheet.width > 4 * RESOLUTION


def test_an_image_depends_only_on_its_prompt_and_seed(tiny):
    settings = generate.Settings(source=tiny["lora_run"], nfe=4, batch_size=3, device="cpu")
    generator = generate.build_generator(settings)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    together = generator.images(prompts, [5, 6, 7], "student")
    generator.settings.batch_size = 1
    alone = generator.images([PROMPTS[0]], [7], "student")[0]
    other_seed = generator.images([PROMPTS[0]], [8], "student")[0]
    assert int((_array(together[2]) - _array(alone)).abs().max()) <= PIXEL_TOLERANCE
    assert int((_array(together[2]) - _array(other_seed)).abs().max()) > PIXEL_TOLERANCE
    assert generator.images_made["student"] == 5


def test_compare_runs_student_and_teacher_and_prints_the_speed_up(tiny, tmp_path, capsys):
    out = tmp_path / "compare"
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    command = ["--prompt-file", prompt_file, "--source", tiny["full_run"], "--compare"]
    command += ["--teacher-steps", "3", "--guidance-scale", "2", "--out", out, "--quiet"]
    code, printed, err = run_tool(command, capsys)
    assert code == 0, err
    assert "teacher: 2 images" in printed and "student: 2 images" in printed
    assert "speed-up:" in printed and "6x fewer transformer evaluations" in printed
    for model in ("student", "teacher"):
        assert sorted(path.name for path in (out / model).glob("*.png")) == [
            "00000_0.png",
            "00001_0.png",
        ]
    with Image.open(out / "teacher" / "00000_0.png") as image:
        assert image.text["model"] == "teacher" and image.text["steps"] == "3"
    assert (out / "contact_sheet.png").is_file()
    # the teacher alone, from the snapshot
    code, printed, err = run_tool(
        [PROMPTS[0], "--teacher", "--base", tiny["snapshot"], "--teacher-steps", "2",
         "--resolution", "32", "--out", tmp_path / "teacher", "--quiet"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "teacher: 1 images" in printed
    # as docs/evaluation.md writes it: the snapshot as --source of the teacher
    teacher = generate.generator_from_arguments(
        ["--source", str(tiny["snapshot"]), "--teacher", "--teacher-steps", "2"]
    )
    assert teacher.student is None and teacher.size == (1024, 1024)


def _errors(tiny, tmp_path):
    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    wrong_base = tmp_path / "wrong_base"
    shutil.copytree(tiny["snapshot"], wrong_base)
    from diffusers import QwenImageTransformer2DModel

    from apex_dist.models.qwen_image import QWEN_IMAGE_PRESETS

    shutil.rmtree(wrong_base / "transformer")
    architecture = {**QWEN_IMAGE_PRESETS["qwen-image-tiny"], "num_layers": 1}
    QwenImageTransformer2DModel(**architecture).save_pretrained(wrong_base / "transformer")
    return [
        (["--source", tmp_path / "missing"], "does not exist"),
        (["--source", empty_run], "not a DeepSpeed checkpoint directory"),
        (["--source", tiny["lora_run"], "--tag", "step_00000099"], "step_00000099"),
        (["--source", tiny["lora"]], "is a LoRA export: it holds the adapters only; pass --base"),
        (["--source", tiny["lora"], "--base", wrong_base], "does not fit"),
        (["--source", tiny["lora_run"], "--base", wrong_base], "does not fit"),
        (["--source", tiny["plain"], "--base", tiny["snapshot"]], APEX_EXTRA_NAME),
        (["--source", tiny["lora_run"], "--nfe", "3"], "--nfe"),
        (["--source", tiny["lora_run"], "--seeds", "1", "2", "3"], "--seeds"),
        ([], "--source"),
    ]


def test_user_errors_exit_2_with_a_message_that_names_the_problem(tiny, tmp_path, capsys):
    for arguments, expected in _errors(tiny, tmp_path):
        code, _, err = run_tool(["a cat", *arguments, "--out", tmp_path / "out"], capsys)
        assert code == 2, (arguments, err)
        assert expected in err, (arguments, err)
        assert "Traceback" not in err and err.startswith("apex-generate: error:")
    code, _, err = run_tool(["--source", tiny["lora_run"]], capsys)
    assert code == 2 and "no prompts" in err
    # a run moved to a machine without its snapshot: --base gives the encoders
    moved = tmp_path / "moved_run"
    shutil.copytree(tiny["full_run"], moved)
    config = moved / "checkpoints" / "step_00000001" / "config.yaml"
    config.write_text(config.read_text().replace(str(tiny["snapshot"]), str(tmp_path / "gone")))
    code, _, err = run_tool(["a cat", "--source", moved, "--out", tmp_path / "m"], capsys)
    assert code == 2 and "does not exist on this machine: pass --base" in err
    command = ["a cat", "--source", moved, "--base", tiny["snapshot"], "--out", tmp_path / "m"]
    code, _, err = run_tool(command, capsys)
    assert code == 0, err
    _, _, err = run_tool(["a cat", "--source", tiny["plain"], "--base", tiny["snapshot"]], capsys)
    assert "not a student" in err


def test_apex_eval_generate_runs_the_real_generator(tiny, tmp_path, capsys):
    from tiny_evaluation import TINY_DETECTOR_EDGE, write_clip_snapshot, write_detector_snapshot

    from apex_dist.evaluation.prompts import single_object, write_prompt_set
    from apex_tools import eval as eval_tool

    prompts = tmp_path / "prompts.jsonl"
    write_prompt_set([single_object("cup"), single_object("dog")], prompts)
    out = tmp_path / "evaluation"
    command = ["generate", "--out", out, "--prompts", prompts, "--images-per-prompt", "2"]
    command += ["--clip", write_clip_snapshot(tmp_path / "clip")]
    command += ["--detector", write_detector_snapshot(tmp_path / "detector")]
    command += ["--detector-input", TINY_DETECTOR_EDGE, TINY_DETECTOR_EDGE * 2, "--quiet"]
    command += ["--batch-size", "3", "--", "--source", tiny["lora_run"], "--nfe", "1"]
    code = eval_tool.main([str(argument) for argument in command])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "results.json").read_text())
    assert report["summary"]["images"] == 4
    with Image.open(out / "images" / "00001_1.png") as image:
        assert image.size == (RESOLUTION, RESOLUTION) and image.text["seed"] == "3"
    # the same image as apex-generate's for that prompt and seed
    code, _, err = run_tool(
        ["a photo of a dog", "--source", tiny["lora_run"], "--seed", "3", "--out", tmp_path / "g"],
        capsys,
    )
    assert code == 0, err
    difference = _pixels(out / "images" / "00001_1.png") - _pixels(tmp_path / "g" / "00000_0.png")
    assert int(difference.abs().max()) <= PIXEL_TOLERANCE
    # a wrong generator option is the generator's error, reported by apex-eval
    command[-1] = "3"
    code = eval_tool.main([str(argument) for argument in command])
    assert code == 1 and "--nfe" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the pipeline


@pytest.mark.parametrize("export", ["merged", "merged_folded", "lora", "lora_folded"])
def test_pipeline_reproduces_the_sampler_at_2_and_4_nfe(tiny, export):
    from apex_dist.method import sample
    from apex_dist.pipeline import ApexQwenImagePipeline

    student = sources.load_student(tiny["lora_run"])
    pipeline = ApexQwenImagePipeline.from_export(tiny["snapshot"], tiny[export])
    image_shape = (1, 2, 3)
    side = pipeline.vae_scale_factor * 2
    height, width = image_shape[1] * side, image_shape[2] * side
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 6, 16, generator=generator)  # (B, N = 2 * 3, packed channels)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # one padded prompt
    text = torch.randn(2, 5, 32, generator=generator) * mask[..., None]
    for nfe in (2, 4):
        expected = sample(
            student.model,
            noise,
            text,
            mask,
            nfe=nfe,
            generator=torch.Generator().manual_seed(nfe),
            image_shape=image_shape,
        )
        latents = pipeline(
            prompt_embeds=text,
            prompt_embeds_mask=mask,
            latents=noise,
            height=height,
            width=width,
            num_inference_steps=nfe,
            generator=torch.Generator().manual_seed(nfe),
            output_type="latent",
        ).images
        error = float((latents - expected).norm() / expected.norm())
        assert error < PIPELINE_TOLERANCE, (export, nfe, error)
    images = pipeline(
        prompt_embeds=text, prompt_embeds_mask=mask, height=height, width=width,
        num_inference_steps=2, generator=torch.Generator().manual_seed(1),
    ).images  # fmt: skip
    assert images[0].size == (width, height)


@pytest.mark.parametrize("export", ["merged_folded", "lora_folded"])
def test_stock_diffusers_is_the_student_at_one_step_with_a_folded_export(tiny, export):
    """What a stock client runs: diffusers' own pipeline and loaders, no apex_dist code."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    snapshot = tiny["snapshot"]
    lora = export == "lora_folded"
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKLQwenImage.from_pretrained(snapshot / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(snapshot / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(snapshot / "tokenizer"),
        transformer=QwenImageTransformer2DModel.from_pretrained(
            snapshot / "transformer" if lora else tiny[export]
        ),
    )
    if lora:
        pipeline.load_lora_weights(tiny[export], weight_name=DIFFUSERS_LORA_NAME)
    student = sources.load_student(tiny["lora_run"]).model
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, generator=generator)
    text = torch.randn(2, 3, 32, generator=generator)
    one = torch.ones(2)  # ONE_STEP_TIME, the fold time
    expected = student(x, one, torch.zeros(2), text, None, None, image_shape=(1, 2, 2))
    with torch.no_grad():
        velocity = pipeline.transformer(
            hidden_states=x,
            timestep=one,
            encoder_hidden_states=text,
            img_shapes=[[(1, 2, 2)]] * 2,
            return_dict=False,
        )[0]
    assert float((velocity - expected).norm() / expected.norm()) < PIPELINE_TOLERANCE
