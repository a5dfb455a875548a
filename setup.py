"""Builds ``flagdit_kernels._C`` from ``csrc/``.

The C++ CPU sources are always compiled. The CUDA sources (``csrc/*.cu``) are added when torch was built
with CUDA and ``nvcc`` is found. ``FLAGDIT_KERNELS_BUILD_CUDA=1`` forces CUDA on (and fails loudly if it
cannot be built), ``=0`` forces it off. ``FLAGDIT_KERNELS_NO_EXTENSION=1`` skips the extension entirely,
giving a pure-Python install that runs on the reference and Triton backends.

``FLAGDIT_KERNELS_SANITIZE=address,undefined`` (any ``-fsanitize=`` list) builds the C++ CPU ops instrumented,
without CUDA, at -O1 with frame pointers and no recovery (the first report aborts): a debugging build for
CI's sanitizer job, loaded into an uninstrumented Python with ``LD_PRELOAD`` of the sanitizer runtimes.
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda(torch_has_cuda: bool, nvcc_found: bool) -> bool:
    forced = os.environ.get("FLAGDIT_KERNELS_BUILD_CUDA")
    if forced == "1":
        if not (torch_has_cuda and nvcc_found):
            raise RuntimeError(
                "FLAGDIT_KERNELS_BUILD_CUDA=1 but "
                + ("torch has no CUDA" if not torch_has_cuda else "nvcc was not found")
            )
        return True
    if forced == "0":
        return False
    return torch_has_cuda and nvcc_found


def _extensions():
    if os.environ.get("FLAGDIT_KERNELS_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc_found = CUDA_HOME is not None or shutil.which("nvcc") is not None
    sanitize = os.environ.get("FLAGDIT_KERNELS_SANITIZE")
    if sanitize and os.environ.get("FLAGDIT_KERNELS_BUILD_CUDA") == "1":
        raise RuntimeError("FLAGDIT_KERNELS_SANITIZE builds the C++ CPU ops only; unset FLAGDIT_KERNELS_BUILD_CUDA")
    use_cuda = not sanitize and _want_cuda(torch.version.cuda is not None, nvcc_found)

    cxx_flags = ["-O3", "-std=c++17"]
    if sanitize:
        instrument = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
        ext = CppExtension(
            "flagdit_kernels._C",
            cpp_sources,
            extra_compile_args={"cxx": ["-O1", "-std=c++17", *instrument]},
            extra_link_args=[f"-fsanitize={sanitize}"],
        )
    elif use_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DFLAGDIT_WITH_CUDA"]
        if not arch_list:
            nvcc_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = CUDAExtension(
            "flagdit_kernels._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": [*cxx_flags, "-DFLAGDIT_WITH_CUDA"], "nvcc": nvcc_flags},
        )
    else:
        ext = CppExtension("flagdit_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
