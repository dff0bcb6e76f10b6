"""Streamed loading of Qwen-Image transformer snapshots (tiny preset, fp32, CPU).

Snapshots are written in-process by diffusers' `QwenImageTransformer2DModel.save_pretrained`
(sharded with a small `max_shard_size`, and as one file), then loaded by
`apex_dist.models.loading`; the ZeRO-3 path runs in 2 spawned gloo ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file

from apex_dist.config import LoraConfig
from apex_dist.models import loading
from apex_dist.models.loading import (
    CheckpointError,
    CheckpointMismatchError,
    build_transformer,
    load_pretrained_transformer,
    load_transformer_weights,
    read_transformer_config,
)
from apex_dist.models.lora import BASE_TARGET_TIME_EMBEDDING, apply_lora, lora_state_dict
from apex_dist.models.qwen_image import QWEN_IMAGE_PRESETS, QwenImageTransformer

TINY = QWEN_IMAGE_PRESETS["qwen-image-tiny"]
# Shard size that splits the tiny model (about 360 kB in fp32) into several files.
SHARD_SIZE = "100KB"
# Standard deviation of the noise added to every parameter, so norm gains and biases differ.
WEIGHT_PERTURBATION = 0.1
# Largest |ours - diffusers| accepted for the forward pass in fp32 (the model's parity bound).
PARITY_TOLERANCE = 1e-5
TEXT_TOKENS = 5
IMAGE_SHAPE = (1, 2, 3)


@pytest.fixture(scope="module")
def reference() -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * WEIGHT_PERTURBATION)
    return model


@pytest.fixture(scope="module")
def sharded_snapshot(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    reference.save_pretrained(root / "transformer", max_shard_size=SHARD_SIZE)
    return root


@pytest.fixture(scope="module")
def single_file_snapshot(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    reference.save_pretrained(root / "transformer")
    return root


@pytest.fixture
def snapshot_copy(sharded_snapshot, tmp_path):
    """A writable copy of the sharded snapshot."""
    shutil.copytree(sharded_snapshot, tmp_path / "snapshot")
    return tmp_path / "snapshot"


def make_inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    return {
        "x_t": torch.randn(batch, tokens, TINY["in_channels"], generator=generator),
        "t": torch.rand(batch, generator=generator),
        "text": torch.randn(batch, TEXT_TOKENS, TINY["joint_attention_dim"], generator=generator),
        "text_mask": torch.ones(batch, TEXT_TOKENS, dtype=torch.bool),
    }


def run_ours(model, inputs):
    t = inputs["t"]
    return model(
        inputs["x_t"], t, t, inputs["text"], inputs["text_mask"], None, image_shape=IMAGE_SHAPE
    )


def run_diffusers(model, inputs):
    return model(
        hidden_states=inputs["x_t"],
        encoder_hidden_states=inputs["text"],
        encoder_hidden_states_mask=inputs["text_mask"],
        timestep=inputs["t"],
        img_shapes=[IMAGE_SHAPE] * inputs["x_t"].shape[0],
        return_dict=False,
    )[0]


def assert_equals_reference(model, reference, dtype=torch.float32):
    expected = reference.state_dict()
    ours = model.state_dict()
    for key, value in expected.items():
        assert ours[key].dtype == dtype, key
        assert torch.equal(ours[key], value.to(dtype)), key
    for suffix in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
        assert torch.equal(
            ours[f"time_text_embed_2.timestep_embedder.{suffix}"],
            ours[f"time_text_embed.timestep_embedder.{suffix}"],
        )


class RecordingSafeOpen:
    """Stands in for `safe_open` in the loader: records each `get_tensor` call and, at each
    call, how many tensors returned by earlier calls are still alive (a loader that collects
    a state dict keeps all of them)."""

    def __init__(self, original):
        self.original = original
        self.keys_read: list[str] = []
        self.alive_at_call: list[int] = []
        self.references: list[weakref.ref] = []

    def __call__(self, *args, **named):
        return RecordingHandle(self, self.original(*args, **named))


class RecordingHandle:
    """One open file of `RecordingSafeOpen`."""

    def __init__(self, recorder: RecordingSafeOpen, handle):
        self.recorder, self.handle = recorder, handle

    def __enter__(self):
        self.inner = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def get_slice(self, key):
        return self.inner.get_slice(key)

    def get_tensor(self, key):
        recorder = self.recorder
        recorder.alive_at_call.append(sum(ref() is not None for ref in recorder.references))
        recorder.keys_read.append(key)
        tensor = self.inner.get_tensor(key)
        recorder.references.append(weakref.ref(tensor))
        return tensor


@pytest.fixture
def recorder(monkeypatch) -> RecordingSafeOpen:
    recording = RecordingSafeOpen(loading.safe_open)
    monkeypatch.setattr(loading, "safe_open", recording)
    return recording


# --------------------------------------------------------------------------------------------
# loading that works


def test_sharded_snapshot_loads_exactly_and_gives_diffusers_output(reference, sharded_snapshot):
    shards = sorted((sharded_snapshot / "transformer").glob("*.safetensors"))
    assert len(shards) > 1, "the test snapshot must be sharded"
    model = load_pretrained_transformer(sharded_snapshot, "fp32").eval()
    assert all(tensor.device.type == "cpu" for tensor in model.state_dict().values())
    assert_equals_reference(model, reference)
    assert model.condition_shift.scale.item() == -0.5 and model.condition_shift.bias.item() == 1
    inputs = make_inputs()
    with torch.no_grad():
        difference = (run_ours(model, inputs) - run_diffusers(reference, inputs)).abs().max()
    assert difference <= PARITY_TOLERANCE


def test_single_file_snapshot_loads_from_the_transformer_folder(reference, single_file_snapshot):
    folder = single_file_snapshot / "transformer"
    assert [path.name for path in folder.glob("*.safetensors")] == [loading.SINGLE_WEIGHTS_FILE]
    assert read_transformer_config(folder)["num_layers"] == TINY["num_layers"]
    model = load_pretrained_transformer(folder, "fp32", shift_scale=-1.0, shift_bias=0.0)
    assert_equals_reference(model, reference)
    assert model.condition_shift.scale.item() == -1.0 and model.condition_shift.bias.item() == 0


def test_loading_into_an_allocated_model_fills_the_same_parameters(reference, sharded_snapshot):
    model = build_transformer("qwen-image-tiny", device="cpu")
    before = dict(model.named_parameters())
    missing = load_transformer_weights(model, sharded_snapshot, "fp32")
    assert all(model.get_parameter(name) is parameter for name, parameter in before.items())
    assert sorted(missing) == sorted(
        key for key in model.state_dict() if key.startswith(("time_text_embed_2.", "condition"))
    )
    assert_equals_reference(model, reference)


def test_apex_checkpoint_keeps_its_own_second_time_embedding(reference, snapshot_copy):
    """A checkpoint that has E2 (an apex_dist export) loads it instead of copying E1."""
    shard = sorted((snapshot_copy / "transformer").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    source = QwenImageTransformer(**TINY)
    extra = {
        key: torch.full_like(value, 0.25)
        for key, value in source.state_dict().items()
        if key.startswith("time_text_embed_2.")
    }
    save_file({**tensors, **extra}, shard)
    model = load_pretrained_transformer(snapshot_copy, "fp32")
    for key in extra:
        assert torch.equal(model.state_dict()[key], extra[key]), key


@pytest.mark.parametrize("learnable", [False, True])
def test_a_snapshot_condition_shift_is_compared_with_the_config_never_applied(
    snapshot_copy, caplog, learnable
):
    """The config is the one source of the shift: a snapshot storing other values (an apex_dist
    export) is reported by a warning naming both, and the model keeps the config's."""

    def add_shift(tensors):
        tensors["condition_shift.scale"] = torch.tensor(-1.0)
        tensors["condition_shift.bias"] = torch.tensor(0.25)
        return tensors

    edit_first_shard(snapshot_copy, add_shift)
    with caplog.at_level("WARNING", logger="apex_dist"):
        model = load_pretrained_transformer(snapshot_copy, "fp32", shift_learnable=learnable)
    assert model.condition_shift.scale.item() == -0.5 and model.condition_shift.bias.item() == 1
    warnings = [record.getMessage() for record in caplog.records]
    assert any(
        "condition_shift.scale = -1.0" in message
        and "method.condition_shift.scale = -0.5" in message
        for message in warnings
    ), warnings
    assert any("condition_shift.bias = 0.25" in message for message in warnings), warnings
    caplog.clear()
    with caplog.at_level("WARNING", logger="apex_dist"):
        agreeing = load_pretrained_transformer(
            snapshot_copy, "fp32", shift_scale=-1.0, shift_bias=0.25, shift_learnable=learnable
        )
    assert agreeing.condition_shift.scale.item() == -1.0
    assert not [record for record in caplog.records if "condition_shift" in record.getMessage()]


