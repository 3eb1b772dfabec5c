"""Builds the one native extension, haltless_fast._validate; nothing else.

HALTLESS_DEBUG=1 builds with assertions and bounds checks for debugging.
HALTLESS_NO_EXTENSIONS=1 at build time skips the extension (the pure-Python
twin then runs).
"""
import os

from setuptools import Extension, setup

debug = os.environ.get("HALTLESS_DEBUG") == "1"

ext_modules = []
if not os.environ.get("HALTLESS_NO_EXTENSIONS"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                "haltless_fast._validate",
                ["haltless_fast/_validate.pyx"],
                extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
            )
        ],
        compiler_directives={
            "language_level": 3,
            "boundscheck": debug,
            "wraparound": debug,
        },
    )

setup(ext_modules=ext_modules)
