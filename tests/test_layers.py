"""The layering stated in each subpackage's docstring, checked from the code's own imports."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parent.parent / "src" / "gradsweep"
SHARED = {"gradsweep", "gradsweep.errors", "gradsweep.names", "gradsweep.checks", "gradsweep.paths",
          "gradsweep.locks", "gradsweep.labels"}
THIRD_PARTY = ("mlflow", "hydra", "hydra_plugins", "omegaconf", "optuna", "torch", "matplotlib", "sqlalchemy")

# layer -> (gradsweep layers it may import, third-party packages it must never import)
RULES = {
    "train": ((), ("mlflow", "hydra", "hydra_plugins", "omegaconf", "optuna", "matplotlib", "sqlalchemy")),
    "track": ((), ("torch", "hydra", "hydra_plugins", "omegaconf", "optuna", "matplotlib")),
    "report": (("train", "track"), ("hydra", "hydra_plugins", "omegaconf", "optuna")),
    "run": (("train", "track", "report"), ("hydra", "hydra_plugins", "omegaconf", "optuna")),
    "sweep": (("train", "track", "report", "run"), ()),
    # re-runs the studies (train.py processes) and regenerates docs/studies.md: each library through its layer
    "studies": (("train", "track", "report", "run", "sweep"), THIRD_PARTY),
    "cli": (("train", "track", "report", "run", "sweep", "studies"), ()),
    "api": (("train", "track", "report", "run"), ("hydra", "hydra_plugins", "omegaconf", "optuna")),
    # the fence around other libraries' private parts: below every layer, imports none of them
    "compat": ((), ("torch", "mlflow", "matplotlib", "sqlalchemy")),
}
#: what importing a compat module amounts to: the library it wraps (so the train layer cannot reach
#: Hydra through gradsweep.compat.hydra). A new compat module must be listed here.
COMPAT_LIBS = {"gradsweep.compat.hydra": ("hydra", "omegaconf"), "gradsweep.compat.optuna": ("optuna", "hydra_plugins"),
               "gradsweep.compat.submitit": ("submitit",), "gradsweep.compat.cpython": ()}
FACADE = "gradsweep.api"  #: the package's own __init__ re-exports the public API (imported on first use)


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


MODULES = sorted(PKG.rglob("*.py"))
NAMES = {module_name(p) for p in MODULES}
#: a module named in a string: "gradsweep.report.figures", "gradsweep.report.figures:run_figure_hook",
#: "gradsweep.sweep.optuna_sweeper.GradsweepOptunaSweeper" (imported at run time: importlib, Hydra's _target_)
DOTTED = re.compile(r"^(gradsweep(?:\.\w+)+)(?::\w+)?$")
#: string imports that break the layering, known and to be removed. The test fails on any other,
#: and on one of these once it is gone (then drop it here).
KNOWN_UPWARD: dict[str, set[str]] = {}


def string_imports(path: Path) -> set[str]:
    """The gradsweep modules a module names in string constants (the longest existing module prefix)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := DOTTED.match(node.value)):
            name = m[1]
            while name.count(".") and name not in NAMES:
                name = name.rpartition(".")[0]
            if name in NAMES and name != "gradsweep":
                found.add(name)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_layer_imports_only_downward(path):
    name = module_name(path)
    layer = name.split(".")[1] if name.count(".") >= 1 else None
    found = imports(path)
    ours = {m for m in found if m.startswith("gradsweep.")}
    if name == "gradsweep":
        assert ours <= {FACADE}, ours
        assert FACADE not in imports(path, top_level_only=True), "import gradsweep must stay light"
        return
    if layer not in RULES:  # a shared module: imports no layer
        assert all(".".join(m.split(".")[:2]) in SHARED for m in ours), (name, ours)
        assert not any(m.split(".")[0] in THIRD_PARTY for m in found), (name, found)
        return
    allowed, forbidden = RULES[layer]
    for m in ours:
        top = ".".join(m.split(".")[:2])
        if top in SHARED:
            continue
        if top == "gradsweep.compat" and layer != "compat":  # every layer may use the fence, as the library itself
            wrapped = ".".join(m.split(".")[:3])
            assert wrapped in COMPAT_LIBS, f"{name} imports {m}: not a module listed in COMPAT_LIBS"
            found |= set(COMPAT_LIBS[wrapped])
            continue
        other = m.split(".")[1]
        assert other == layer or other in allowed, f"{name} imports {m}: layer {layer} may import {allowed}"
    named = {m for m in string_imports(path) if m.count(".") >= 1 and ".".join(m.split(".")[:2]) not in SHARED}
    upward = {m for m in named if m.split(".")[1] != layer and m.split(".")[1] not in allowed}
    assert upward == KNOWN_UPWARD.get(name, set()), \
        f"{name} names {sorted(upward)} in strings (imported at run time): layer {layer} may import {allowed}"
    bad = sorted(m for m in found if m.split(".")[0] in forbidden)
    assert not bad, f"{name} imports {bad}"


