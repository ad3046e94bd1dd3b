"""Builds mlcl_fast._C from csrc/.

CPU sources (csrc/cpu/*.cpp) are always compiled. CUDA sources (csrc/cuda/*.cu, *.cpp) are
added only when torch is a CUDA build and nvcc is found. If no C++ compiler works, the package
still installs: the `cpp` backend is then unavailable and `backend="auto"` falls back to
`reference` with a warning.
"""
import glob
import os
import sys

from setuptools import setup


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("mlcl_fast: torch is not importable at build time; building without the C++ extension", file=sys.stderr)
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if not cpu_sources:
        return [], {}
    use_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("MLCL_FAST_NO_CUDA", "0") != "1"
        and bool(cuda_sources)
    )
    cxx = ["-O3", "-std=c++20", "-fopenmp"]  # torch 2.13 headers expect C++20
    if os.environ.get("MLCL_FAST_NATIVE", "1") == "1":  # source builds tune for the host CPU
        cxx.append("-march=native")
    extra = {"cxx": cxx}
    # Link libstdc++ as the shared library the process (torch) already uses, before any implicit
    # -lstdc++: a toolchain that resolved it to libstdc++.a (seen on an H200 machine's CUDA build)
    # put a second, never-initialised libstdc++ into the extension, whose number formatting then
    # crashed every TORCH_CHECK message with an integer in it (a segmentation fault instead of
    # the argument error). tests/test_cpp.py checks the built library for such a copy.
    link = ["-fopenmp"] + (["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else [])
    include = [os.path.join(here, "csrc")]
    if use_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17"]
        ext = CUDAExtension("mlcl_fast._C", cpu_sources + cuda_sources, include_dirs=include,
                            extra_compile_args=extra, extra_link_args=link, define_macros=[("MLCL_FAST_WITH_CUDA", "1")])
    else:
        ext = CppExtension("mlcl_fast._C", cpu_sources, include_dirs=include,
                           extra_compile_args=extra, extra_link_args=link)
    return [ext], {"build_ext": _TolerantBuild.wrap(BuildExtension)}


class _TolerantBuild:
    @staticmethod
    def wrap(base):
        class Build(base.with_options(use_ninja=True)):
            def run(self):
                try:
                    super().run()
                except Exception as err:  # no compiler, broken toolchain: install pure Python
                    if os.environ.get("MLCL_FAST_REQUIRE_EXT", "0") == "1":
                        raise
                    print(f"mlcl_fast: WARNING: C++ extension not built ({err}); "
                          "the cpp backend will be unavailable", file=sys.stderr)
        return Build


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
