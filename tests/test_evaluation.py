"""GenEval-style evaluation: the scoring rules on hand-made detections, the prompt set, the
detector's post-processing, the loaders and evaluator on tiny random snapshots, and apex-eval."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from apex_dist.evaluation.prompts import (
    COCO_CLASSES,
    COLOURS,
    TASKS,
    PromptSpec,
    colour,
    colour_attribution,
    counting,
    generate_prompt_set,
    interleaved_subset,
    plural,
    position,
    read_prompt_set,
    single_object,
    spec_problems,
    specs_by_prompt,
    two_object,
    write_prompt_set,
)
from apex_dist.evaluation.rules import (
    COUNTING_THRESHOLD,
    DETECTION_THRESHOLD,
    MAX_OBJECTS_PER_CLASS,
    Detection,
    relative_position,
    score_image,
    select_detections,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_evaluation import (
    COCO_LABELS,
    TINY_DETECTOR_EDGE,
    write_clip_snapshot,
    write_detector_snapshot,
)


def box(x1, y1, x2, y2):
    return (float(x1), float(y1), float(x2), float(y2))


def detection(name, score=0.95, where=(10, 10, 30, 30)):
    return Detection(name, score, box(*where))


def colours_by_box(table):
    """A colour classifier that answers from a {box: colour} table, recording its calls."""
    calls = []

    def classify(found, name):
        calls.append((name, [item.box for item in found]))
        return [table[item.box] for item in found]

    classify.calls = calls
    return classify


# ---- scoring rules ---------------------------------------------------------------------------


def test_single_object_needs_the_class_above_the_detection_threshold():
    spec = single_object("cat")
    assert score_image(spec, [detection("cat", 0.5)]).correct
    wrong_class = score_image(spec, [detection("dog", 0.99)])
    assert not wrong_class.correct
    assert wrong_class.reasons == ["expected cat >= 1, found 0"]
    below = score_image(spec, [detection("cat", DETECTION_THRESHOLD)])  # not above it
    assert not below.correct


def test_two_objects_need_both_classes():
    spec = two_object("cat", "dog")
    assert score_image(spec, [detection("cat"), detection("dog", where=(50, 10, 70, 30))]).correct
    missing = score_image(spec, [detection("cat"), detection("cat", where=(50, 10, 70, 30))])
    assert not missing.correct
    assert missing.reasons == ["expected dog >= 1, found 0"]


def test_counting_needs_the_exact_count_above_the_counting_threshold():
    spec = counting("cup", 3)
    cups = [detection("cup", 0.95, (index * 20, 0, index * 20 + 10, 10)) for index in range(4)]
    assert score_image(spec, cups[:3]).correct
    too_few = score_image(spec, cups[:2])
    assert not too_few.correct and too_few.reasons == ["expected cup >= 3, found 2"]
    too_many = score_image(spec, cups)
    assert not too_many.correct and too_many.reasons == ["expected cup < 4, found 4"]
    # a fourth cup below the counting threshold does not count (it would in other tasks)
    unsure = Detection("cup", (COUNTING_THRESHOLD + DETECTION_THRESHOLD) / 2, cups[3].box)
    assert score_image(spec, [*cups[:3], unsure]).correct
    assert not score_image(counting("cup", 2), [cups[0], unsure]).correct


def test_colour_is_judged_on_the_most_confident_detections_only():
    spec = colour("car", "red")
    confident = detection("car", 0.9, (0, 0, 10, 10))
    weak = detection("car", 0.5, (20, 0, 30, 10))
    classify = colours_by_box({confident.box: "red", weak.box: "blue"})
    assert score_image(spec, [weak, confident], classify).correct
    assert classify.calls == [("car", [confident.box])]  # count 1: only the best is classified
    wrong = score_image(spec, [confident], colours_by_box({confident.box: "green"}))
    assert not wrong.correct
    assert wrong.reasons == ["expected red car >= 1, found 0 red (1 green)"]
    assert not score_image(spec, [detection("bus")], classify).correct  # wrong class


def test_position_uses_the_relative_position_test():
    spec = position("cat", "left of", "dog")  # the cat is left of the dog
    dog = detection("dog", where=(60, 20, 100, 60))
    left_cat = detection("cat", where=(0, 25, 40, 55))
    right_cat = detection("cat", where=(120, 25, 160, 55))
    assert score_image(spec, [dog, left_cat]).correct
    wrong = score_image(spec, [dog, right_cat])
    assert not wrong.correct
    assert wrong.reasons == ["expected cat left of dog, found right of"]
    # centres 10 px apart but 80 px of summed width: 10 - 0.1 * 80 < 0 -> no relation at all
    overlapping = detection("cat", where=(50, 20, 90, 60))
    assert relative_position(overlapping, dog) == set()
    assert not score_image(spec, [dog, overlapping]).correct
    assert not score_image(spec, [left_cat]).correct  # no dog to be left of


def test_relative_position_axes_and_diagonals():
    target = detection("dog", where=(100, 100, 120, 120))
    assert relative_position(detection("cat", where=(100, 0, 120, 20)), target) == {"above"}
    assert relative_position(detection("cat", where=(100, 200, 120, 220)), target) == {"below"}
    assert relative_position(detection("cat", where=(200, 100, 220, 120)), target) == {"right of"}
    # exactly diagonal: both components are cos 45 (0.707) > 0.5 minus the size reduction
    diagonal = relative_position(detection("cat", where=(0, 0, 20, 20)), target)
    assert diagonal == {"left of", "above"}
    # mostly horizontal: the vertical component is below half of the distance
    assert relative_position(detection("cat", where=(0, 80, 20, 100)), target) == {"left of"}


def test_colour_attribution_binds_each_colour_to_its_object():
    spec = colour_attribution("car", "red", "bus", "blue")
    car, bus = detection("car", where=(0, 0, 10, 10)), detection("bus", where=(20, 0, 30, 10))
    assert score_image(spec, [car, bus], colours_by_box({car.box: "red", bus.box: "blue"})).correct
    swapped = score_image(spec, [car, bus], colours_by_box({car.box: "blue", bus.box: "red"}))
    assert not swapped.correct
    assert len(swapped.reasons) == 2


def test_detections_are_capped_per_class_most_confident_first():
    many = [detection("cup", 0.4 + index * 0.01, (index, 0, index + 1, 1)) for index in range(20)]
    selected = select_detections(many, DETECTION_THRESHOLD)["cup"]
    assert len(selected) == MAX_OBJECTS_PER_CLASS
    assert [item.score for item in selected] == sorted((item.score for item in many), reverse=True)[
        :MAX_OBJECTS_PER_CLASS
    ]


# ---- the prompt set --------------------------------------------------------------------------


def test_prompt_set_counts_templates_and_determinism():
    specs = generate_prompt_set(seed=43, per_task=100)
    counts = Counter(spec.tag for spec in specs)
    assert counts == {"single_object": 80, **dict.fromkeys(TASKS[1:], 100)}
    assert len({spec.prompt for spec in specs}) == len(specs)
    assert all(spec_problems(spec.to_json()) == [] for spec in specs)
    assert generate_prompt_set(seed=43, per_task=100) == specs
    assert generate_prompt_set(seed=44, per_task=100) != specs
    # one task's stream does not depend on the others' counts
    small = generate_prompt_set(seed=43, per_task=5)
    assert [spec for spec in small if spec.tag == "counting"] == [
        spec for spec in specs if spec.tag == "counting"
    ][:5]
    assert {spec.include[0]["class"] for spec in specs if spec.tag == "single_object"} == set(
        COCO_CLASSES
    )
    names = "|".join(re.escape(name) for name in COCO_CLASSES)
    plurals = "|".join(re.escape(plural(name)) for name in COCO_CLASSES)
    colours = "|".join(COLOURS)
    article = "an? "
    patterns = {
        "single_object": rf"a photo of {article}({names})",
        "two_object": rf"a photo of {article}({names}) and {article}({names})",
        "counting": rf"a photo of (two|three|four) ({plurals})",
        "colors": rf"a photo of {article}({colours}) ({names})",
        "position": rf"a photo of {article}({names}) (left of|right of|above|below) "
        rf"{article}({names})",
        "color_attr": rf"a photo of {article}({colours}) ({names}) and {article}({colours}) "
        rf"({names})",
    }
    for spec in specs:
        assert re.fullmatch(patterns[spec.tag], spec.prompt), spec.prompt
        classes = [clause["class"] for clause in spec.include]
        if spec.tag in ("two_object", "position", "color_attr"):
            assert classes[0] != classes[1]
        if spec.tag == "counting":
            count = spec.include[0]["count"]
            assert 2 <= count <= 4 and spec.exclude[0]["count"] == count + 1
        if spec.tag in ("colors", "color_attr"):
            assert "person" not in classes
        if spec.tag == "color_attr":
            assert spec.include[0]["color"] != spec.include[1]["color"]
        if spec.tag == "position":  # "a photo of a <clause 1> <relation> a <clause 0>"
            relation, group = spec.include[1]["position"]
            assert group == 0
            assert spec.prompt.startswith(
                f"a photo of a{'n' * (classes[1][0] in 'aeiou')} {classes[1]} {relation} "
            )
            assert spec.prompt.endswith(f" {classes[0]}")


def test_english_of_the_templates():
    assert counting("knife", 3).prompt == "a photo of three knives"
    assert counting("person", 2).prompt == "a photo of two people"
    assert counting("bus", 4).prompt == "a photo of four buses"
    assert colour("apple", "orange").prompt == "a photo of an orange apple"
    assert position("cat", "above", "elephant").prompt == "a photo of a cat above an elephant"
    assert position("cat", "above", "elephant").include == (
        {"class": "elephant", "count": 1},
        {"class": "cat", "count": 1, "position": ["above", 0]},
    )


def test_prompt_files_round_trip_and_read_genevals_layout(tmp_path):
    specs = generate_prompt_set(per_task=3)
    write_prompt_set(specs, tmp_path / "prompts.jsonl")
    assert read_prompt_set(tmp_path / "prompts.jsonl") == specs
    geneval_line = (
        '{"tag": "position", "include": [{"class": "bench", "count": 1}, {"class": "cow", '
        '"count": 1, "position": ["left of", 0]}], "prompt": "a photo of a cow left of a bench"}'
    )
    (tmp_path / "geneval.jsonl").write_text(geneval_line + "\n")
    (spec,) = read_prompt_set(tmp_path / "geneval.jsonl")
    assert spec == position("cow", "left of", "bench")
    (tmp_path / "bad.jsonl").write_text('{"tag": "counting", "prompt": "x", "include": []}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*include must be a non-empty list"):
        read_prompt_set(tmp_path / "bad.jsonl")
    assert spec_problems(
        {"tag": "colors", "prompt": "p", "include": [{"class": "cat", "count": 1, "color": "teal"}]}
    ) == ["include[0].color 'teal' is not one of " + str(list(COLOURS))]


def test_interleaved_subset_covers_every_task_and_prompts_map_to_specs():
    specs = generate_prompt_set()
    subset = interleaved_subset(specs, 12)
    assert Counter(spec.tag for spec in subset) == dict.fromkeys(TASKS, 2)
    assert [spec.tag for spec in subset[:6]] == list(TASKS)
    everything = interleaved_subset(specs, 10_000)
    assert len(everything) == len(specs) and {spec.key() for spec in everything} == {
        spec.key() for spec in specs
    }
    table = specs_by_prompt(specs)
    assert all(table[spec.prompt] == spec for spec in specs)
    clash = PromptSpec("single_object", "a photo of a cat", ({"class": "dog", "count": 1},))
    with pytest.raises(ValueError, match="appears twice with different metadata"):
        specs_by_prompt([single_object("cat"), clash])


# ---- the detector's post-processing (no model) -----------------------------------------------


def test_instances_follow_the_mask_from_padded_input_to_the_original_image():
    """One confident 'cat' query whose mask logits are positive on a block: the box and score
    come back in original-image pixels after the pad crop and the resize."""
    from apex_dist.evaluation.detector import InstanceDetector, class_names_of

    names = class_names_of(dict(enumerate(COCO_LABELS)), "test")
    assert names[COCO_LABELS.index("mouse")] == "computer mouse"
    detector = InstanceDetector(None, None, names)
    queries, classes = 3, len(COCO_LABELS)
    class_logits = torch.full((queries, classes + 1), -20.0)
    class_logits[0, COCO_LABELS.index("cat")] = 20.0  # query 0: a cat, probability ~1
    class_logits[1, -1] = 20.0  # query 1: no object
    class_logits[2, COCO_LABELS.index("dog")] = 0.0  # query 2: a dog at probability ~1 / 81
    mask_logits = torch.full((queries, 16, 16), -30.0)
    mask_logits[0, 2:6, 4:10] = 30.0  # quarter of the 64x64 padded input
    # the image was 24 x 32 (H x W), resized x2 to 48 x 64 and padded to 64 x 64
    found = detector._instances(class_logits, mask_logits, (64, 64), (48, 64), (24, 32), 0.3)
    assert [item.class_name for item in found] == ["cat"]
    (cat,) = found
    assert cat.score == pytest.approx(1.0, abs=1e-3)
    assert cat.mask.shape == (24, 32)
    x1, y1, x2, y2 = cat.box
    # block rows 2..6, columns 4..10 of the quarter grid = rows 4..12, columns 8..20 here
    assert abs(x1 - 8) <= 1 and abs(x2 - 20) <= 1 and abs(y1 - 4) <= 1 and abs(y2 - 12) <= 1


def test_a_detector_without_the_coco_classes_is_refused():
    from apex_dist.evaluation.detector import class_names_of

    with pytest.raises(ValueError, match="does not predict 3 of the 80 COCO classes"):
        class_names_of(dict(enumerate(COCO_LABELS[:77])), "/models/x")


# ---- tiny snapshots end to end ---------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """A tiny detector that sees cups everywhere (scores 0.5-0.75) and a tiny CLIP."""
    from transformers import Mask2FormerForUniversalSegmentation

    root = tmp_path_factory.mktemp("snapshots")
    detector_path = write_detector_snapshot(root / "detector")
    model = Mask2FormerForUniversalSegmentation.from_pretrained(detector_path)
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.fill_(-10.0)
        model.class_predictor.bias[COCO_LABELS.index("cup")] = 10.0
    model.save_pretrained(detector_path)
    write_detector_snapshot(root / "voc_detector", labels=("aeroplane", "bicycle", "bird"))
    return {"detector": detector_path, "clip": write_clip_snapshot(root / "clip"), "root": root}


def test_loaders_refuse_missing_or_wrong_snapshots(snapshots, tmp_path):
    from apex_dist.evaluation.clip import ClipModel
    from apex_dist.evaluation.detector import InstanceDetector

    with pytest.raises(FileNotFoundError, match="is not a folder.*mask2former-swin-small"):
        InstanceDetector.from_snapshot(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds a 'clip' model, not one of \\['mask2former'\\]"):
        InstanceDetector.from_snapshot(snapshots["clip"])
    with pytest.raises(ValueError, match="does not predict 78 of the 80 COCO classes"):
        InstanceDetector.from_snapshot(snapshots["root"] / "voc_detector")
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(FileNotFoundError, match="has no weights"):
        ClipModel.from_snapshot(tmp_path)


def evaluator_of(snapshots):
    from apex_dist.evaluation.evaluator import Evaluator

    return Evaluator.from_snapshots(
        snapshots["clip"],
        snapshots["detector"],
        shortest_edge=TINY_DETECTOR_EDGE,
        longest_edge=TINY_DETECTOR_EDGE * 2,
    )


def noise_image(seed, size=(40, 48)):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_evaluator_end_to_end_on_tiny_snapshots(snapshots):
    from apex_dist.evaluation.evaluator import markdown_table, summarize

    evaluator = evaluator_of(snapshots)
    specs = [single_object("cup"), single_object("dog"), counting("cup", 2), colour("cup", "red")]
    images = [noise_image(index) for index in range(len(specs))]
    results = evaluator.evaluate(images, [spec.prompt for spec in specs], specs)
    cup, dog, two_cups, red_cup = results
    assert cup.correct and cup.detections["cup"]
    assert all(DETECTION_THRESHOLD < item[4] < COUNTING_THRESHOLD for item in cup.detections["cup"])
    assert not dog.correct and dog.reasons == ["expected dog >= 1, found 0"]
    assert not two_cups.correct and two_cups.reasons == ["expected cup >= 2, found 0"]
    assert red_cup.correct or re.fullmatch(
        r"expected red cup >= 1, found 0 red \(1 \w+\)", red_cup.reasons[0]
    )
    assert all(0.0 <= result.clip_score <= 100.0 for result in results)
    unscored = evaluator.evaluate([images[0]], ["a painting"], [None])[0]
    assert unscored.correct is None and unscored.tag == "other"
    summary = summarize([*results, unscored])
    assert summary["tasks"]["single_object"] == {
        "images": 2,
        "correct": 1,
        "score": 0.5,
        "clip_score": pytest.approx((cup.clip_score + dog.clip_score) / 2),
    }
    assert summary["geneval"] == pytest.approx(
        (0.5 + 0.0 + summary["tasks"]["colors"]["score"]) / 3
    )
    assert not summary["complete"]
    table = markdown_table(summary)
    assert "| Single object | 2 | 1 | 0.500 |" in table and "not all six tasks" in table


# ---- apex-eval -------------------------------------------------------------------------------


def run_tool(arguments, capsys):
    from apex_tools import eval as eval_tool

    code = eval_tool.main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tool_writes_the_prompt_set(tmp_path, capsys):
    code, out, _ = run_tool(["prompts", tmp_path / "p.jsonl", "--per-task", "4"], capsys)
    assert code == 0 and "wrote 24 prompts" in out
    assert read_prompt_set(tmp_path / "p.jsonl") == generate_prompt_set(per_task=4)


def model_options(snapshots):
    return [
        "--clip",
        snapshots["clip"],
        "--detector",
        snapshots["detector"],
        "--detector-input",
        TINY_DETECTOR_EDGE,
        TINY_DETECTOR_EDGE * 2,
        "--quiet",
    ]


def test_tool_scores_a_folder_from_metadata_or_png_chunks(snapshots, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    for index, prompt in enumerate(["a photo of a cup", "a photo of a dog", "a cat in space"]):
        noise_image(index).save(folder / f"{index}.png")
        lines.append(json.dumps({"file": f"{index}.png", "prompt": prompt, "seed": index}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run_tool(["score", folder, *model_options(snapshots)], capsys)
    assert code == 0, err
    report = json.loads((folder / "evaluation" / "results.json").read_text())
    # metadata from the default prompt set (every class has a single_object prompt there)
    verdicts = [(image["tag"], image["correct"], image["seed"]) for image in report["images"]]
    assert verdicts == [("single_object", True, 0), ("single_object", False, 1), ("other", None, 2)]
    assert report["settings"]["rules"]["counting_threshold"] == COUNTING_THRESHOLD
    assert report["summary"]["images"] == 3 and "images/s" in out
    assert (folder / "evaluation" / "results.md").read_text().startswith("| task |")
    # the same images with the prompt in PNG chunks, scored against an explicit prompt file
    chunked = tmp_path / "chunked"
    chunked.mkdir()
    from apex_dist.evaluation.images import ImageRecord, save_png

    for index, prompt in enumerate(["a photo of a cup", "a photo of a dog"]):
        save_png(
            noise_image(index), chunked / f"{index}.png", ImageRecord(Path(), prompt, seed=index)
        )
    prompts = tmp_path / "prompts.jsonl"
    write_prompt_set([single_object("cup"), single_object("dog")], prompts)
    code, _, err = run_tool(
        [
            "score",
            chunked,
            "--prompts",
            prompts,
            "--out",
            tmp_path / "report",
            *model_options(snapshots),
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [(image["correct"], image["seed"]) for image in report["images"]] == [
        (True, 0),
        (False, 1),
    ]
    Image.new("RGB", (8, 8)).save(chunked / "2.png")  # no prompt chunk
    code, _, err = run_tool(["score", chunked, *model_options(snapshots)], capsys)
    assert code == 1 and "2.png has no 'prompt' text chunk" in err


class StubGenerator:
    """Solid images whose grey level encodes the seed; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, seeds):
        self.calls.append((list(prompts), list(seeds)))
        return [Image.new("RGB", (40, 48), (seed % 256,) * 3) for seed in seeds]


