"""Each kernel's stub (``haltless_fast/<kernel>.pyi``) states what its compiled
module and its pure-Python twin define: the same public names, and for every
function the same parameters (names, kinds, defaults). The stub is read with
``ast``, the modules with ``inspect``; a stub that drifts fails here."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from helpers import twins

FAST = Path(__file__).resolve().parent.parent / "haltless_fast"
KERNELS = sorted(p.stem for p in FAST.glob("*.pyx"))
CASES = [pytest.param(kernel, *impl.values, id=f"{kernel}-{impl.id}", marks=impl.marks)
         for kernel in KERNELS for impl in twins(kernel)[2]]
EMPTY = inspect.Parameter.empty


def stub(kernel: str) -> tuple[set[str], dict[str, ast.FunctionDef]]:
    """The public names of ``<kernel>.pyi``, and its functions by name (a
    class's methods as ``Class.method``, dunders left out: their slot
    wrappers have no signature of their own)."""
    names, functions = set(), {}
    for node in ast.parse((FAST / f"{kernel}.pyi").read_text()).body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            for m in node.body:
                if isinstance(m, ast.FunctionDef) and not m.name.startswith("__"):
                    functions[f"{node.name}.{m.name}"] = m
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in names | set(functions) if not n.startswith("_") and "." not in n}, functions


def stub_parameters(node: ast.FunctionDef) -> list[tuple]:
    """(name, kind, default) of each parameter; a default must be the value
    itself, since ``...`` matches no real default."""
    a, kind = node.args, inspect.Parameter
    positional = [(p, kind.POSITIONAL_ONLY) for p in a.posonlyargs] + \
                 [(p, kind.POSITIONAL_OR_KEYWORD) for p in a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + a.defaults
    found = [(p.arg, k, d) for (p, k), d in zip(positional, defaults)]
    if a.vararg:
        found.append((a.vararg.arg, kind.VAR_POSITIONAL, None))
    found += [(p.arg, kind.KEYWORD_ONLY, d) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        found.append((a.kwarg.arg, kind.VAR_KEYWORD, None))
    return [(name, k, EMPTY if d is None else ast.literal_eval(d)) for name, k, d in found]


def parameters(module, name: str) -> list[tuple]:
    """(name, kind, default) of each parameter of ``module.<name>`` (dotted
    for a method)."""
    target = module
    for part in name.split("."):
        target = getattr(target, part)
    return [(p.name, p.kind, p.default) for p in inspect.signature(target).parameters.values()]


def public_names(module) -> set[str]:
    """What the module itself defines for callers: no _private names, no
    modules, no function or class it imported (its __module__ is elsewhere);
    plain values (ints, bytes) count wherever they came from."""
    def defined_here(value) -> bool:
        if inspect.ismodule(value):
            return False
        if callable(value):
            return getattr(value, "__module__", None) == module.__name__
        return type(value).__module__ == "builtins"
    return {name for name, value in vars(module).items()
            if not name.startswith("_") and defined_here(value)}


def test_every_compiled_kernel_has_a_stub_and_a_twin():
    assert KERNELS, f"no .pyx in {FAST}"
    assert sorted(p.stem for p in FAST.glob("*.pyi")) == KERNELS
    assert [k for k in KERNELS if not (FAST / f"{k}_py.py").exists()] == []


@pytest.mark.parametrize("kernel, module", CASES)
def test_the_stub_names_exactly_what_the_module_defines(kernel, module):
    names, _ = stub(kernel)
    assert names == public_names(module)


@pytest.mark.parametrize("kernel, module", CASES)
def test_each_stub_function_has_the_modules_parameters(kernel, module):
    _, functions = stub(kernel)
    for name, node in functions.items():
        assert stub_parameters(node) == parameters(module, name), f"{kernel}.pyi: {name}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_each_stub_function_states_its_parameter_and_return_types(kernel):
    _, functions = stub(kernel)
    for name, node in functions.items():
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        if "." in name:
            args = args[1:]  # self
        assert node.returns and all(a.annotation for a in args), f"{kernel}.pyi: {name}"
