"""The tree's layers hold: library <- actors <- RL parts <- jobs (the Serve apps on the library alone), no import
upward, no circles, no private names borrowed across modules. Every import is read with `ast`, those inside
functions too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("rlhf_cluster", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SUBPACKAGES = {"rlhf_cluster.lib": "library", "rlhf_cluster.actors": "actors", "rlhf_cluster.rl": "rl",
               "rlhf_cluster.serve": "serve"}


def layer(module: str) -> str:
    for prefix, name in SUBPACKAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            return name
    if module.startswith("rlhf_cluster"):
        return "jobs"
    return module.split(".")[0]  # bench


# what each layer may import from the project (itself included)
ALLOWED = {
    "library": {"library"},
    "actors": {"library", "actors"},
    "rl": {"library", "actors", "rl"},
    "serve": {"library", "serve"},
    "jobs": {"library", "actors", "rl", "jobs"},
    "bench": {"library", "actors", "rl", "serve", "jobs", "bench"},
}


def project_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every import of a project module in `path`."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from pkg import mod` imports the module pkg.mod
            sub = [f"{base}.{n}" for n in names if (REPO / Path(*f"{base}.{n}".split("."))).with_suffix(".py").exists()]
            found += [(node.lineno, m, []) for m in sub] or [(node.lineno, base, names)]
    return [(line, m, names) for line, m, names in found if m.split(".")[0] in PACKAGES]


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def test_no_import_runs_up_a_layer():
    bad = []
    for module, path in modules().items():
        for line, target, _ in project_imports(path):
            if layer(target) not in ALLOWED[layer(module)]:
                bad.append(f"{path.relative_to(REPO)}:{line}: {layer(module)} imports {layer(target)} ({target})")
    assert not bad, "imports that run up a layer:\n" + "\n".join(bad)


def test_no_import_circles():
    mods = modules()
    graph = {m: {t for _, t, _ in project_imports(p) if t in mods and t != m} for m, p in mods.items()}
    for pkg in [m for m in mods if mods[m].name == "__init__.py"]:  # a package's __init__ is no dependency edge
        for deps in graph.values():
            deps.discard(pkg)
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for path in modules().values():
        for line, target, names in project_imports(path):
            bad += [f"{path.relative_to(REPO)}:{line}: {target}.{n}" for n in names if n.startswith("_")]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk is not vacuous: a library module importing a job is found."""
    lib = tmp_path / "rlhf_cluster" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "rlhf_cluster" / "ppo.py").write_text("")
    (lib / "bad.py").write_text("def f():\n    from rlhf_cluster import ppo\n"
                                "    from rlhf_cluster.actors.group import _x\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    imports = project_imports(lib / "bad.py")
    assert (2, "rlhf_cluster.ppo", []) in imports
    assert layer("rlhf_cluster.ppo") not in ALLOWED[layer(module_name(lib / "bad.py"))]
    assert any(n == ["_x"] for _, _, n in imports)
