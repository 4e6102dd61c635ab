"""ring-train: Megatron-style pretraining of hybrid linear/softmax-attention MoE models."""

from setuptools import find_packages, setup

# torch is a range, not a pin: CPU machines install the local 2.13.0 CPU build first
# (scripts/setup.sh), GPU machines keep their CUDA build. A pin here would make pip
# replace either one with the registry's CUDA wheel.
RUNTIME = [
    "torch>=2.6",
    "megatron-core==0.16.1",
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "numpy>=1.26,<3",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "psutil>=5.9",  # megatron-core's dist_checkpointing writer needs it but does not declare it
    "wandb==0.31.0",
]

setup(
    name="ring-train",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["ring_train", "ring_train.*", "kernels", "kernels.*"]),
    install_requires=RUNTIME,
    extras_require={
        "gpu": ["triton>=3.4"],
        # dev is the CPU development and CI set: the CPU build of torch (pinned, so a fresh
        # `pip install -e .[dev]` cannot resolve torch to the registry's CUDA build), and
        # triton for running the Triton kernels on CPU under TRITON_INTERPRET=1.
        "dev": ["torch==2.13.0", "pytest>=8", "pytest-timeout>=2.3", "triton>=3.4"],
    },
)
