"""Builds the native kernel, haltless.fast._validate (from haltless_fast/); nothing else.

HALTLESS_DEBUG=1 builds with bounds checks, wraparound, assertions and -O0 -g
(the .pyx header sets no checks of its own, so these directives decide).
HALTLESS_NO_EXTENSIONS=1 at build time skips the extension: the pure-Python
twin then runs (slower, same answers). A failed compile says so.
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = ["_validate", "_codec"]


def compiler_directives(debug: bool) -> dict:
    # cdivision is part of the kernels' arithmetic (C semantics), so their
    # headers set it; the checks below are the only thing debug changes.
    return {"language_level": 3, "boundscheck": debug, "wraparound": debug,
            "initializedcheck": debug}


class BuildExt(build_ext):
    """A missing or broken C compiler names the way out instead of a bare traceback."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # distutils' CompileError / DistutilsExecError / PlatformError
            raise SystemExit(
                f"haltless: building the Cython kernel failed ({exc}).\n"
                "Install a C compiler (e.g. apt-get install gcc python3-dev), or install "
                "the pure-Python kernel instead: HALTLESS_NO_EXTENSIONS=1 pip install ...") from exc


def extensions() -> list:
    if os.environ.get("HALTLESS_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    debug = os.environ.get("HALTLESS_DEBUG") == "1"
    return cythonize(
        [Extension(f"haltless.fast.{name}", [f"haltless_fast/{name}.pyx"],
                   extra_compile_args=["-O0", "-g"] if debug else ["-O2"])
         for name in KERNELS],
        compiler_directives=compiler_directives(debug),
        force=debug,  # a debug build must not reuse a release build's C file
    )


if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
