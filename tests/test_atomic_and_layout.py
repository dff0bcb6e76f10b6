"""The one atomic-write helper and the one checkpoint layout shared by engine and converter."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

from apex_dist.atomic import atomic_path, atomic_write_json, atomic_write_text
from apex_dist.checkpoint_layout import LatestFileError, read_latest, step_of_tag, tag_for_step

ROOT = Path(__file__).resolve().parents[1]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["config.yaml"]
    with pytest.raises(ValueError):  # strict JSON: nothing non-finite is written
        atomic_write_json(path, {"lr": float("nan")})
    assert path.read_text() == "old\n"


def test_published_files_get_the_umask_mode_or_keep_the_replaced_files_mode(tmp_path):
    """Temporary files are private (0600); the published file must not be, or a teammate's
    job could not read an export's info or a run's config."""
    previous = os.umask(0o027)
    try:
        fresh = tmp_path / "export_info.json"
        atomic_write_json(fresh, {"format": 1})
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
        kept = tmp_path / "config.yaml"
        kept.write_text("old\n")
        kept.chmod(0o604)
        atomic_write_text(kept, "new\n")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o604 and kept.read_text() == "new\n"
    finally:
        os.umask(previous)


def test_latest_may_only_name_a_tag_of_its_directory(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / tag_for_step(7)).mkdir(parents=True)
    (tmp_path / "elsewhere" / "step_00000009").mkdir(parents=True)
    assert read_latest(checkpoints) is None
    (checkpoints / "latest").write_text("step_00000007\n")
    assert read_latest(checkpoints) == "step_00000007" and step_of_tag("step_00000007") == 7
    for hostile in ("../elsewhere/step_00000009", str(tmp_path / "elsewhere"), "step_7"):
        (checkpoints / "latest").write_text(hostile)
        with pytest.raises(LatestFileError, match="not a checkpoint of this run"):
            read_latest(checkpoints)


def test_the_converter_refuses_a_latest_that_leaves_the_run(tmp_path):
    from apex_dist.export.deepspeed_checkpoint import DeepSpeedCheckpoint
    from apex_dist.export.torch_archive import CheckpointFormatError

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "mp_rank_00_model_states.pt").write_bytes(b"not read")
    (checkpoints / "latest").write_text("../../outside")
    with pytest.raises(CheckpointFormatError, match="not a checkpoint of this run"):
        DeepSpeedCheckpoint.open(tmp_path / "run")


def test_layout_names_are_written_in_one_module():
    """The engine and the converter take the checkpoint file names from checkpoint_layout."""
    names = ("ZERO2_MODEL_STATES", "LATEST_FILE", "TAG_PATTERN", "SHADOW_FORMAT", "CONFIG_FILE")
    for path in (
        ROOT / "apex_dist" / "distributed" / "checkpoint.py",
        ROOT / "apex_dist" / "distributed" / "shadow.py",
        ROOT / "apex_dist" / "export" / "deepspeed_checkpoint.py",
    ):
        tree = ast.parse(path.read_text())
        assigned = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        assert not assigned & set(names), (path.name, assigned & set(names))
