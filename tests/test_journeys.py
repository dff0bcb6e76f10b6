"""User journeys end to end: real `launcher/run.py` runs through `deepspeed` and `torchrun`.

Each journey starts the launcher as a user would, on tiny models (a whole tiny Qwen-Image
snapshot: transformer, text encoder, tokenizer, VAE) with data written by the project's own
tools, and asserts outcomes: checkpoints, resumed step counts, exported files that load, decoded
validation grids, wandb run ids. docs/journeys.md has the same journeys as commands.

J1 prompt-only data-free LoRA from prompt shards, resume (deepspeed, 2 ranks) + J6 grids, wandb
J2 image-text LoRA, guidance 0.8, SIGTERM to torchrun mid-run, resume (torchrun, 2 ranks)
J3 full fine-tuning with EMA, export full / EMA / LoRA (diffusers, ComfyUI), reload each
J4 two nodes simulated with torchrun c10d on localhost
J5 the deepspeed launcher killed (SIGKILL): every rank saves and exits
J7 every shipped config, unchanged but for a tiny model and data: two steps and a save (one
   process: the launcher paths are the other journeys')
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file

from apex_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHER = str(ROOT / "launcher" / "run.py")
# Seconds one launch may take on the 2-core CI machine (DeepSpeed's start-up included).
LAUNCH_TIMEOUT = 420
# Transformer blocks of the tiny snapshot (apex_dist.models.tiny: preset qwen-image-tiny).
TINY_BLOCKS = 2
# Prompts of the prompt-only shards (words the tiny tokenizer knows).
PROMPTS = [
    "A red cat sits on a blue mat next to a small green box.",
    "An old lighthouse at dusk, waves crashing, seagulls in a cloudy sky.",
    "A sign that says hello world in bold letters.",
    "A small green box.",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        "WANDB_SILENT": "true",
        "PYTHONPATH": str(ROOT),
    }


class Launch:
    """A launcher process whose output is collected line by line in a thread."""

    def __init__(self, command: list[str], cwd: Path = ROOT):
        self.command = command
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # signals in a test never reach pytest
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = LAUNCH_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"never saw {text!r}; output:\n{self.output[-4000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"launch timed out; output:\n{self.output[-4000:]}") from None
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def succeed(self) -> str:
        code = self.wait()
        assert code == 0, f"exit {code}:\n{self.output[-6000:]}"
        return self.output


def launch_with(tool: str, ranks_option: str, config: Path, overrides, ranks: int) -> Launch:
    return Launch(
        [
            str(BIN / tool),
            ranks_option,
            str(ranks),
            "--master_port",
            str(free_port()),
            LAUNCHER,
            "--config",
            str(config),
            *overrides,
        ]
    )


def deepspeed_launch(config: Path, *overrides: str, ranks: int = 2) -> Launch:
    return launch_with("deepspeed", "--num_gpus", config, overrides, ranks)


def torchrun_launch(config: Path, *overrides: str, ranks: int = 2) -> Launch:
    return launch_with("torchrun", "--nproc_per_node", config, overrides, ranks)


def latest(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


# --------------------------------------------------------------------------------------------
# shared inputs: a tiny snapshot and shards written by the project's tools


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    from apex_dist.models.tiny import write_tiny_snapshot

    return write_tiny_snapshot(tmp_path_factory.mktemp("snapshot") / "Qwen-Image-tiny")


def make_shards(*arguments: str) -> dict:
    finished = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), *arguments],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout)


@pytest.fixture(scope="module")
def prompt_shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS * 8) + "\n")
    make_shards(
        "--prompts",
        str(folder / "prompts.txt"),
        "--output",
        str(folder / "p"),
        "--samples-per-shard",
        "8",
    )
    return json.dumps(sorted(str(path) for path in folder.glob("p-*.tar")))


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("images")
    make_shards(
        "--synthetic",
        "64",
        "--resolution",
        "32",
        "--output",
        str(folder / "shapes"),
        "--samples-per-shard",
        "16",
    )
    return json.dumps(sorted(str(path) for path in folder.glob("shapes-*.tar")))


def tiny_qwen(snapshot: Path) -> list[str]:
    """A shipped Qwen-Image config made tiny: the model and the image size only."""
    return [
        "model.preset=qwen-image-tiny",
        f"model.pretrained={snapshot}",
        "data.resolution=32",
        "logging.wandb=disabled",
    ]


LORA = ROOT / "configs" / "qwen_image_lora.yaml"
FULL = ROOT / "configs" / "qwen_image_full.yaml"


# --------------------------------------------------------------------------------------------
# J1 + J6


def test_j1_prompt_only_lora_resumes_with_decoded_grids_and_one_wandb_run(
    snapshot, prompt_shards, tmp_path
):
    run = tmp_path / "prompt_lora"
    common = [
        *tiny_qwen(snapshot),
        f"data.urls={prompt_shards}",
        "data.sample_kind=prompt",
        "data.aspect_buckets=[1.0,2.0]",
        "data.num_workers=1",
        "method.apex_v0.data_free=true",
        "model.lora.rank=4",
        f"train.output_dir={run}",
        "checkpoint.every_steps=2",
        "logging.every_steps=2",
        "logging.wandb=offline",
        "logging.sample_every_steps=4",
        "logging.sample_count=3",
        "logging.teacher_steps=3",
    ]
    # periodic GenEval-style evaluation on both ranks (tiny detector and CLIP snapshots)
    from tiny_evaluation import write_clip_snapshot, write_detector_snapshot

    evaluation = [
        "logging.eval_every_steps=4",
        "logging.eval_prompt_count=3",
        f"logging.eval_clip={write_clip_snapshot(tmp_path / 'clip')}",
        f"logging.eval_detector={write_detector_snapshot(tmp_path / 'detector')}",
    ]
    first = deepspeed_launch(LORA, *common, *evaluation, "train.steps=4").succeed()
    assert "step 4/4 loss" in first and latest(run) == 4
    assert first.count("evaluation step ") == 2, first[-3000:]  # steps 0 and 4
    report = json.loads((run / "evaluation" / "step_00000004" / "results.json").read_text())
    assert len(report["images"]) == 3
    assert "kernels: attention auto" in first  # what the run chose is in its log
    assert "FutureWarning" not in first  # no per-step library lines between the progress lines
    assert first.count(" loss ") == first.count("step 2/4 loss") + first.count("step 4/4 loss")
    run_id = (run / "run_id").read_text().strip()
    second = deepspeed_launch(LORA, *common, "train.steps=6").succeed()
    assert "resumed from" in second and "at step 4" in second
    assert "step 6/6 loss" in second and latest(run) == 6
    assert (run / "run_id").read_text().strip() == run_id  # one wandb run across the resume
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert wandb_runs and all(path.name.endswith(run_id) for path in wandb_runs)

    # the adapters trained: B moved away from its zero start on every adapted module that
    # reaches the output (the last block's text stream feeds nothing: diffusers drops it)
    checkpoint = run / "checkpoints" / "step_00000006"
    exported = tmp_path / "lora_export"
    convert(checkpoint, exported, "--lora-format", "diffusers", "comfyui")
    adapters = load_file(exported / "pytorch_lora_weights.safetensors")
    last = f"transformer_blocks.{TINY_BLOCKS - 1}."
    unused = (f"{last}attn.add_q_proj", f"{last}attn.to_add_out", f"{last}txt_mlp")
    ups = {
        key: tensor
        for key, tensor in adapters.items()
        if key.endswith("lora_B.weight") and not key.removeprefix("transformer.").startswith(unused)
    }
    assert ups and all(tensor.abs().sum() > 0 for tensor in ups.values()), [
        key for key, tensor in ups.items() if tensor.abs().sum() == 0
    ]
    assert (exported / "pytorch_lora_weights_comfyui.safetensors").is_file()
    assert all(torch.isfinite(tensor).all() for tensor in adapters.values())

    # J6: decoded, labelled grids: 4 sampler rows x 3 prompts of 32 px images enlarged to 128
    from PIL import Image

    for step in (0, 4):
        with Image.open(run / "samples" / f"step_{step:08d}.png") as grid:
            width, height = grid.size
            assert width >= 3 * 128 and height >= 4 * 128
            pixels = torch.from_numpy(numpy.asarray(grid.convert("L"))).float()
            assert pixels.std() > 10  # images and text, not a blank page
    from safetensors.torch import load_file as load_samples

    teacher = load_samples(run / "samples" / "teacher.safetensors")["samples"]
    assert teacher.shape[0] == 3 and torch.isfinite(teacher).all()

    # a fresh run of another directory with the same name gets its own id
    other = tmp_path / "elsewhere" / "prompt_lora"
    from apex_dist.metrics import resolve_run_id

    assert resolve_run_id(other, resume=False) != run_id


def convert(checkpoint: Path, output: Path, *arguments: str) -> None:
    finished = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_checkpoint.py"),
            str(checkpoint),
            str(output),
            *arguments,
        ],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# J2


def test_j2_image_text_lora_stops_on_sigterm_to_torchrun_and_resumes(
    snapshot, image_shards, tmp_path
):
    run = tmp_path / "image_lora"
    common = [
        *tiny_qwen(snapshot),
        f"data.urls={image_shards}",
        "data.num_workers=0",
        "method.guidance.ratio=0.8",
        "model.lora.rank=4",
        f"train.output_dir={run}",
        "checkpoint.every_steps=1000",
        "logging.every_steps=1",
        "logging.sample_every_steps=0",
    ]
    launch = torchrun_launch(LORA, *common, "train.steps=1000")
    launch.wait_for("step 2/1000 loss")
    launch.process.send_signal(signal.SIGTERM)  # to torchrun, the launcher
    launch.wait()
    output = launch.output
    assert "received: saving at step" in output, output[-4000:]
    stopped_at = latest(run)
    assert 2 <= stopped_at < 1000
    state_files = sorted((run / "checkpoints" / f"step_{stopped_at:08d}").glob("rank_state_*"))
    assert len(state_files) == 2  # both ranks saved the same step
    resumed = torchrun_launch(LORA, *common, f"train.steps={stopped_at + 2}").succeed()
    assert f"at step {stopped_at}" in resumed
    assert f"step {stopped_at + 2}/{stopped_at + 2} loss" in resumed
    assert latest(run) == stopped_at + 2


# --------------------------------------------------------------------------------------------
# J5


def test_j5_killed_deepspeed_launcher_leaves_no_rank_running_and_every_rank_saved(
    snapshot, image_shards, tmp_path
):
    run = tmp_path / "killed"
    launch = deepspeed_launch(
        LORA,
        *tiny_qwen(snapshot),
        f"data.urls={image_shards}",
        "data.num_workers=0",
        "model.lora.rank=4",
        f"train.output_dir={run}",
        "train.steps=1000",
        "checkpoint.every_steps=1000",
        "logging.every_steps=1",
        "logging.sample_every_steps=0",
    )
    launch.wait_for("step 2/1000 loss")
    ranks = [
        int(pid)
        for pid in subprocess.run(
            ["pgrep", "-f", f"train.output_dir={run}"], capture_output=True, text=True
        ).stdout.split()
        if int(pid) != launch.process.pid
    ]
    launch.process.kill()  # SIGKILL to `deepspeed`: it forwards nothing
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in ranks):
        assert time.monotonic() < deadline, "ranks outlived their launcher"
        time.sleep(0.5)
    stopped_at = latest(run)
    assert 2 <= stopped_at < 1000
    saved = run / "checkpoints" / f"step_{stopped_at:08d}"
    assert len(list(saved.glob("rank_state_*"))) == 2


def _zombie(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rindex(")") + 2] in "ZX"


# --------------------------------------------------------------------------------------------
# J3


def test_j3_full_finetuning_with_ema_exports_that_load(snapshot, image_shards, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    run = tmp_path / "full"
    deepspeed_launch(
        FULL,
        *tiny_qwen(snapshot),
        f"data.urls={image_shards}",
        "data.num_workers=0",
        "method.reference.mode=ema",
        "method.reference.ema_decay=0.5",
        "optimizer.lr=1.0e-3",
        "optimizer.warmup_steps=0",
        "parallel.hierarchical_partition_size=1",
        f"train.output_dir={run}",
        "train.steps=3",
        "logging.every_steps=1",
        "logging.sample_every_steps=0",
    ).succeed()
    base = load_file(snapshot / "transformer" / "diffusion_pytorch_model.safetensors")
    exports = {}
    for name, arguments in {
        "full": ["--dtype", "fp32"],
        "ema": ["--weights", "ema", "--dtype", "fp32"],
    }.items():
        convert(run, tmp_path / f"export_{name}", *arguments)
        # diffusers loads it
        model = QwenImageTransformer2DModel.from_pretrained(tmp_path / f"export_{name}")
        exports[name] = {key: value.detach() for key, value in model.state_dict().items()}
        assert exports[name].keys() == base.keys()
        assert all(torch.isfinite(value).all() for value in exports[name].values())
    weight = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(exports["full"][weight], base[weight])  # trained
    assert not torch.equal(exports["ema"][weight], exports["full"][weight])  # the average
    assert not torch.equal(exports["ema"][weight], base[weight])


# --------------------------------------------------------------------------------------------
# J4


def test_j4_two_nodes_with_torchrun_rendezvous_on_localhost(tmp_path):
    run = tmp_path / "two_nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        Launch(
            [
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                "journey",
                LAUNCHER,
                "--config",
                str(ROOT / "configs" / "toy.yaml"),
                f"train.output_dir={run}",
                "train.steps=4",
                "train.micro_batch_size=16",
                "model.toy.hidden_size=32",
                "checkpoint.every_steps=2",
                "logging.every_steps=2",
                "logging.sample_every_steps=0",
            ]
        )
        for rank in range(2)
    ]
    outputs = [node.succeed() for node in nodes]
    assert "ZeRO-3 on 2 rank(s)" in "".join(outputs)
    assert latest(run) == 4
    assert len(list((run / "checkpoints" / "step_00000004").glob("rank_state_*"))) == 2


# --------------------------------------------------------------------------------------------
# J7


SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def quickstart_inputs(tmp_path_factory) -> list[str]:
    """The quickstart's own staged data and teacher (beside the text encoder, which guidance
    needs for the negative prompt), made small."""
    from apex_tools.quickstart import (
        FIRST_TEACHER,
        Settings,
        compose_snapshot,
        encoded_urls,
        stage_data,
    )

    out = tmp_path_factory.mktemp("quickstart")
    settings = Settings(
        out=out,
        scenes=32,
        shards=1,
        teacher_steps=0,
        teacher_lr=0.0,
        student_steps=2,
        student_lr=0.0,
        micro_batch_size=8,
        per_task=0,
        processes=1,
    )
    stage_data(settings)
    start = compose_snapshot(out / "text_snapshot", FIRST_TEACHER, out / "start")
    return [f"data.urls={json.dumps(encoded_urls(settings))}", f"model.pretrained={start}"]


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_j7_every_shipped_config_trains_two_steps_and_saves(
    path, snapshot, image_shards, request, tmp_path
):
    shipped = load_config(path)
    run = tmp_path / "run"
    overrides = [f"train.output_dir={run}", "train.steps=2", "logging.wandb=disabled"]
    if shipped.model.preset in ("qwen-image-20b", "qwen-image-0.6b"):
        overrides += [*tiny_qwen(snapshot), f"data.urls={image_shards}"]
    elif shipped.data.kind == "webdataset":
        overrides += request.getfixturevalue("quickstart_inputs")
    if shipped.train.micro_batch_size > 8:
        overrides.append("train.micro_batch_size=8")
    if shipped.data.num_workers > 1:  # the worker path with one worker: CI has 2 cores
        overrides.append("data.num_workers=1")
    output = Launch([sys.executable, LAUNCHER, "--config", str(path), *overrides]).succeed()
    assert "step 2/2 loss" in output
    assert latest(run) == 2