def test_no_import_cycles_between_modules():
    """Module-level imports form no cycle (deferred imports inside functions are not counted)."""
    names = {module_name(p): p for p in MODULES}
    graph = {}
    for name, path in names.items():
        deps = set()
        for m in imports(path, top_level_only=True):
            while m and m not in names:
                m = m.rpartition(".")[0]
            if m and m != name and m != "gradsweep":
                deps.add(m)
        graph[name] = deps
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_every_subpackage_states_its_contract():
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init.parent.name}/__init__.py does not say what it may import"


@pytest.mark.integration  # a fresh interpreter
def test_training_layer_imports_without_mlflow_or_hydra():
    """Importing every training module in a fresh interpreter loads none of the tracking or sweep stack."""
    import subprocess
    import sys

    mods = [module_name(p) for p in sorted((PKG / "train").glob("*.py"))]
    code = (f"import sys; import {', '.join(mods)}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'hydra', 'omegaconf', 'optuna')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compat_lists_every_module_it_holds():
    assert {module_name(p) for p in (PKG / "compat").glob("[!_]*.py")} == set(COMPAT_LIBS)


# ------------------------------------------------------------------ private parts stay in compat
#: underscored attributes that are not another library's private parts, and why
NOT_PRIVATE = {
    "_replace": "namedtuple's documented method",
    "_exit": "os._exit: documented, ends a process at once (see its comments)",
    "_writer": "gradsweep's own RunJournal, set in its own classmethod",
}
#: torch's foreach operations are documented in torch's API reference (beta), not private
DOCUMENTED_PREFIXES = ("_foreach_",)
#: the text of a private module's path in a string (a logger name, an import path)
PRIVATE_PATH = re.compile(r"\b(?:hydra|hydra_plugins|optuna|submitit)(?:\.\w+)*\._(?!_)\w+")


def private_uses(path: Path) -> list[str]:
    """Another library's private parts a module reaches: an underscored module in an import or a
    string, an underscored attribute of anything but ``self``, ``cls`` or ``super()`` (a subclass's
    own and inherited methods: the inherited ones are listed in compat, e.g.
    ``gradsweep.compat.optuna.PLUGIN_METHODS``), and ``_config_keys_`` aside."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.relative_to(PKG.parent)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                mods += [f"{node.module}.{a.name}" for a in node.names]
            for m in mods:
                if not m.startswith("gradsweep") and any(p.startswith("_") and not p.startswith("__")
                                                         for p in m.split(".")):
                    found.append(f"{where}: imports {m}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.endswith("_"):
            base = node.value
            if (isinstance(base, ast.Name) and base.id in ("self", "cls")) or \
                    (isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super"):
                continue
            if node.attr in NOT_PRIVATE or node.attr.startswith(DOCUMENTED_PREFIXES):
                continue
            found.append(f"{where}: {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and PRIVATE_PATH.search(node.value):
            found.append(f"{where}: names {PRIVATE_PATH.search(node.value)[0]!r}")
    return found


def test_private_parts_of_other_libraries_are_reached_only_through_compat():
    """Hydra's ``_internal``, the Optuna plugin's ``_impl``, ``trial._trial_id``, ``threading._shutdown``,
    ``atexit._run_exitfuncs``, ... are named in ``gradsweep/compat/`` and nowhere else (the package and
    its Hydra plugins), so an upgrade that breaks one is found by tests/test_compat.py."""
    sources = [p for p in sorted(PKG.parent.rglob("*.py")) if "compat" not in p.relative_to(PKG.parent).parts[:2]]
    assert any("hydra_plugins" in p.parts for p in sources)
    found = [use for p in sources for use in private_uses(p)]
    assert not found, "private parts of other libraries outside gradsweep/compat/:\n" + "\n".join(found)
