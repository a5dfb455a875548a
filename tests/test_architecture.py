"""The import arrows DESIGN.md allows between the layers (read from the sources), and the public API as the
only door for the model, the integrations and the benchmarks."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import flagdit_kernels as fk

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flagdit_kernels"
# Subpackages of flagdit_kernels that code above the kernels may import besides the top-level names (the
# reference is the spec the tests check kernels against, not an API for the model).
PUBLIC_SUBPACKAGES = ("nn", "integrations", "bench")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, list[str], bool]]:
    """(absolute module, imported names, at module level) of every import statement in ``path``."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((module, [alias.name for alias in node.names], id(node) in top_level))
    return out


def _targets(module: str, names: list[str]) -> list[str]:
    """The modules an import statement may reach: ``from a import b`` reaches a and, if b is a module, a.b."""
    return [module] + [f"{module}.{n}" for n in names]


def _sources(*parts: str) -> list[pathlib.Path]:
    return sorted(ROOT.joinpath(*parts).rglob("*.py"))


def _reaches(path: pathlib.Path, forbidden: tuple[str, ...]) -> list[str]:
    hits = []
    for module, names, _ in _imports(path):
        for target in _targets(module, names):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                hits.append(target)
    return hits


@pytest.mark.parametrize("path", _sources("flagdit_kernels", "reference"), ids=lambda p: p.name)
def test_reference_imports_no_kernels(path):
    """The reference is the standalone spec: torch, itself and the package's conventions (plain constants and
    shape rules every layer shares, see the next test) only."""
    allowed = ("flagdit_kernels.reference", "flagdit_kernels._conventions", "torch", "math", "itertools")
    allowed += ("dataclasses", "__future__")
    bad = [m for m, _, _ in _imports(path) if not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert not bad, f"{path.name} imports {bad}"


def test_the_conventions_sit_below_every_layer():
    """``_conventions`` is read by the reference, the ops, nn, the benchmarks and the tools: it imports nothing."""
    assert [m for m, _, _ in _imports(PACKAGE / "_conventions.py")] == ["__future__"]


@pytest.mark.parametrize("path", _sources("flagdit_kernels", "triton"), ids=lambda p: p.name)
def test_kernels_know_no_autograd_or_dispatch(path):
    layers = ("flagdit_kernels.ops", "flagdit_kernels._dispatch", "flagdit_kernels.nn", "flagdit_kernels.integrations")
    forbidden = (*layers, "flagdit_kernels.bench", "torch.autograd", "torch.library")
    assert not _reaches(path, forbidden)


# diffusers' attention dispatcher is a registry to add to: the one module that does imports diffusers on first
# use, inside its functions, so importing the integrations still needs no diffusers.
DIFFUSERS_ON_FIRST_USE = (PACKAGE / "integrations" / "diffusers_attention.py",)


@pytest.mark.parametrize("path", _sources("flagdit_kernels"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_kernel_package_never_imports_the_model_or_diffusers(path):
    assert not _reaches(path, ("flagdit",))
    if path in DIFFUSERS_ON_FIRST_USE:
        top_level = [m for m, _, at_top in _imports(path) if at_top and m.split(".")[0] == "diffusers"]
        assert not top_level, f"{path.name} imports diffusers at module level"
    else:
        assert not _reaches(path, ("diffusers",))


# A layer may import the ones below it, never one above; the reference is the spec the ops and the tests check
# against, not an API, so the layers above the ops (nn, integrations, bench) never import it.
LAYERS = {
    "ops": ("flagdit_kernels.nn", "flagdit_kernels.integrations", "flagdit_kernels.bench"),
    "nn.py": ("flagdit_kernels.integrations", "flagdit_kernels.bench", "flagdit_kernels.reference"),
    "integrations": ("flagdit_kernels.bench", "flagdit_kernels.ops", "flagdit_kernels.triton"),
    "bench": ("flagdit_kernels.reference",),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_downwards(layer):
    paths = [PACKAGE / layer] if layer.endswith(".py") else _sources("flagdit_kernels", layer)
    for path in paths:
        assert not _reaches(path, LAYERS[layer]), path


@pytest.mark.parametrize(
    "path",
    [p for p in _sources("flagdit_kernels") if p.relative_to(PACKAGE).parts[0] != "tools"],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_nothing_in_the_package_imports_the_tools(path):
    """The compile reports in tools/ sit on top of the kernels and ops they read (and may import any of them);
    nothing in the package imports them, so they add nothing to importing it."""
    assert not _reaches(path, ("flagdit_kernels.tools",))


@pytest.mark.parametrize(
    "path",
    [*_sources("flagdit"), *_sources("benchmarks"), *_sources("flagdit_kernels", "integrations")],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_public_api_is_the_only_door(path):
    """The model, the benchmarks and the integrations use ``flagdit_kernels``' exported names and public
    subpackages only (nothing private: no ops, triton, _dispatch, ...)."""
    public = set(fk.__all__)
    for module, names, _ in _imports(path):
        if module == "flagdit_kernels":
            assert set(names) <= public | set(PUBLIC_SUBPACKAGES), (path, names)
        elif module.startswith("flagdit_kernels."):
            assert module.split(".")[1] in PUBLIC_SUBPACKAGES, (path, module)


# The model library (flagdit) sits below its command lines (flagdit/cli: flagdit-train, flagdit-sample): code that
# trains or samples from Python uses the library, and nothing in it needs argparse, run directories or logs.
@pytest.mark.parametrize(
    "path",
    [p for p in _sources("flagdit") if p.relative_to(ROOT / "flagdit").parts[0] != "cli"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_model_library_never_imports_its_command_lines(path):
    assert not _reaches(path, ("flagdit.cli",))


def test_importing_the_kernels_loads_neither_the_model_nor_diffusers_nor_the_integrations_nor_the_tools():
    code = (
        "import sys, flagdit_kernels as fk, flagdit_kernels.nn, flagdit_kernels.bench.cli\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('flagdit', 'diffusers')]\n"
        "assert not loaded, loaded\n"
        "assert 'flagdit_kernels.integrations' not in sys.modules\n"
        "assert 'flagdit_kernels.tools' not in sys.modules\n"
        "assert fk.integrations.patch_rms_norm is not None  # imported on first use\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _package_modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in _sources("flagdit_kernels")}


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside a function (a deferred import still
    ties the two modules together). ``from pkg import mod`` is an arrow to ``pkg.mod`` only."""
    modules = _package_modules()
    graph = {}
    for name, path in modules.items():
        arrows = set()
        for module, names, _ in _imports(path):
            submodules = {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
            arrows |= submodules
            if module in modules and (not names or len(submodules) < len(names)):
                arrows.add(module)
        graph[name] = arrows - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                out.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# Cycles inside the attention code, left for the attention restructuring (issue 26, item 2) that moves these
# files: the Triton backend's registration at the end of ops/attention.py imports the backends, which import
# the op; the Gluon forward and its candidate chooser call each other. The test fails when one is gone, so the
# list only shrinks.
KNOWN_CYCLES = {
    frozenset({"flagdit_kernels.ops.attention", "flagdit_kernels.ops.attention_torch_flash"}),
    frozenset({"flagdit_kernels.triton.attention.candidates", "flagdit_kernels.triton.attention.gluon_fwd"}),
}


def test_the_package_has_no_import_cycle():
    cycles = set(_cycles(_import_graph()))
    new, fixed = cycles - KNOWN_CYCLES, KNOWN_CYCLES - cycles
    assert not new, f"import cycles: {[sorted(c) for c in new]}"
    assert not fixed, f"fixed, drop from KNOWN_CYCLES: {[sorted(c) for c in fixed]}"


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [frozenset({"a", "b", "c"})]


def _subpackage(module: str) -> str:
    """The room a module lives in: its subpackage (``ops``, ``bench``, ...), or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


@pytest.mark.parametrize("path", _sources("flagdit_kernels"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_crosses_a_subpackage(path):
    """A ``_name`` is private to its subpackage: code elsewhere in the package imports public names (private
    modules such as ``_dispatch`` or ``_conventions`` are shared on purpose; their names are public)."""
    modules = _package_modules()
    here = _subpackage(_module_name(path))
    bad = [
        f"{module}.{n}"
        for module, names, _ in _imports(path)
        if module.startswith("flagdit_kernels.") and _subpackage(module) != here
        for n in names
        if n.startswith("_") and f"{module}.{n}" not in modules
    ]
    assert not bad, f"{path.name} imports private {bad}"
