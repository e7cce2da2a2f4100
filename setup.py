"""Builds rocmforge's extensions (Cython; a C/C++ compiler is all they need) and,
when nvcc or hipcc is on PATH, the code objects of the K/V kernels (package data)."""
import os
import shutil
import subprocess

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

core = Extension(
    "rocmforge._core",
    sources=["rocmforge/_core.pyx"],
    include_dirs=["rocmforge", numpy.get_include()],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# The allocator benchmarks' loops through the core's C API (what an engine
# written in Cython calls); `rocmforge bench` reports them beside the Python path.
bench_capi = Extension(
    "rocmforge._bench_capi",
    sources=["rocmforge/_bench_capi.pyx"],
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

# Arrays across DLPack, and KvCache (storage and data path; links the host
# kernels for the host backend and reaches the GPU through _runtime).
dlpack = Extension(
    "rocmforge._dlpack",
    sources=["rocmforge/_dlpack.pyx"],
    include_dirs=["hip", numpy.get_include()],
    extra_compile_args=["-O2"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)
kvcache = Extension(
    "rocmforge._kvcache",
    sources=["rocmforge/_kvcache.pyx", "hip/rf_host_kernels.c"],
    include_dirs=["hip", numpy.get_include()],
    language="c++",
    extra_compile_args=["-O2"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)


KERNEL_SOURCES = [os.path.join("hip", "kernels", "kv_kernels.cu"), os.path.join("hip", "rf_convert.h")]


def build_kernels(compiler, image, archs_var, default_archs, arch_flags, env=None):
    """Compile kv_kernels.cu with `compiler` (when on PATH) into rocmforge/kernels/<image>
    for the archs in $archs_var; skipped when the image is newer than its sources (setup.py
    runs more than once per install). Without the compiler, or if it fails, that GPU kind
    gets no kernels and everything else still builds."""
    path = shutil.which(compiler)
    out = os.path.join("rocmforge", "kernels", image)
    if not path:
        print(f"rocmforge: {compiler} not found, {image} not built")
        return
    if os.path.exists(out) and all(os.path.getmtime(out) > os.path.getmtime(s) for s in KERNEL_SOURCES):
        return
    archs = [a.strip() for a in os.environ.get(archs_var, default_archs).split(";") if a.strip()]
    cmd = [path, "-std=c++17", "-O3", "-o", out, KERNEL_SOURCES[0]] + arch_flags(archs)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    print("rocmforge:", " ".join(f"{k}={v}" for k, v in (env or {}).items()), " ".join(cmd))
    if subprocess.run(cmd, env={**os.environ, **(env or {})}).returncode != 0:
        print(f"rocmforge: {compiler} failed, {image} not built")


def cuda_flags(archs):
    """A fatbin: machine code per arch, plus PTX of the newest for later GPUs."""
    flags = ["-fatbin"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags + ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def hip_flags(archs):
    """A bundle of one code object per arch."""
    return ["--genco"] + [f"--offload-arch={a}" for a in archs]


build_kernels("nvcc", "kv_kernels.fatbin", "ROCMFORGE_CUDA_ARCHS", "80;90", cuda_flags)
build_kernels("hipcc", "kv_kernels.hsaco", "ROCMFORGE_HIP_ARCHS", "gfx90a;gfx940", hip_flags,
              env={"HIP_PLATFORM": "amd"})

extensions = [core, bench_capi, runtime, kernels, dlpack, kvcache]
directives = {"language_level": 3}
sanitize = os.environ.get("ROCMFORGE_SANITIZE")       # tools/sanitize.sh, tools/tsan.sh: e.g. "address,undefined"
if os.environ.get("ROCMFORGE_LINETRACE"):
    # tools/coverage.sh: line tracing for Cython's coverage plugin (slow; never in a release build).
    directives["linetrace"] = True
    for ext in extensions:
        ext.define_macros.append(("CYTHON_TRACE_NOGIL", "1"))
for ext in extensions:
    if sanitize:
        flags = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g", "-O1"]
        ext.extra_compile_args += flags
        ext.extra_link_args += flags
    elif not os.environ.get("ROCMFORGE_LINETRACE"):
        ext.extra_link_args.append("-s")        # release build: no symbol table or debug info


class BuildExt(build_ext):
    """Compiles the extensions in parallel, one job per CPU unless -j says otherwise."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1


setup(ext_modules=cythonize(extensions, compiler_directives=directives, nthreads=os.cpu_count() or 1),
      cmdclass={"build_ext": BuildExt})