@pytest.mark.parametrize("build_on", ["meta", "cpu"])
def test_bf16_load_casts_every_tensor(reference, sharded_snapshot, build_on):
    model = build_transformer(sharded_snapshot, device=build_on)
    load_transformer_weights(model, sharded_snapshot, "bf16")
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.bfloat16}
    assert_equals_reference(model, reference, dtype=torch.bfloat16)
    inputs = {
        key: value.to(torch.bfloat16) if value.is_floating_point() else value
        for key, value in make_inputs().items()
    }
    with torch.no_grad():
        assert torch.isfinite(run_ours(model, inputs)).all()


@pytest.mark.parametrize("build_on", ["meta", "cpu"])
def test_tensors_are_streamed_one_at_a_time(
    reference, sharded_snapshot, monkeypatch, recorder, build_on
):
    def refuse(*args, **named):
        raise AssertionError("the loader must not read a whole file into a state dict")

    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    monkeypatch.setattr("safetensors.torch.load", refuse)
    model = build_transformer("qwen-image-tiny", device=build_on)
    load_transformer_weights(model, sharded_snapshot, "fp32")
    assert sorted(recorder.keys_read) == sorted(reference.state_dict())  # each once
    # a tensor read earlier is never kept alive while the next one is read
    assert max(recorder.alive_at_call) == 0
    assert_equals_reference(model, reference)


