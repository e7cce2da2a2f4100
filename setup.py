"""Builds rocmforge's extensions (Cython; a C/C++ compiler is all they need) and,
when nvcc or hipcc is on PATH, the code objects of the K/V kernels (package data)."""
import glob
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
    include_dirs=["hip", "rocmforge", numpy.get_include()],
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
    include_dirs=["hip", "rocmforge", numpy.get_include()],
    language="c++",
    extra_compile_args=["-O2"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# Paged attention over a KvCache (reads its storage through _kvcache.pxd).
attention = Extension(
    "rocmforge._attention",
    sources=["rocmforge/_attention.pyx", "hip/rf_host_attention.c"],
    include_dirs=["hip", "rocmforge", numpy.get_include()],
    language="c++",
    libraries=["m"],
    extra_compile_args=["-O3"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# Packed blocks out of and into a KvCache (rocmforge.transfer).
transfer = Extension(
    "rocmforge._transfer",
    sources=["rocmforge/_transfer.pyx"],
    include_dirs=["hip", "rocmforge", numpy.get_include()],
    language="c++",
    extra_compile_args=["-O2"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# One manager, its storage split by kv heads across KvCaches (TensorParallelKvCache).
tensor_parallel = Extension(
    "rocmforge._tensor_parallel",
    sources=["rocmforge/_tensor_parallel.pyx"],
    include_dirs=["hip", "rocmforge", numpy.get_include()],
    language="c++",
    extra_compile_args=["-O2"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)


# Each code object: its source, and the headers it includes.
KERNELS = {
    "kv_kernels": [os.path.join("hip", "kernels", "kv_kernels.cu"), os.path.join("hip", "rf_convert.h")],
    "attention": [os.path.join("hip", "kernels", "attention.cu"), os.path.join("hip", "kernels", "attention_mma.cuh"),
                  os.path.join("hip", "rf_convert.h"), os.path.join("hip", "rf_attention.h")],
}


def build_kernels(compiler, suffix, archs_var, default_archs, arch_flags, env=None):
    """Start compiling every KERNELS source with `compiler` (when on PATH) into
    rocmforge/kernels/<name>.<suffix> for the archs in $archs_var; an image newer
    than its sources is kept (setup.py runs more than once per install). Returns
    the running compilations. Without the compiler, or if it fails, that GPU kind
    gets no kernels and everything else still builds."""
    path = shutil.which(compiler)
    if not path:
        print(f"rocmforge: {compiler} not found, no .{suffix} kernels built")
        return []
    jobs = []
    archs = [a.strip() for a in os.environ.get(archs_var, default_archs).split(";") if a.strip()]
    for name, sources in KERNELS.items():
        out = os.path.join("rocmforge", "kernels", f"{name}.{suffix}")
        if os.path.exists(out) and all(os.path.getmtime(out) > os.path.getmtime(s) for s in sources):
            continue
        cmd = [path, "-std=c++17", "-O3", "-o", out, sources[0]] + arch_flags(archs)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        print("rocmforge:", " ".join(f"{k}={v}" for k, v in (env or {}).items()), " ".join(cmd))
        jobs.append((out, subprocess.Popen(cmd, env={**os.environ, **(env or {})})))
    return jobs


def cuda_flags(archs):
    """A fatbin: machine code per arch (compiled in parallel), plus PTX of the newest for later GPUs."""
    flags = ["-fatbin", "--threads", "0"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags + ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def hip_flags(archs):
    """A bundle of one code object per arch."""
    return ["--genco"] + [f"--offload-arch={a}" for a in archs]


# ROCMFORGE_KERNELS=0 skips the GPU kernels (the host-only sanitizer, fuzzing and coverage builds).
kernel_jobs = [] if os.environ.get("ROCMFORGE_KERNELS") == "0" else (
    build_kernels("nvcc", "fatbin", "ROCMFORGE_CUDA_ARCHS", "80;90", cuda_flags)
    + build_kernels("hipcc", "hsaco", "ROCMFORGE_HIP_ARCHS", "gfx90a;gfx940", hip_flags, env={"HIP_PLATFORM": "amd"}))
for image, job in kernel_jobs:
    if job.wait() != 0:
        print(f"rocmforge: {image} failed to build; that GPU kind gets no kernels")
        if os.path.exists(image):
            os.remove(image)

extensions = [core, bench_capi, runtime, kernels, dlpack, kvcache, attention, transfer, tensor_parallel]
directives = {"language_level": 3}
sanitize = os.environ.get("ROCMFORGE_SANITIZE")       # tools/sanitize.sh, tools/tsan.sh: e.g. "address,undefined"
if os.environ.get("ROCMFORGE_LINETRACE"):
    # tools/coverage.sh: line tracing for Cython's coverage plugin (slow; never in a release build).
    directives["linetrace"] = True
    for ext in extensions:
        ext.define_macros.append(("CYTHON_TRACE_NOGIL", "1"))
# The C and C++ headers the generated sources include: editing one rebuilds them.
headers = sorted(glob.glob(os.path.join("rocmforge", "_rf_*.h")) + glob.glob(os.path.join("hip", "*.h")))
for ext in extensions:
    ext.depends += headers
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
