"""mgup_dist: distributed selective-update optimizers (MGUP, AlphaAdam, Muon, MARS-M) for LLM pretraining."""
from setuptools import find_packages, setup

TORCH = "torch==2.13.0"

setup(
    name="mgup_dist",
    version="0.1.0",
    description="Sharded MGUP-AdamW/Lion/Muon, AlphaAdam and MARS-M for DeepSpeed, FSDP2 and Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mgup_dist", "mgup_dist.*", "launch", "launch.*"]),
    package_data={"mgup_dist.native": ["*.c", "*.h"]},
    install_requires=[TORCH, "numpy", "tqdm", "matplotlib"],
    extras_require={
        "deepspeed": [TORCH, "deepspeed==0.19.8"],
        "megatron": [TORCH, "megatron-core==0.16.1"],
        "mpi": ["mpi4py==4.1.2", "openmpi"],
        "dev": [TORCH, "pytest", "pytest-xdist", "hypothesis"],
    },
)