# --------------------------------------------------------------------------------------------
# errors before anything large is read or allocated


def edit_first_shard(snapshot, edit):
    """Apply `edit(tensors) -> tensors` to the first shard and keep the index consistent."""
    folder = snapshot / "transformer"
    shard = sorted(folder.glob("*.safetensors"))[0]
    tensors = edit(load_file(shard))
    save_file(tensors, shard)
    index_path = folder / loading.WEIGHTS_INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"] = {
        key: name for key, name in index["weight_map"].items() if name != shard.name
    }
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    index_path.write_text(json.dumps(index))
    return tensors


def test_mismatch_error_names_every_key_and_both_shapes(snapshot_copy, recorder):
    removed, reshaped = {}, {}

    def edit(tensors):
        names = sorted(tensors)
        removed["name"] = names[0]
        reshaped["name"] = names[1]
        reshaped["shape"] = list(tensors[names[1]].shape)
        del tensors[names[0]]
        tensors[names[1]] = torch.zeros(3, 7)
        tensors["transformer_blocks.0.attn.not_a_layer.weight"] = torch.zeros(2)
        tensors["pos_embed.weight"] = torch.zeros(2)
        return tensors

    edit_first_shard(snapshot_copy, edit)
    model = build_transformer("qwen-image-tiny")  # meta: nothing allocated
    with pytest.raises(CheckpointMismatchError) as caught:
        load_transformer_weights(model, snapshot_copy, "fp32")
    message = str(caught.value)
    assert removed["name"] in message and "1 missing key" in message
    assert "transformer_blocks.0.attn.not_a_layer.weight" in message
    assert "pos_embed.weight" in message and "2 unexpected key" in message
    assert f"{reshaped['name']}: checkpoint [3, 7], model {reshaped['shape']}" in message
    assert caught.value.missing == [removed["name"]]
    assert recorder.keys_read == []  # raised from the headers, before any tensor was read
    assert all(parameter.device.type == "meta" for parameter in model.parameters())


def test_wrong_architecture_is_refused(snapshot_copy):
    config_path = snapshot_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "FluxTransformer2DModel"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong architecture.*FluxTransformer2DModel"):
        load_pretrained_transformer(snapshot_copy)


