"""Local Hugging Face snapshot folders of the evaluation models: checked before anything loads.

The evaluators never reach a model hub: a model is a folder in the layout `save_pretrained` (or a
hub download) leaves, with `config.json`, the weights and the preprocessing files. Weights are
read by transformers with `weights_only` loading (safetensors preferred), and no code from the
folder is ever run (`trust_remote_code` stays off).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Weight files transformers reads from a snapshot folder, safetensors first.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_snapshot(
    path: str | Path, what: str, model_types: tuple[str, ...], example: str
) -> dict[str, Any]:
    """The `config.json` of snapshot folder `path`, after checking that it holds a model of one
    of `model_types` with its weights and preprocessing; errors name the folder, what is
    missing, and `example`, a snapshot that fits."""
    path = Path(path)
    hint = f"give the local snapshot folder of {what} (for example {example}; docs/evaluation.md)"
    if not path.is_dir():
        raise FileNotFoundError(f"{what} snapshot {path} is not a folder: {hint}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{what} snapshot {path} has no config.json: {hint}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not JSON ({error}): {hint}") from None
    model_type = config.get("model_type")
    if model_type not in model_types:
        raise ValueError(
            f"{what} snapshot {path} holds a {model_type!r} model, not one of "
            f"{list(model_types)}: {hint}"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(
            f"{what} snapshot {path} has no weights (none of {list(WEIGHT_FILES)}): copy the "
            "whole snapshot folder"
        )
    if not (path / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{what} snapshot {path} has no preprocessor_config.json (the image preprocessing): "
            "copy the whole snapshot folder"
        )
    return config


def loading_arguments() -> dict[str, Any]:
    """What every `from_pretrained` of the evaluation passes: local files only, no remote code,
    weights-only loading of any non-safetensors file."""
    return {"local_files_only": True, "trust_remote_code": False, "weights_only": True}
