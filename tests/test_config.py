from pathlib import Path

import pytest
import yaml

from apex_dist.config import (
    Config,
    ConfigError,
    MethodConfig,
    apply_overrides,
    at_least,
    describe,
    from_dict,
    in_range,
    load_config,
    positive,
    save_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_validate():
    assert Config().validate() == []


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert isinstance(config, Config)


def test_configs_folder_is_not_empty():
    assert CONFIGS, "configs/ must ship at least the quickstart config"


def test_unknown_key_names_its_path_and_the_closest_name(tmp_path):
    path = write(tmp_path, {"method": {"condition_shift": {"scael": -1}}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "method.condition_shift.scael" in message
    assert "did you mean 'scale'" in message
    assert str(path) in message


def test_every_problem_is_reported_together(tmp_path):
    data = {
        "optimizer": {"lr": -1.0, "betas": [0.9]},
        "method": {"objective": "apex_v1", "loss": {"kind": "huber"}},
        "train": {"micro_batch_size": "eight"},
        "unknown_section": {},
    }
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data))
    problems = caught.value.problems
    joined = "\n".join(problems)
    assert "method.objective" in joined and "did you mean 'apex_v0'" in joined
    assert "method.loss.kind" in joined
    assert "train.micro_batch_size must be int" in joined
    assert "unknown key unknown_section" in joined
    assert "optimizer.lr must be > 0" in joined
    assert "optimizer.betas must be two numbers" in joined
    assert len(problems) == 6


def test_range_problems_are_reported_together():
    data = {"optimizer": {"lr": -1.0, "betas": [0.9]}, "method": {"time_sampling": {"scale": 2.0}}}
    with pytest.raises(ConfigError) as caught:
        from_dict(Config, data)
    joined = "\n".join(caught.value.problems)
    assert "optimizer.lr must be > 0" in joined
    assert "optimizer.betas" in joined
    assert "method.time_sampling.scale must be in (0, 1]" in joined


def test_apex_v0_micro_batch_must_split_into_four_roles():
    with pytest.raises(ConfigError, match=r"micro_batch_size must be a multiple of 4.*got 6"):
        from_dict(Config, {"train": {"micro_batch_size": 6}})
    # other objectives accept any micro-batch
    from_dict(Config, {"train": {"micro_batch_size": 6}, "method": {"objective": "fm"}})


def test_dotted_overrides_set_nested_values_with_yaml_types(tmp_path):
    path = write(tmp_path, {"method": {"objective": "apex"}})
    config = load_config(
        path,
        [
            "method.condition_shift.scale=-1",
            "method.apex.detach_fake=true",
            "optimizer.betas=[0.9, 0.95]",
            "model.pretrained=null",
            "optimizer.lr=1e-3",
        ],
    )
    assert config.optimizer.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string; floats accept it
    assert config.method.condition_shift.scale == -1.0
    assert isinstance(config.method.condition_shift.scale, float)
    assert config.method.apex.detach_fake is True
    assert config.optimizer.betas == [0.9, 0.95]
    assert config.method.objective == "apex"


def test_override_errors_name_the_key():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["method.objective"])
    with pytest.raises(ConfigError, match="method.objective is a value"):
        apply_overrides({"method": {"objective": "fm"}}, ["method.objective.name=x"])
    with pytest.raises(ConfigError, match="unknown key method.condition_shift.slope"):
        load_config(None, ["method.condition_shift.slope=1"])


def test_identity_shift_is_rejected():
    with pytest.raises(
        ConfigError, match="method.condition_shift: scale=1, bias=0 is the identity"
    ):
        load_config(None, ["method.condition_shift.scale=1", "method.condition_shift.bias=0"])


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(top)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(None, ["method.objective=apex", "method.apex.mix_ratio=0.25"])
    target = tmp_path / "run" / "config.yaml"
    save_config(config, target)
    assert load_config(target) == config
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_method_section_builds_from_a_dict():
    method = from_dict(MethodConfig, {"objective": "fm", "loss": {"kind": "l2"}})
    assert method.objective == "fm" and method.loss.kind == "l2"


