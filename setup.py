"""Builds the packed GEMM kernels (kernels/src/*.c) into a plain shared library inside the
package; Python loads it with ctypes (spfq_deploy/kernels.py). It is not a CPython extension
module and has no torch C++ dependency. Metadata lives in pyproject.toml."""

import glob

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "spfq_deploy._spfq_kernels",
    sources=sorted(glob.glob("kernels/src/*.c")),
    include_dirs=["kernels/include", "kernels/src"],
    extra_compile_args=["-O3", "-std=c11", "-pthread", "-Wall", "-Wextra"],
    extra_link_args=["-pthread", "-lm"],
)])
