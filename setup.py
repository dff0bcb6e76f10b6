"""Packaging for apex_dist, its kernels and its tools.

The `kernels/` folder installs as `apex_kernels` (a top-level `kernels` package belongs to
another project that transformers probes for) and `tools/` as `apex_tools`, so that the tools
are console scripts as well as files to run.
"""

from setuptools import find_packages, setup

setup(
    name="apex_dist",
    version="0.1.0",
    description="Distributed APEX one-step distillation of flow-matching diffusion transformers",
    python_requires=">=3.10",
    packages=[*find_packages(include=["apex_dist", "apex_dist.*"]), "apex_kernels", "apex_tools"],
    package_dir={"apex_kernels": "kernels", "apex_tools": "tools"},
    install_requires=["torch>=2.4", "numpy", "pyyaml"],
    entry_points={
        "console_scripts": [
            "apex-toy-experiment=apex_tools.toy_experiment:main",
            "apex-make-shards=apex_tools.make_shards:main",
            "apex-encode-prompts=apex_tools.encode_prompts:main",
            "apex-convert-checkpoint=apex_tools.convert_checkpoint:main",
            "apex-quickstart=apex_tools.quickstart:main",
            "apex-benchmark-method=apex_tools.benchmark_method:main",
            "apex-eval=apex_tools.eval:main",
            "apex-generate=apex_tools.generate:main",
        ],
    },
)
