"""The toy experiment, shortened: distilled students must clearly beat the teacher's 1 step."""

import json

import pytest
import torch
import yaml

from apex_tools import toy_experiment as toy


def test_true_samples_stay_in_their_class_region_and_score_near_zero():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(toy.NUM_CLASSES).repeat_interleave(500)
    first = toy.sample_data(labels, generator)
    second = toy.sample_data(labels, generator)
    scores = toy.evaluate(first, labels, second, generator)
    assert scores["in_region"] == 1.0
    assert scores["distance"] < 0.05
    collapsed = toy.class_centers()[labels]  # every sample at its class mean
    assert toy.evaluate(collapsed, labels, second, generator)["distance"] > 0.3


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    students = ["apex_v0"]
    toy.main(
        ["--quick", "--seeds", "1", "--workers", "1", "--out", str(out), "--students", *students]
    )
    return json.loads((out / "results.json").read_text()), (out / "table.md").read_text(), out


def test_students_at_one_step_clearly_beat_the_teacher_at_one_step(quick_run):
    results, table, _ = quick_run
    summary = results["summary"]
    teacher_one_step = summary["teacher 1 step"]["distance"][0]
    teacher_fifty_steps = summary["teacher 50 steps"]["distance"][0]
    assert teacher_fifty_steps < teacher_one_step
    for student in ("apex_v0",):
        distance = summary[f"{student} 1 NFE"]["distance"][0]
        assert distance < 0.75 * teacher_one_step, (student, distance, teacher_one_step)
        assert summary[f"{student} 1 NFE"]["in_region"][0] > 0.95
    assert "| apex_v0 1 NFE |" in table


def test_unknown_student_is_refused():
    with pytest.raises(SystemExit):
        toy.main(["--students", "apex_v9"])


def test_every_run_is_a_trainer_run_of_the_toy_stream(quick_run):
    """Teacher and student ran through apex_dist's Trainer: each has its run directory with
    the resolved config (the toy stream, the student's objective) and its final checkpoint."""
    _, _, out = quick_run
    for name, objective in (("teacher", "fm"), ("apex_v0", "apex_v0")):
        run = out / "runs" / "seed0" / name
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["data"]["kind"] == "toy" and config["method"]["objective"] == objective
        assert (run / "checkpoints" / "latest").is_file()
