"""The package installs under one name, ``haltless``, and the code imports it
only that way (inside a checkout ``import server`` would also work and give
a second copy of every module and exception class)."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import source_tree

ROOT = Path(__file__).resolve().parent.parent
BARE = re.compile(r"^\s*(from|import)\s+(server|pollers|haltless_fast)\b", re.M)


def test_no_module_imports_the_folders_by_their_bare_names():
    offenders = []
    for folder in ("server", "pollers", "haltless_fast", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py*")):
            if path.suffix not in (".py", ".pyx", ".pyi"):
                continue
            for m in BARE.finditer(path.read_text()):
                line = path.read_text()[: m.start()].count("\n") + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {m.group(0).strip()}")
    assert not offenders, "import these as haltless.server / haltless.pollers / haltless.fast " \
                          "(or relatively):\n" + "\n".join(offenders)


def test_the_bare_folder_names_are_not_importable_from_an_installed_copy(tmp_path):
    # Run from an empty folder so the checkout is not on sys.path.
    code = ("import importlib.util, haltless.server.app, haltless.server.direct, haltless.fast;"
            "print([n for n in ('server', 'pollers', 'haltless_fast')"
            " if importlib.util.find_spec(n) is not None])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_wheel_holds_only_haltless_and_no_generated_c(tmp_path):
    src = source_tree(tmp_path / "src")  # compiled from scratch, not from this checkout's build/
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("haltless-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"haltless"}
    assert not [n for n in names if n.endswith(".c")]
    assert "haltless/server/migrations/0001_initial.sql" in names
    assert "haltless/server/migrations/0006_read_side.sql" in names
    for static in ("index.html", "fleet.js", "fleet.css", "uPlot.iife.min.js", "uPlot.min.css",
                   "uPlot-LICENSE.txt"):  # the fleet page works from the wheel alone
        assert f"haltless/server/static/{static}" in names
    # each kernel: its source, stub, twin and extension; and the helpers they cimport
    for kernel in ("_validate", "_blocks", "_chunks", "_aggregate", "_iso"):
        for suffix in (".pyx", ".pyi", "_py.py"):
            assert f"haltless/fast/{kernel}{suffix}" in names
        assert any(n.startswith(f"haltless/fast/{kernel}.") and n.endswith(".so") for n in names)
    assert "haltless/fast/_shared.pxd" in names and "haltless/fast/_shared_py.py" in names
    assert not [n for n in names if n.startswith("haltless/fast/_codec")]


def test_a_debug_build_really_has_bounds_checks(tmp_path):
    """HALTLESS_DEBUG=1 turns the checks on: the kernel headers do not override it."""
    pytest.importorskip("Cython")
    from Cython.Build import cythonize

    sys.path.insert(0, str(ROOT))
    try:
        import setup as setup_py
    finally:
        sys.path.remove(str(ROOT))
    generated = {}
    for debug in (False, True):
        src = tmp_path / f"d{int(debug)}" / "_validate.pyx"
        src.parent.mkdir()
        src.write_text((ROOT / "haltless_fast/_validate.pyx").read_text())
        cythonize([str(src)], compiler_directives=setup_py.compiler_directives(debug), quiet=True)
        generated[debug] = src.with_suffix(".c").read_text()
    # __Pyx_GetItemInt_List(o, i, type, is_signed, to_py, wraparound, boundscheck, ...)
    checked = re.compile(r"__Pyx_GetItemInt_List\(__pyx_v_readings, [^;]*?PyLong_FromSsize_t, 1, 1,")
    assert checked.search(generated[True]), "debug build has no bounds-checked list access"
    assert not checked.search(generated[False])