def test_unknown_config_key_is_refused(snapshot_copy):
    config_path = snapshot_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["attention_heads_total"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown key 'attention_heads_total'"):
        build_transformer(snapshot_copy)


def test_missing_directories_and_files_are_named(snapshot_copy, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained_transformer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no transformer/config.json"):
        load_pretrained_transformer(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="neither a Qwen-Image preset"):
        build_transformer("qwen-image-7b")

    folder = snapshot_copy / "transformer"
    shards = sorted(folder.glob("*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"missing .*{shards[-1].name}"):
        load_pretrained_transformer(snapshot_copy)
    (folder / loading.WEIGHTS_INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match="no transformer weights"):
        load_pretrained_transformer(snapshot_copy)


def test_a_corrupt_safetensors_header_is_refused_naming_file_and_tensor(snapshot_copy, recorder):
    from corrupt_safetensors import overlap_last_two

    shard = sorted((snapshot_copy / "transformer").glob("*.safetensors"))[1]
    data, overlapping = overlap_last_two(shard.read_bytes())
    shard.write_bytes(data)
    model = build_transformer("qwen-image-tiny")
    with pytest.raises(CheckpointError, match=f"{shard}: tensor '{overlapping}'.*overlaps"):
        load_transformer_weights(model, snapshot_copy, "fp32")
    assert recorder.keys_read == []  # refused from the headers, before any tensor was read
    shard.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        load_pretrained_transformer(snapshot_copy)


def test_unknown_or_unusable_dtype_fails_before_reading(sharded_snapshot, monkeypatch, recorder):
    with pytest.raises(CheckpointError, match="dtype 'fp8' is not supported"):
        load_pretrained_transformer(sharded_snapshot, "fp8")

    def no_half_precision(dtype, device):
        raise RuntimeError(f'"addmm_impl" not implemented for {dtype}')

    monkeypatch.setattr(loading, "_run_matmul", no_half_precision)
    model = build_transformer("qwen-image-tiny", device="cpu")
    with pytest.raises(CheckpointError, match="cannot run on device cpu.*not implemented"):
        load_transformer_weights(model, sharded_snapshot, "fp16")
    assert recorder.keys_read == []
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_loading_after_lora_is_refused(sharded_snapshot):
    model = build_transformer("qwen-image-tiny", device="cpu")
    apply_lora(model, LoraConfig(enabled=True, rank=2))
    with pytest.raises(CheckpointError, match="load the base weights first"):
        load_transformer_weights(model, sharded_snapshot, "fp32")


# --------------------------------------------------------------------------------------------
# ZeRO-3: 2 gloo ranks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def zero3_worker(rank: int, world_size: int, port: int, snapshot: str, result_dir: str):
    os.environ.update(
        {
            "DS_ACCELERATOR": "cpu",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
        }
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    import deepspeed

    from apex_dist.distributed import zero_loading

    recorder = RecordingSafeOpen(loading.safe_open)
    loading.safe_open = recorder
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    model = zero_loading.load_pretrained_transformer_zero3(snapshot, "fp32", config)
    loading.safe_open = recorder.original

    expected = {}
    for path in sorted((Path(snapshot) / "transformer").glob("*.safetensors")):
        expected.update(load_file(path))
    base_parameters = len(dict(model.named_parameters()))
    partitioned = [name for name, p in model.named_parameters() if hasattr(p, "ds_id")]
    local_elements = sum(p.ds_tensor.numel() for p in model.parameters())
    full_elements = sum(p.ds_numel for p in model.parameters())
    mismatched = []
    for name, parameter in model.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            value = parameter.data.clone()
        wanted = expected.get(
            name, expected.get(name.replace("time_text_embed_2", "time_text_embed"))
        )
        if not torch.equal(value, wanted):
            mismatched.append(name)
    # LoRA on the partitioned model: E2's frozen copy and the saved E2 are gathered values
    counts = apply_lora(
        model, LoraConfig(enabled=True, rank=2), parameter_context=zero_loading.zero3_read_context
    )
    saved = lora_state_dict(model, parameter_context=zero_loading.zero3_read_context)
    base_copy = model.get_submodule(BASE_TARGET_TIME_EMBEDDING)
    first_layer = "time_text_embed.timestep_embedder.linear_1"
    lora_problems = [
        problem
        for problem, failed in (
            (
                "frozen E2 copy",
                not torch.equal(base_copy.weight_1, expected[f"{first_layer}.weight"]),
            ),
            (
                "saved E2",
                not torch.equal(
                    saved["time_text_embed_2.timestep_embedder.linear_1.weight"],
                    expected[f"{first_layer}.weight"],
                ),
            ),
            ("saved adapter count", sum(t.numel() for t in saved.values()) != counts["trainable"]),
        )
        if failed
    ]
    summary = {
        "lora_problems": lora_problems,
        "reads": len(recorder.keys_read),
        "parameters": base_parameters,
        "partitioned": len(partitioned),
        "local_elements": local_elements,
        "full_elements": full_elements,
        "mismatched": mismatched,
    }
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(summary, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_zero3_partitioned_model_loads_on_two_ranks(reference, sharded_snapshot, tmp_path):
    torch.multiprocessing.spawn(
        zero3_worker,
        args=(2, free_port(), str(sharded_snapshot), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["mismatched"] == []
        assert result["lora_problems"] == []
        assert result["partitioned"] == result["parameters"]  # every parameter partitioned
        assert result["local_elements"] < result["full_elements"] * 0.6  # about half per rank
    assert results[0]["reads"] == len(reference.state_dict())  # rank 0 reads every tensor
    assert results[1]["reads"] == 0  # rank 1 reads no tensor data
