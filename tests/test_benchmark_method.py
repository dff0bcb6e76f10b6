"""tools/benchmark_method.py at a trivially small size: every stage runs and writes its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

from apex_tools import benchmark_method as bench

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
    sweep=("l2, dm 0.125, w 0",), teacher_sampling_steps=2,
)
bench.start_process_group(1)
variants = ["fm", "apex_v0 tuned", "apex paper_form"]
bench.run(Path(sys.argv[1]), settings, variants, Path(sys.argv[2]), "tiny")
"""


def test_tiny_benchmark_trains_changes_weights_writes_the_report_and_resumes(tmp_path):
    out, report = tmp_path / "bench", tmp_path / "results.md"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run_tiny_benchmark():
        subprocess.run(
            [sys.executable, "-c", TINY_RUN, str(out), str(report)],
            cwd=ROOT,
            env=environment,
            check=True,
            timeout=240,
        )

    run_tiny_benchmark()
    record = json.loads((out / "results.json").read_text())
    assert set(record["students"]) == {"fm", "apex_v0 tuned", "apex paper_form"}
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
