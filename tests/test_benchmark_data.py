"""The compositional benchmark: its six task checks, its held-out split and its determinism."""

import json

import numpy as np
import pytest
import torch

from apex_dist.data.benchmark import (
    TASKS,
    _compositions_of,
    benchmark_spec,
    caption_of,
    check_benchmark_image,
    compositions,
    evaluation_specs,
    is_held_out,
    make_spec,
    render_benchmark,
    score_benchmark,
    write_benchmark_shards,
)
from apex_dist.data.sources import read_shard
from apex_dist.data.synthetic import _seeded

# One correct composition per task, and compositions that the same image must fail, each
# named by what it gets wrong.
CASES = {
    "single_object": (("single_object", "circle"), {"shape": ("single_object", "square")}),
    "two_object": (
        ("two_object", "circle", "square"),
        {"shape": ("two_object", "circle", "triangle")},
    ),
    "counting": (
        ("counting", "triangle", 3),
        {
            "count (fewer)": ("counting", "triangle", 2),
            "count (more)": ("counting", "triangle", 4),
            "shape": ("counting", "square", 3),
        },
    ),
    "colors": (
        ("colors", "red", "square"),
        {"colour": ("colors", "blue", "square"), "shape": ("colors", "red", "circle")},
    ),
    "position": (
        ("position", "circle", "left of", "triangle"),
        {
            "position": ("position", "circle", "right of", "triangle"),
            "shape": ("position", "circle", "left of", "square"),
        },
    ),
    "color_attr": (
        ("color_attr", "red", "circle", "blue", "square"),
        {
            "binding": ("color_attr", "blue", "circle", "red", "square"),
            "colour": ("color_attr", "red", "circle", "green", "square"),
            "shape": ("color_attr", "red", "triangle", "blue", "square"),
        },
    ),
}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("resolution", [32, 64])
def test_each_task_check_passes_on_its_render_and_fails_on_a_wrong_spec(task, resolution):
    right, wrongs = CASES[task]
    for index in range(6):  # several drawn scenes of the same prompt
        spec = make_spec(right, _seeded("test", task, index))
        image = render_benchmark(spec, resolution)
        checks = check_benchmark_image(image, spec)
        assert all(checks.values()), (spec["caption"], checks)
        for what, composition in wrongs.items():
            wrong = make_spec(composition, _seeded("test", "wrong", index))
            assert not all(check_benchmark_image(image, wrong).values()), (
                f"{spec['caption']!r} passed as {wrong['caption']!r} (wrong {what})"
            )


def test_captions_follow_the_templates():
    assert caption_of(("single_object", "circle")) == "a circle"
    assert caption_of(("two_object", "circle", "square")) == "a circle and a square"
    assert caption_of(("counting", "triangle", 4)) == "four triangles"
    assert caption_of(("colors", "red", "square")) == "a red square"
    assert caption_of(("position", "circle", "above", "square")) == "a circle above a square"
    assert (
        caption_of(("color_attr", "red", "circle", "blue", "square"))
        == "a red circle and a blue square"
    )


def test_split_is_a_partition_with_every_task_held_out():
    for task in TASKS:
        train, held_out = set(compositions(task, "train")), set(compositions(task, "held_out"))
        assert train and held_out and not train & held_out
        assert train | held_out == set(_compositions_of(task))
        assert all(is_held_out(item) for item in held_out)
        assert not any(is_held_out(item) for item in train)
    for spec in evaluation_specs("held_out", per_task=4):
        assert is_held_out(spec["composition"])


def test_held_out_compositions_never_reach_the_training_shards(tmp_path):
    summary = write_benchmark_shards(tmp_path / "bench", count=300, resolution=32)
    seen, captions = set(), set()
    for shard in sorted(tmp_path.glob("bench-*.tar")):
        for sample in read_shard(str(shard)):
            spec = json.loads(sample.members["json"])["spec"]
            assert not is_held_out(spec["composition"])
            assert sample.members["txt"].decode() == spec["caption"]
            seen.add(spec["task"])
            captions.add(spec["caption"])
    assert seen == set(TASKS)
    held_out_captions = {
        caption_of(item) for task in TASKS for item in compositions(task, "held_out")
    }
    assert not captions & held_out_captions
    assert summary["samples"] == 300


def test_data_is_deterministic(tmp_path):
    first = [benchmark_spec(index, "train", seed=3) for index in range(20)]
    assert first == [benchmark_spec(index, "train", seed=3) for index in range(20)]
    assert first != [benchmark_spec(index, "train", seed=4) for index in range(20)]
    assert evaluation_specs(per_task=3) == evaluation_specs(per_task=3)
    for name in ("a", "b"):
        write_benchmark_shards(tmp_path / name / "bench", count=40, resolution=32)
    first_bytes = sorted(path.read_bytes() for path in (tmp_path / "a").glob("*.tar"))
    second_bytes = sorted(path.read_bytes() for path in (tmp_path / "b").glob("*.tar"))
    assert first_bytes == second_bytes


def test_scores_per_task_and_overall():
    specs = evaluation_specs("held_out", per_task=4)
    images = np.stack([render_benchmark(spec, 32) for spec in specs])
    perfect = score_benchmark(images, specs)
    assert perfect.overall == 1.0 and set(perfect.per_task) == set(TASKS)
    blank = torch.full((len(specs), 3, 32, 32), 0.75)  # background-grey canvas, no objects
    empty = score_benchmark(blank, specs)
    assert empty.overall == 0.0 and all(value == 0.0 for value in empty.per_task.values())
    with pytest.raises(ValueError, match="one per image"):
        score_benchmark(images[:2], specs)
