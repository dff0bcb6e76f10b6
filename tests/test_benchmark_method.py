"""tools/benchmark_method.py at a trivially small size: every stage runs and writes its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from apex_tools import benchmark_method as bench
from apex_tools import quickstart

ROOT = Path(__file__).resolve().parents[1]
# The whole pipeline at a size that decides nothing: a 2-step teacher, one 2-step student of
# each kind asked for, one prompt per task, 2-step teacher sampling.
TINY_RUN = """
import dataclasses, sys
from pathlib import Path
from apex_tools import benchmark_method as bench
settings = dataclasses.replace(
    bench.QUICK, scenes=32, shards=1, teacher_steps=2, student_steps=2, sweep_steps=1,
    micro_batch_size=4, seeds=1, per_task=1, curve_every=1, guidance_scales=(1.0, 2.0),
    sweep=("l2, dm 0.125, w 0",), teacher_sampling_steps=2, teacher_curve_every=1,
)
bench.start_process_group(1)
variants = ["fm", "apex_v0 tuned", "apex paper_form", "apex generator-reading"]
bench.run(
    Path(sys.argv[1]), settings, variants, Path(sys.argv[2]), "tiny", train_teacher=True,
    export_teacher_to=Path(sys.argv[3]),
)
"""


def test_tiny_benchmark_trains_changes_weights_writes_the_report_and_resumes(tmp_path):
    out, report = tmp_path / "bench", tmp_path / "results.md"
    exported = tmp_path / "teacher_export"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run_tiny_benchmark():
        subprocess.run(
            [sys.executable, "-c", TINY_RUN, str(out), str(report), str(exported)],
            cwd=ROOT,
            env=environment,
            check=True,
            timeout=240,
        )

    run_tiny_benchmark()
    record = json.loads((out / "results.json").read_text())
    # the teacher: trained and averaged weights scored along the run, the guidance stage's
    # pick among both sets and every scale, exported as a snapshot that loads to that pick
    curve = record["stages"]["teacher"]["curve"]
    assert [point["step"] for point in curve] == [0, 1, 2]
    assert all(0 <= point[w]["overall"] <= 1 for point in curve for w in ("trained", "ema"))
    assert set(record["guidance"]["scores"]) == {
        f"{w}, CFG {s}" for w in ("trained", "ema") for s in ("1", "2")
    }
    states = torch.load(out / "teacher_state.pt", weights_only=True)["states"]
    assert any(
        not torch.equal(states["trained"][name], states["ema"][name]) for name in states["ema"]
    )
    chosen = states[record["guidance"]["weights"]]
    info = json.loads((exported / "teacher_info.json").read_text())
    assert info["weights"] == record["guidance"]["weights"] and info["command"] == "tiny"
    assert info["guidance_scale"] == record["guidance"]["best"]
    loaded = quickstart.load_snapshot(exported).state_dict()
    assert all(torch.equal(loaded[name], chosen[name]) for name in chosen)
    assert set(record["students"]) == {
        "fm",
        "apex_v0 tuned",
        "apex paper_form",
        "apex generator-reading",
    }
    assert "method.apex.fake_source=noise" in record["variants"]["apex generator-reading"]
    assert record["variants"]["apex_v0 tuned"][1:] == [
        "method.loss.kind=l2",
        "method.guidance.ratio=0",
        "method.apex_v0.distribution_matching_weight=0.125",
    ]
    for per_seed in record["students"].values():
        (row,) = per_seed
        assert row["weights_changed"]
        assert [point[0] for point in row["curve"]] == [0, 1, 2]
        for nfe in (1, 2, 4):
            assert 0.0 <= row[f"{nfe} NFE"]["overall"] <= 1.0
    text = report.read_text()
    assert "| teacher 2 steps, CFG" in text and "| apex_v0 tuned, 4 NFE |" in text
    assert "Teacher along its training" in text and "step 2: " in text
    assert (out / "results.md").read_text() == text
    for name in ("curves.png", "grids/teacher_2_steps.png", "grids/fm_1_NFE.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # a second call trains nothing: the teacher, sweep runs and students are read back; it
    # replaces only the generated part of the results file
    report.write_text(f"intro\n{bench.REPORT_START}\nstale table\n{bench.REPORT_END}\nanalysis\n")
    run_tiny_benchmark()
    again = json.loads((out / "results.json").read_text())
    assert again["students"] == record["students"] and again["sweep"] == record["sweep"]
    assert again["stages"]["teacher"]["skipped"]
    rewritten = report.read_text()
    assert rewritten.startswith(f"intro\n{bench.REPORT_START}\nCommand: `tiny`")
    assert rewritten.endswith(f"{bench.REPORT_END}\nanalysis\n") and "stale table" not in rewritten


def test_multi_step_student_samples_repeat_whatever_the_global_generator_did(tmp_path):
    """2 and 4 NFE re-noise between steps: that noise comes from the evaluation seed, so a
    score repeats exactly (it drifted by 0.014 between two evaluations of one student)."""
    quickstart.write_text_snapshot_once(tmp_path / "text")
    prompts = bench.Prompts(tmp_path / "text", "held_out", per_task=1)
    model = quickstart.load_snapshot(quickstart.FIRST_TEACHER)
    first = bench.run_sampler(model, prompts, "student", 4)
    torch.randn(100)
    assert torch.equal(first, bench.run_sampler(model, prompts, "student", 4))
    other_seed = bench.run_sampler(model, prompts, "student", 4, seed=bench.EVALUATION_SEEDS[1])
    assert not torch.equal(first, other_seed)
