"""The tree's layers hold: library <- actors <- RL parts <- job parts <- jobs <- orchestrators (the Serve apps on the
library alone), and above the package bench/ and experiments/, which share tools/ and import neither each other nor
upward; no circles, no private names borrowed across modules. A job never imports another job: the SFT and reward
stages that other jobs start from are run for them by `prerequisites`, and only orchestrators compose jobs. In tests/,
no module imports conftest (shared helpers are in tests/helpers.py). Every import is read with `ast`, those inside
functions too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("rlhf_cluster", "bench", "experiments", "tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SUBPACKAGES = {"rlhf_cluster.lib": "library", "rlhf_cluster.actors": "actors", "rlhf_cluster.rl": "rl",
               "rlhf_cluster.serve": "serve"}


# the package's top-level modules, by what they are (a new one must be placed here)
TOP_LEVEL = {
    "rlhf_cluster": "library", "rlhf_cluster.scaffold": "job parts", "rlhf_cluster.stages": "job parts",
    "rlhf_cluster.sft": "stage jobs", "rlhf_cluster.reward": "stage jobs",  # what prerequisites runs
    "rlhf_cluster.prerequisites": "prerequisites",
    "rlhf_cluster.dpo": "jobs", "rlhf_cluster.evaluate": "jobs", "rlhf_cluster.ppo": "jobs",
    # rejection sampling's rounds may be PPO rounds (Llama 2's schedule), so it composes the PPO job
    "rlhf_cluster.rejection_sampling": "orchestrators", "rlhf_cluster.pipeline": "orchestrators",
    "rlhf_cluster.feedback_round": "orchestrators",
}
JOB_LAYERS = ("stage jobs", "jobs")


def layer(module: str) -> str:
    for prefix, name in SUBPACKAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            return name
    if module.startswith("rlhf_cluster"):
        return TOP_LEVEL.get(module, "unplaced")
    return module.split(".")[0]  # bench, experiments, tools


# what each layer may import from the project (itself included; a job never another job: test below)
BELOW_JOBS = {"library", "actors", "rl", "job parts"}
ALLOWED = {
    "library": {"library"},
    "actors": {"library", "actors"},
    "rl": {"library", "actors", "rl"},
    "serve": {"library", "serve"},
    "job parts": {"library", "actors", "rl", "job parts"},
    "stage jobs": BELOW_JOBS,
    "prerequisites": BELOW_JOBS | {"stage jobs"},
    "jobs": BELOW_JOBS | {"prerequisites"},
    "orchestrators": BELOW_JOBS | {"stage jobs", "prerequisites", "jobs", "orchestrators"},
    "bench": {"library", "actors", "rl", "serve", "job parts", "stage jobs", "prerequisites", "jobs", "orchestrators",
              "tools", "bench"},
    "experiments": {"library", "actors", "rl", "job parts", "stage jobs", "prerequisites", "jobs", "orchestrators",
                    "tools", "experiments"},
    "tools": {"tools"},
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


def test_every_top_level_module_is_placed_and_no_job_imports_another():
    mods = modules()
    unplaced = [m for m in mods if layer(m) == "unplaced"]
    assert not unplaced, f"place these modules in TOP_LEVEL: {unplaced}"
    bad = [f"{mods[m].relative_to(REPO)}:{line}: job {m} imports job {t}" for m in mods if layer(m) in JOB_LAYERS
           for line, t, _ in project_imports(mods[m]) if layer(t) in JOB_LAYERS and t != m]
    assert not bad, "a job runs no other job (prerequisites or an orchestrator does):\n" + "\n".join(bad)


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


def test_the_reward_models_code_needs_no_server():
    """A reward model's code and the reward service's bodies run outside a replica (bench/, the tests), so they
    import neither Ray Serve nor FastAPI; rlhf_cluster/serve/reward_app.py serves them."""
    for name in ("reward_model", "reward_schemas"):
        tree = ast.parse((REPO / "rlhf_cluster" / "serve" / f"{name}.py").read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        server = [m for m in imported if m.split(".")[0] in ("ray", "fastapi", "starlette")]
        assert not server, f"rlhf_cluster/serve/{name}.py imports {server}"


def conftest_imports(path: Path) -> list[int]:
    """The lines of `path` that import a conftest module (`import conftest`, `from tests.conftest import x`,
    `from tests import conftest`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module or ''}.{a.name}" for a in node.names]
        else:
            continue
        if any(n.rpartition(".")[2] == "conftest" for n in names):
            found.append(node.lineno)
    return found


def test_no_test_module_imports_conftest(tmp_path):
    """pytest imports tests/conftest.py as the module `conftest`: importing it again as tests.conftest runs a second
    copy of it. Fixtures come from pytest, plain helpers from tests/helpers.py."""
    bad = [f"{p.relative_to(REPO)}:{line}" for p in sorted((REPO / "tests").rglob("*.py"))
           for line in conftest_imports(p)]
    assert not bad, "imports of conftest (take the helper from tests/helpers.py):\n" + "\n".join(bad)
    probe = tmp_path / "test_probe.py"  # the walk is not vacuous
    probe.write_text("import conftest\nfrom tests.conftest import f\nfrom tests import conftest\n"
                     "from tests.helpers import f\ndef g():\n    from conftest import h\n")
    assert conftest_imports(probe) == [1, 2, 3, 6]
