"""Builds rocmforge._core (Cython, C++ mode). Only a C++ compiler is needed."""
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

setup(ext_modules=cythonize([core, runtime, kernels], compiler_directives={"language_level": 3}))
