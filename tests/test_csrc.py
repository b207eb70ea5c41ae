"""The C++/CUDA extension beyond parity (tests/test_ops_backends.py has that): input validation,
the fall-back when it cannot load, and the CUDA build gate on a machine without a GPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmgan import ops
from dmgan.ops import _build
from dmgan.ops.parity import ReadShape, WriteShape, read_case, write_case

_cpp = pytest.importorskip("dmgan.ops._cpp", reason="the C++ extension did not load", exc_type=ImportError)


def test_extension_is_loaded_and_registered():
    assert _cpp.HOW_LOADED in ("prebuilt", "built on first use")
    for name in ("memory_write", "memory_write_backward", "memory_read", "memory_read_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dmgan::{name}", "CPU")


def test_auto_takes_the_measured_fastest_backend_on_cpu():
    """The C++ kernels for reading, eager (oneDNN's 1x1 convolutions) for writing."""
    from dmgan.ops.library import OpInput

    cpu = torch.device("cpu")
    assert "cpp" in ops.available_backends("cpu")
    read = OpInput("memory_read", cpu, torch.float32, 10, 64, 18, num_pixels=128 * 128)
    write = OpInput("memory_write", cpu, torch.bfloat16, 10, 64, 18, word_dim=256)
    assert ops._resolve("auto", read) is _cpp and ops._resolve("auto", write) is ops.reference


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda c: c.update(
                keys=c["keys"][:, :, :2].contiguous(), values=c["values"][:, :, :2].contiguous()
            ),
            r"pad_mask must be B x T = 2 x 2",
        ),
        (lambda c: c.update(values=c["values"][:1]), r"values must match keys"),
        (lambda c: c.update(img=c["img"].transpose(2, 3)), r"must be contiguous"),
        (lambda c: c.update(gate_w=c["gate_w"][:, :10]), r"gate_w must hold 2 N_r = 64"),
        (lambda c: c.update(pad_mask=c["pad_mask"].float()), r"pad_mask must be bool"),
        (lambda c: c.update(keys=c["keys"].double()), r"every float input must be Float"),
        (lambda c: c.update(img=c["img"][0]), r"img must be B x N_r x H x W"),
    ],
)
def test_bad_input_raises_a_python_error_naming_the_problem(change, match):
    case = read_case(ReadShape(2, 32, 3, 5, (4, 2)), torch.float32)
    change(case)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dmgan.memory_read(*case.values(), False, False)


def test_bad_write_input_names_the_weight():
    case = write_case(WriteShape(2, 24, 32, 3), torch.float32)
    case["key_w"] = case["key_w"][:, :10]
    with pytest.raises(RuntimeError, match=r"key_w must have shape \[32, 64, 1\]"):
        torch.ops.dmgan.memory_write(*case.values())


def test_a_backend_that_cannot_load_warns_once_under_auto_and_raises_when_named(monkeypatch):
    monkeypatch.setitem(ops.BACKEND_MODULES, "cpp", "dmgan.ops._no_such_extension")
    monkeypatch.delitem(ops._loaded, "cpp", raising=False)
    case = read_case(ReadShape(1, 32, 3, 3, (2,)), torch.float32)
    with pytest.warns(RuntimeWarning, match="the 'cpp' backend is unavailable"):
        auto, _ = ops.memory_read(**case)
    torch.testing.assert_close(auto, ops.memory_read(**case, backend="eager")[0])
    with pytest.raises(RuntimeError, match="backend 'cpp' is unavailable: ModuleNotFoundError"):
        ops.memory_read(**case, backend="cpp")
    monkeypatch.delitem(ops._loaded, "cpp")  # let later tests load the real one again


