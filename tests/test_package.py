import importlib.util
import shutil
import subprocess
import sys

import torch

from apex_kernels import attention


def test_kernels_install_as_apex_kernels_not_kernels(tmp_path):
    """Outside the repository, apex_kernels imports and no top-level `kernels` is installed
    (that name belongs to another package that transformers probes for)."""
    probe = (
        "import importlib.util as u; "
        "print(u.find_spec('apex_kernels') is not None, u.find_spec('kernels') is None)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["True", "True"]


def test_console_script_is_installed():
    assert shutil.which("apex-toy-experiment") is not None or importlib.util.find_spec(
        "apex_tools.toy_experiment"
    )
    assert importlib.util.find_spec("apex_tools.toy_experiment") is not None


def test_attention_matches_softmax_reference_with_and_without_padding():
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, 5, 8) for _ in range(3))
    scores = query @ key.transpose(-1, -2) / 8**0.5
    expected = scores.softmax(-1) @ value
    assert torch.allclose(attention(query, key, value), expected, atol=1e-5)
    padding = torch.tensor([[True] * 5, [True, True, True, False, False]])
    masked = scores.masked_fill(~padding[:, None, None, :], float("-inf"))
    assert torch.allclose(
        attention(query, key, value, padding), masked.softmax(-1) @ value, atol=1e-5
    )


def test_attention_shape_errors_are_clear():
    import pytest

    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(*(torch.randn(1, 2, 3, 4) for _ in range(3)), torch.ones(1, 4, dtype=torch.bool))
