"""Builds the native kernels, one extension each from haltless_fast/<kernel>.pyx:
haltless.fast._validate (ingest), the codec's _blocks, _chunks, _aggregate
and _iso (which cimport their shared inline helpers from _shared.pxd), and
_opcua (the OPC-UA subscriber's notification reader); nothing else.

HALTLESS_DEBUG=1 builds with bounds checks, wraparound, assertions and -O0 -g
(the .pyx headers set no checks of their own, so these directives decide).
HALTLESS_NO_EXTENSIONS=1 at build time skips the extensions: the pure-Python
twins then run (slower, same answers). A failed compile says so.
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = ["_validate", "_blocks", "_chunks", "_aggregate", "_iso", "_opcua"]


def compiler_directives(debug: bool) -> dict:
    # cdivision is part of the kernels' arithmetic (C semantics), so their
    # headers set it; the checks below are the only thing debug changes.
    return {"language_level": 3, "boundscheck": debug, "wraparound": debug,
            "initializedcheck": debug}


class BuildExt(build_ext):
    """A missing or broken C compiler names the way out instead of a bare traceback."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # the kernels compile side by side (pip gives no -j)
            self.parallel = os.cpu_count() or 1

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
                   extra_compile_args=["-O0", "-g"] if debug else ["-O2", "-g0"],
                   # no debug info in release builds (it was 1.0-1.4 MB a module)
                   extra_link_args=["-s"] if not debug and sys.platform.startswith("linux")
                   else [])
         for name in KERNELS],
        compiler_directives=compiler_directives(debug),
        # The modules are named haltless.fast.* but live in haltless_fast/, so a
        # relative cimport would look for haltless/fast/_shared.pxd: they cimport
        # _shared by its bare name from here instead.
        include_path=["haltless_fast"],
        force=debug,  # a debug build must not reuse a release build's C file
        nthreads=os.cpu_count() or 1,
    )


if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
