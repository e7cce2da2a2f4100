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

setup(ext_modules=cythonize([core], compiler_directives={"language_level": 3}))
