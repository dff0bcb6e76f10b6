from pathlib import Path

import pytest
import yaml

from apex_dist.config import (
    Config,
    ConfigError,
    MethodConfig,
    apply_overrides,
    describe,
    from_dict,
    load_config,
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
