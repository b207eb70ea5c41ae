"""Build and install dmgan (and the Triton ``kernels`` package).

The C++/CUDA extension ``dmgan._C`` is added here by the csrc work; until then this is a plain
Python package. Tool settings live in pyproject.toml.
"""

from setuptools import find_packages, setup

PINNED = ["torch==2.14.1", "torchvision==0.29.1"]  # what the README's commands install

setup(
    name="dmgan",
    version="0.1.0",
    description="DM-GAN text-to-image synthesis with a fused dynamic-memory op",
    python_requires=">=3.10",
    packages=find_packages(include=["dmgan", "dmgan.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy>=1.26",
        "pillow>=10",
        "einops>=0.8",
    ],
    extras_require={
        "dev": PINNED
        + [
            "numpy==2.4.6",
            "pillow==13.0.0",
            "einops==0.8.2",
            "ninja==1.13.2",
            "pytest==9.2.0",
            "pytest-benchmark==5.3.1",
            "nvidia-ml-py==13.615.71",
            "ruff==0.17.6",
        ],
    },
    entry_points={"console_scripts": ["dmgan-train=dmgan.train:main"]},
)
