"""Builds rocmforge's extensions (Cython; a C/C++ compiler is all they need) and,
when nvcc is on PATH, the CUDA code object of the K/V kernels (package data)."""
import os
import shutil
import subprocess

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

core = Extension(
    "rocmforge._core",
    sources=["rocmforge/_core.pyx"],
    include_dirs=["rocmforge", numpy.get_include()],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# The GPU runtime layer (hip/) is plain C: it loads HIP or CUDA at run time,
# so no GPU SDK is needed to build it.
runtime = Extension(
    "rocmforge._runtime",
    sources=["rocmforge/_runtime.pyx", "hip/rf_runtime.c"],
    include_dirs=["hip", numpy.get_include()],
    libraries=["dl"],
    extra_compile_args=["-O2", "-pthread"],
    extra_link_args=["-pthread"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# The host versions of the K/V kernels (the host backend and the GPU kernels' reference).
kernels = Extension(
    "rocmforge._kernels",
    sources=["rocmforge/_kernels.pyx", "hip/rf_host_kernels.c"],
    include_dirs=["hip", numpy.get_include()],
    libraries=["m"],
    extra_compile_args=["-O2"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

def build_cuda_kernels():
    """nvcc -> rocmforge/kernels/kv_kernels.fatbin for ROCMFORGE_CUDA_ARCHS (default 80;90,
    plus PTX of the newest). Without nvcc, or if it fails, GPUs use no kernels."""
    nvcc = shutil.which("nvcc")
    out = os.path.join("rocmforge", "kernels", "kv_kernels.fatbin")
    if not nvcc:
        print("rocmforge: nvcc not found, CUDA kernels not built")
        return
    archs = [a.strip() for a in os.environ.get("ROCMFORGE_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    cmd = [nvcc, "-fatbin", "-O3", "-o", out, os.path.join("hip", "kernels", "kv_kernels.cu")]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    cmd += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    print("rocmforge:", " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        print("rocmforge: nvcc failed, CUDA kernels not built")


build_cuda_kernels()

setup(ext_modules=cythonize([core, runtime, kernels], compiler_directives={"language_level": 3}))