def test_cuda_toolkit_is_found_behind_a_wrapper_script(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text("")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    assert _build.find_cuda_home() == str(toolkit)


def test_cuda_sources_compile_and_link_without_a_gpu(tmp_path):
    """The CUDA build gate: the extension was built with its CUDA kernels, or, where it was built
    without them (DMGAN_SKIP_CUDA=1), the CUDA source compiles for sm_90 here."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("dmgan::memory_read", "CUDA"):
        return  # setup.py / the first-use build compiled and linked csrc/memory_cuda.cu
    home = _build.find_cuda_home()
    if home is None or torch.version.cuda is None:
        pytest.skip(f"no CUDA toolkit ({home=}) or a CPU build of torch ({torch.version.cuda=})")
    from torch.utils.cpp_extension import include_paths

    nvcc = Path(home) / "bin" / "nvcc"
    python_include = (
        Path(sys.base_prefix) / "include" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    )
    command = [
        str(nvcc),
        "-c",
        str(_build.CSRC / "memory_cuda.cu"),
        "-o",
        str(tmp_path / "memory_cuda.o"),
        f"-std={_build.cxx_standard()}",  # what this torch's cpp_extension compiles with
        "-O1",
        "--expt-relaxed-constexpr",
        "-gencode=arch=compute_90,code=sm_90",
        "-Xcompiler",
        "-fPIC",
        *(f"-I{p}" for p in include_paths()),
        f"-I{python_include}",
        f"-I{_build.CSRC}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert shutil.which("true") is None or (tmp_path / "memory_cuda.o").stat().st_size > 0


def test_the_cuda_kernels_are_built_for_every_default_architecture():
    """An A100 (sm_80) once got "no kernel image": the default list has it now, and the
    extension built with the defaults carries machine code for each architecture."""
    assert _build.DEFAULT_ARCHS.split() == ["8.0", "8.6", "8.9", "9.0", "12.0+PTX"]
    if not _cpp._HAS_CUDA_KERNELS or _cpp.HOW_LOADED != "prebuilt" or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("dmgan._C was not built by setup.py with the default architectures")
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("no cuobjdump to read the extension's machine code with")
    import dmgan._C

    listing = subprocess.run(
        [str(cuobjdump), "--list-elf", dmgan._C.__file__], capture_output=True, text=True
    )
    assert {f"sm_{a}" for a in (80, 86, 89, 90, 120)} <= set(re.findall(r"sm_\d+", listing.stdout))


def test_backward_ops_check_the_output_gradients():
    case = read_case(ReadShape(2, 32, 3, 5, (4, 2)), torch.float32)
    with pytest.raises(RuntimeError, match="grad_out must be a Float tensor of shape"):
        torch.ops.dmgan.memory_read_backward(case["img"][:, :, :2].contiguous(), *case.values(), False)
    nhwc = case["img"].contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=r"grad_out must be in img's layout \(contiguous\)"):
        torch.ops.dmgan.memory_read_backward(nhwc, *case.values(), False)
    with pytest.raises(RuntimeError, match="img must be contiguous or channels-last"):
        torch.ops.dmgan.memory_read(case["img"].transpose(2, 3), *list(case.values())[1:], False, False)
    write = write_case(WriteShape(2, 24, 32, 3), torch.float32)
    grad = torch.zeros(2, 32, 4)  # T = 4, the words have 3
    with pytest.raises(RuntimeError, match="output gradients must be contiguous B x N_r x T"):
        torch.ops.dmgan.memory_write_backward(grad, grad, *write.values())


@pytest.mark.slow
@pytest.mark.toolchain
def test_csrc_is_cpp17_as_torch_2_11_compiles_it():
    """torch 2.11 (the GPU machine's) compiles extensions with -std=c++17, 2.12 and later with
    C++20; csrc/ once used std::bit_cast and did not build there. The CPU sources compile as C++17
    against torch 2.11's headers (g++, syntax only): under torch 2.12+ those of the environment of
    tests/toolchain.py (made on first use), under 2.11 the running torch's. The stage of
    tests/test_toolchain.py builds all of csrc/ (and the HIP-CPU rewrite of the CUDA source) with
    torch 2.11's own flags; this is the quick check, with the compiler's message."""
    from tests import toolchain

    if torch.__version__.split("+")[0] == toolchain.TORCH:
        interpreter = Path(sys.executable)
    else:
        interpreter = toolchain.ensure_env()
    paths = toolchain.build_paths(interpreter)
    assert paths["torch"].split("+")[0] == toolchain.TORCH, paths["torch"]
    includes = [
        *(f"-I{p}" for p in paths["include_paths"]),
        f"-I{paths['python_include']}",
        f"-I{_build.CSRC}",
    ]
    gxx = ["g++", "-std=c++17", "-fsyntax-only", "-fopenmp", "-w", *includes]
    failures = {}
    for name in (*_build.CPU_SOURCES, "module.cpp"):
        result = subprocess.run([*gxx, str(_build.CSRC / name)], capture_output=True, text=True)
        if result.returncode != 0:
            failures[name] = result.stderr[-3000:]
    assert not failures, "\n\n".join(f"{name} is not C++17:\n{err}" for name, err in failures.items())