def test_tool_generates_through_the_generator_interface_then_scores(
    snapshots, tmp_path, capsys, monkeypatch
):
    from apex_tools import eval as eval_tool

    stub = StubGenerator()
    received = []

    def build(arguments):
        received.append(arguments)
        return stub

    monkeypatch.setattr(eval_tool, "build_generator", build)
    prompts = tmp_path / "prompts.jsonl"
    specs = [single_object("cup"), counting("cup", 2), single_object("dog")]
    write_prompt_set(specs, prompts)
    out = tmp_path / "run"
    command = ["generate", "--out", out, "--prompts", prompts, "--images-per-prompt", "2"]
    command += ["--image-seed", "100", "--batch-size", "4", *model_options(snapshots)]
    command += ["--", "--source", "runs/student", "--nfe", "1"]
    code, _, err = run_tool(command, capsys)
    assert code == 0, err
    assert received == [["--source", "runs/student", "--nfe", "1"]]
    # 6 images in batches of 4 then 2, each with its own seed
    assert [seeds for _, seeds in stub.calls] == [[100, 101, 102, 103], [104, 105]]
    assert stub.calls[0][0] == [specs[0].prompt] * 2 + [specs[1].prompt] * 2
    with Image.open(out / "images" / "00001_1.png") as image:
        assert image.text["prompt"] == "a photo of two cups" and image.text["seed"] == "103"
        assert json.loads(image.text["evaluation"]) == specs[1].to_json()
        assert image.getpixel((0, 0)) == (103, 103, 103)
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(line["file"], line["seed"], line["tag"]) for line in lines][:2] == [
        ("images/00000_0.png", 100, "single_object"),
        ("images/00000_1.png", 101, "single_object"),
    ]
    report = json.loads((out / "results.json").read_text())
    verdicts = [image["correct"] for image in report["images"]]
    assert verdicts == [True, True, False, False, False, False]
    assert "| Single object | 4 | 2 | 0.500 |" in (out / "results.md").read_text()
    # an interrupted run continues: only the missing image is generated again
    (out / "images" / "00002_1.png").unlink()
    code, _, err = run_tool(command, capsys)
    assert code == 0, err
    assert [seeds for _, seeds in stub.calls][2:] == [[105]]


def test_generate_mode_without_the_generate_api_says_what_to_do(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def refuse_generate(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
        if name == "apex_dist" and fromlist and "generate" in fromlist:
            raise ImportError("cannot import name 'generate' from 'apex_dist'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", refuse_generate)
    code, _, err = run_tool(
        ["generate", "--out", tmp_path, "--clip", tmp_path, "--per-task", "1", "--", "--nfe", "1"],
        capsys,
    )
    assert code == 1
    assert "needs apex_dist.generate" in err and "apex-eval score" in err
