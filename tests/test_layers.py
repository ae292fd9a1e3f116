"""The import direction over the whole tree, read from the source (ast), not from what happened to load.

    pure core   advisor/ except the edges below: stdlib, numpy, pydantic/fastapi/sqlalchemy at the API
                and job layers; never torch & co., never the torch edge, never calibration
    edges       advisor/stack/ (the torch edge), advisor/simulated/ (the referee), advisor/jobs/train.py
                (the training process) and advisor/jobs/measure.py (what it measures), advisor/jobs/tiny.py
                (writes a tiny real model)
    outside     calibration/, bench/, tools/ may import anything of the above

Checked: (1) a core module imports no forbidden module, neither at module level nor inside a
function, except the call sites in ALLOWED (each with its reason); (2) what a core module imports
at module level, followed through the repository's own modules, reaches no heavy library (so the
server answers without the train extra); the same for the edges' torch-free modules; (3) the edges
point one way: stack below simulated, neither imports calibration.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("advisor", "calibration", "bench", "tools")
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "sklearn")
FORBIDDEN_IN_CORE = (*HEAVY, "advisor.stack", "advisor.simulated", "calibration")

#: torch edges inside advisor/ (module names; a package name covers its submodules)
EDGES = ("advisor.stack", "advisor.simulated", "advisor.jobs.train", "advisor.jobs.measure", "advisor.jobs.tiny")
#: edge modules that must import without the train extra (the service imports them, lazily or not)
TORCH_FREE = (
    "advisor.stack",  # the package __init__
    "advisor.stack.outcomes",
    "advisor.stack.targets",
    "advisor.simulated",
    "advisor.simulated.results",
    "advisor.simulated.cache",
    "advisor.simulated.runner",
    "advisor.simulated.estimator",
    "advisor.jobs.train",  # the job manager imports its file-name constants
    "advisor.jobs.measure",  # train.py imports it at module level
)
#: (importing module, function, imported module) -> why a core module may import it lazily there
ALLOWED: dict[tuple[str, str, str], str] = {
    ("advisor.service", "AdvisorService.simulated", "advisor.simulated"): (
        "the simulated source is opt-in per request; its estimator imports no torch until a trace runs"
    ),
    ("advisor.service", "AdvisorService.recommend", "advisor.simulated"): (
        "simulate_top: trace the top plans when the request asks for it"
    ),
    ("advisor.calibrate_cli", "cmd_calibrate", "calibration"): (
        "`advisor calibrate` runs calibration: imported when the command runs, with a clear error without the extra"
    ),
    ("advisor.api.background", "Calibrations.start", "advisor.stack"): (
        "POST /v1/calibrations resolves the device before it queues the run (503 without the calibrate extra)"
    ),
    ("advisor.api.background", "Calibrations._work", "calibration"): (
        "POST /v1/calibrations runs the calibration in the server's background thread (the calibrate extra)"
    ),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # what it imports (for `from a import b`: a.b when a.b is a module, else a)
    function: str | None  # the enclosing function (qualified), None at module level
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> list[Import]:
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, scope: list[str], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:  # the else branch runs
                    visit(ast.Module(body=[sub], type_ignores=[]), scope, in_function)
                continue
            fn = ".".join(scope) if in_function else None
            if isinstance(child, ast.Import):
                out.extend(Import(mod, a.name, fn, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append(Import(mod, sub if _is_module(sub) else base, fn, child.lineno))
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, [*scope, child.name], True)
            elif isinstance(child, ast.ClassDef):
                visit(child, [*scope, child.name], in_function)
            else:
                visit(child, scope, in_function)

    visit(ast.parse(path.read_text(), filename=str(path)), [], False)
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if name == p or name.startswith(p + ".")), None)


def _files() -> list[Path]:
    return sorted(p for tree in TREES for p in (ROOT / tree).rglob("*.py") if "__pycache__" not in p.parts)


IMPORTS = {module_name(p): imports_of(p) for p in _files()}
CORE = sorted(m for m in IMPORTS if _under(m, ("advisor",)) and not _under(m, EDGES))


def core_violations(imports: dict[str, list[Import]]) -> list[str]:
    bad = []
    for mod, found in imports.items():
        if not _under(mod, ("advisor",)) or _under(mod, EDGES):
            continue
        for imp in found:
            hit = _under(imp.target, FORBIDDEN_IN_CORE)
            if hit is None:
                continue
            if imp.function is not None and (mod, imp.function, hit) in ALLOWED:
                continue
            where = f"{imp.function}()" if imp.function else "module level"
            bad.append(f"{mod}:{imp.line} imports {imp.target} ({where})")
    return bad


def module_level_closure(start: str, imports: dict[str, list[Import]]) -> dict[str, str]:
    """Every module `start` loads at import time (ours followed, others as leaves) -> who imports it."""
    seen: dict[str, str] = {start: ""}
    todo = [start]
    while todo:
        mod = todo.pop()
        names = [i.target for i in imports.get(mod, []) if i.function is None]
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        parents = [".".join(mod.split(".")[:k]) for k in range(1, mod.count(".") + 1)]
        for name in [*names, *parents]:
            for n in [".".join(name.split(".")[: k + 1]) for k in range(name.count(".") + 1)]:
                if n not in seen:
                    seen[n] = mod
                    if n in imports:
                        todo.append(n)
    return seen


def test_the_tree_was_read():
    assert len(IMPORTS) > 50 and "advisor.service" in CORE and "advisor.stack.build" not in CORE
    assert any(i.function for i in IMPORTS["advisor.service"])  # function-level imports are seen too


def test_core_never_imports_the_torch_edge_or_calibration():
    assert core_violations(IMPORTS) == []


def test_every_allowed_lazy_import_is_still_there():
    """A stale allow-list entry would silently allow a future import at that site."""
    present = {(i.module, i.function, _under(i.target, FORBIDDEN_IN_CORE)) for found in IMPORTS.values() for i in found}
    assert set(ALLOWED) <= present, set(ALLOWED) - present


@pytest.mark.parametrize("mod", [*CORE, *TORCH_FREE])
def test_module_level_imports_reach_no_heavy_library(mod):
    closure = module_level_closure(mod, IMPORTS)
    heavy = {n: via for n, via in closure.items() if _under(n, HEAVY)}
    assert not heavy, f"{mod} loads {sorted(heavy)} at import time (via {sorted(set(heavy.values()))})"


def test_edges_point_one_way():
    rules = {
        "advisor.stack": ("advisor.simulated", "calibration", "advisor.jobs", "bench", "tools"),
        "advisor.simulated": ("calibration", "advisor.jobs", "bench", "tools"),
        "advisor.jobs.train": ("calibration", "advisor.simulated"),
        "advisor.jobs.measure": ("calibration", "advisor.simulated"),
        "advisor.jobs.tiny": ("calibration", "advisor.simulated"),
    }
    bad = [
        f"{i.module}:{i.line} imports {i.target}"
        for mod, found in IMPORTS.items()
        for edge, banned in rules.items()
        if _under(mod, (edge,))
        for i in found
        if _under(i.target, banned)
    ]
    assert bad == []


def test_a_new_violation_is_caught(tmp_path):
    """The checker itself: a lazy torch import in a core module, and a module-level one, both fail."""
    f = tmp_path / "probe.py"
    f.write_text("import json\n\n\ndef f():\n    import torch\n    from calibration import trial\n")
    fake = [Import("advisor.cost", i.target, i.function, i.line) for i in imports_of_text(f)]
    found = core_violations({**IMPORTS, "advisor.cost": IMPORTS["advisor.cost"] + fake})
    assert [v.split(":")[0] for v in found if v.startswith("advisor.cost:")] == ["advisor.cost"] * 2
    top = [Import("advisor.units", "advisor.jobs.train", None, 1)]
    train_heavy = [Import("advisor.jobs.train", "torch", None, 1)]
    closure = module_level_closure(
        "advisor.units", {**IMPORTS, "advisor.units": top, "advisor.jobs.train": train_heavy}
    )
    assert "torch" in closure  # reached through a module-level import of an edge


def imports_of_text(path: Path) -> list[Import]:
    """imports_of for a file outside the tree (named as if it were advisor/probe.py)."""
    target = ROOT / "advisor" / "probe.py"
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(module_name(target), a.name, "f", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [Import(module_name(target), node.module or "", "f", node.lineno)]
    return out