def test_every_option_has_help():
    lines = describe()
    assert any(line.startswith("method.condition_shift.scale = -0.5") for line in lines)
    assert all(not line.endswith(": ") for line in lines), [
        line for line in lines if line.endswith(": ")
    ]


def test_a_string_that_is_not_a_number_is_still_refused_for_a_float_option(tmp_path):
    path = write(tmp_path, {"optimizer": {"lr": "1e-3x"}})
    with pytest.raises(ConfigError, match="optimizer.lr"):
        load_config(path)


# --------------------------------------------------------------------------------------------
# numbers: every float option finite, every range checked, the field path named


def _float_options(cls: type = Config, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted path, is a list) of every float and list-of-float option of the schema."""
    import dataclasses
    import typing

    found = []
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        annotation = hints[item.name]
        if dataclasses.is_dataclass(annotation):
            found += _float_options(annotation, f"{prefix}{item.name}.")
        elif annotation is float:
            found.append((f"{prefix}{item.name}", False))
        elif typing.get_origin(annotation) is list and typing.get_args(annotation) == (float,):
            found.append((f"{prefix}{item.name}", True))
    return found


FLOAT_OPTIONS = _float_options()
# YAML spellings of non-finite numbers: PyYAML reads .inf/.nan as floats, leaves inf and nan
# as strings, 1e400 (a string to PyYAML) overflows to inf when converted, and an integer of 401
# digits has no float at all.
NON_FINITE_SPELLINGS = (".inf", "-.inf", ".nan", "inf", "nan", "-Infinity", "1e400", "9" * 401)


def test_the_schema_has_the_float_options_the_numbers_checks_cover():
    paths = {path for path, _ in FLOAT_OPTIONS}
    for expected in (
        "optimizer.lr",
        "optimizer.betas",
        "optimizer.eps",
        "optimizer.weight_decay",
        "optimizer.grad_clip",
        "method.guidance.ratio",
        "method.condition_shift.scale",
        "method.condition_shift.bias",
        "method.reference.ema_decay",
        "method.loss.robust_scale",
        "data.max_bad_fraction",
    ):
        assert expected in paths, expected


@pytest.mark.parametrize("path,is_list", FLOAT_OPTIONS, ids=[path for path, _ in FLOAT_OPTIONS])
def test_non_finite_numbers_are_refused_for_every_float_option(path, is_list):
    for spelling in NON_FINITE_SPELLINGS:
        value = f"[{spelling}]" if is_list else spelling
        with pytest.raises(ConfigError) as caught:
            load_config(None, [f"{path}={value}"])
        message = str(caught.value)
        assert f"{path}" in message and "finite number" in message, (spelling, message)


def test_non_finite_numbers_in_a_yaml_file_are_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "optimizer:\n  lr: .inf\n  betas: [0.9, .nan]\nmethod:\n  guidance:\n    ratio: .nan\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    joined = "\n".join(caught.value.problems)
    assert "optimizer.lr must be a finite number (got inf)" in joined
    assert "optimizer.betas[1] must be a finite number (got nan)" in joined
    assert "method.guidance.ratio must be a finite number" in joined
    assert len(caught.value.problems) == 3  # no follow-up range errors about the same fields


def test_a_config_built_in_code_with_a_non_finite_number_fails_validation():
    config = Config()
    config.optimizer.lr = float("nan")
    config.method.condition_shift.bias = float("inf")
    config.optimizer.betas = [0.9, float("-inf")]
    joined = "\n".join(config.validate())
    assert "optimizer.lr must be a finite number (got nan)" in joined
    assert "method.condition_shift.bias must be a finite number (got inf)" in joined
    assert "optimizer.betas[1] must be a finite number (got -inf)" in joined


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optimizer.eps=0", "optimizer.eps must be > 0"),
        ("optimizer.betas=[0.9, 1.0]", "optimizer.betas must be two numbers in [0, 1)"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be >= 0"),
        ("optimizer.grad_clip=-1", "optimizer.grad_clip must be >= 0"),
        ("optimizer.weight_decay=2e4", "optimizer.lr * optimizer.weight_decay must be < 1"),
        ("train.seed=-1", "train.seed must be in [0, 4294967295]"),
        ("train.seed=4294967296", "train.seed must be in [0, 4294967295]"),
        ("method.guidance.ratio=1.0", "method.guidance.ratio must be < 1"),
        ("method.loss.robust_scale=0", "method.loss.robust_scale must be > 0"),
        ("method.apex_v0.distribution_matching_weight=-1", "distribution_matching_weight"),
    ],
)
def test_out_of_range_numbers_are_refused_with_their_path(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert expected in str(caught.value)


def test_guidance_of_one_or_more_is_accepted_with_a_frozen_reference():
    # a frozen teacher's guided target has no 1/(1 - w) fixed point: w is a plain CFG scale
    config = load_config(None, ["method.reference.mode=frozen_base", "method.guidance.ratio=4.0"])
    assert config.method.guidance.ratio == 4.0
    # the largest seed numpy accepts is valid
    assert load_config(None, ["train.seed=4294967295"]).train.seed == 4294967295


def test_a_bad_list_item_keeps_the_default_instead_of_crashing_validation():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["optimizer.betas=[0.9, fast]"])
    assert caught.value.problems == ["optimizer.betas[1] must be float (got 'fast')"]


def test_changing_one_config_leaves_the_defaults_of_others_alone():
    first = Config()
    first.method.condition_shift.bias = 2.0
    first.optimizer.betas.append(0.5)
    second = Config()
    assert second.method.condition_shift.bias == 1.0
    assert second.optimizer.betas == [0.9, 0.99]


def test_range_helpers_name_the_path_the_interval_and_the_value():
    assert in_range("data", "text_dropout", 1.0, 0, 1, "[)") == [
        "data.text_dropout must be in [0, 1) (got 1.0)"
    ]
    assert in_range("data", "text_dropout", 0.0, 0, 1, "[)") == []
    assert in_range("a", "b", 0.0, 0, 1, "(]", reason=": why") == [
        "a.b must be in (0, 1] (got 0.0): why"
    ]
    assert in_range("a", "b", float("nan"), 0, 1) != []
    assert positive("a", "b", 0) == ["a.b must be > 0 (got 0)"] and positive("a", "b", 1e-9) == []
    assert positive("a", "b", float("nan")) != []
    assert (
        at_least("a", "b", 0, 1) == ["a.b must be >= 1 (got 0)"] and at_least("a", "b", 1, 1) == []
    )
    assert at_least("a", "b", float("nan"), 0) == []  # left to the finiteness check: one problem
    with pytest.raises(ValueError, match="bounds"):
        in_range("a", "b", 0.5, 0, 1, "[[")


def test_range_problems_keep_their_paths_and_reasons():
    overrides = [
        "model.text_max_length=0",
        "model.toy.hidden_size=0",
        "model.lora.dropout=1",
        "method.reference.mode=ema",
        "method.reference.ema_decay=1",
        "method.apex_v0.consistency_delta=0",
        "data.max_bad_fraction=2",
        "data.read_timeout_seconds=0",
        "parallel.activation_checkpointing=-1",
        "checkpoint.keep_last=0",
        "logging.teacher_guidance_scale=-1",
    ]
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert caught.value.problems == [
        "model.toy.hidden_size must be >= 1 (got 0)",
        "model.lora.dropout must be in [0, 1) (got 1.0)",
        "model.text_max_length must be in [1, 1024] (got 0): Qwen-Image keeps at most 1024 text "
        "tokens",
        "method.reference.ema_decay must be in (0, 1) (got 1.0) for mode ema",
        "method.apex_v0.consistency_delta must be in (0, 1) (got 0.0)",
        "data.max_bad_fraction must be in [0, 1] (got 2.0)",
        "data.read_timeout_seconds must be > 0 (got 0.0)",
        "parallel.activation_checkpointing must be >= 0 (got -1)",
        "checkpoint.keep_last must be >= 1 (got 0)",
        "logging.teacher_guidance_scale must be >= 0 (got -1.0)",
    ]
