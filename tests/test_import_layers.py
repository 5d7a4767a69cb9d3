"""Product and laboratory apart, read from the imports (every ``import``, lazy ones included):

- the serving runtime (router, workers, engine, kernels, KV transfer, operator, launcher, trust,
  the wire protocol, the ``splitserve`` command itself) never imports the benchmarks
  (``splitserve.bench``), the simulator (``splitserve.sim``) or the test doubles
  (``splitserve.testing``); they may import it;
- the test doubles are imported only by the tests and the benchmarks;
- a benchmark that is no user command (no ``splitserve bench ...`` reaches it) is a laboratory
  script in ``bench/lab/``, which is not installed: only the benchmarks and the tests import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ("protocol", "engine", "kernels", "kvtransfer", "prefill", "decode", "router", "operator",
           "launcher", "trust", "cli.py", "__init__.py")
TOOLS = ("bench", "sim")  # measurement tools: `splitserve bench ...`, `splitserve sim ...`
NOT_PACKAGE = (".venv", ".git", "tests", "charts", "docker", "scripts")


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (``splitserve.router.app``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in NOT_PACKAGE:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(["splitserve", *parts])] = path
    return found


def _imports(path: Path) -> set[str]:
    """The splitserve modules a file imports (``from a import b`` counts as a.b when a.b exists)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] == "splitserve"}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _area(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def _importers(target: str, modules: dict[str, Path]) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): n for p in modules.values()
            for n in _imports(p) if _within(n, target)}


def test_the_runtime_imports_no_benchmark_simulator_or_test_double():
    modules = _modules()
    wrong = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p)
                                              if any(_within(n, f"splitserve.{t}")
                                                     for t in (*TOOLS, "testing")))
             for p in modules.values() if _area(p) in RUNTIME}
    assert {f: names for f, names in wrong.items() if names} == {}


def test_test_doubles_are_imported_only_by_tests_and_benchmarks():
    modules = _modules()
    users = _importers("splitserve.testing", modules)
    assert {f for f in users if _area(ROOT / f) not in ("testing", "bench")} == set()
    assert users, "the scan found no user of splitserve.testing: it reads nothing"


def _reached_from(start: str, modules: dict[str, Path]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        todo.extend(_imports(modules[name]))
    return seen


def test_laboratory_benchmarks_are_bench_lab_and_only_benchmarks_and_tests_import_them():
    """bench/lab/ holds exactly the benchmarks no ``splitserve bench`` command reaches."""
    modules = _modules()
    commands = _reached_from("splitserve.bench.cli", modules)
    bench = {n for n in modules if _within(n, "splitserve.bench")}
    lab = {n for n in bench if _within(n, "splitserve.bench.lab")}
    assert {n for n in bench if n not in commands} == lab
    assert "splitserve.bench.lab.kernels" in lab and "splitserve.bench.workloads" in commands
    wrong = {f: n for f, n in ((str(p.relative_to(ROOT)), _imports(p)) for p in modules.values()
                               if _area(p) != "bench")
             if n & lab}
    assert wrong == {}


def test_the_laboratory_is_not_installed():
    """pyproject installs bench/'s user commands, not bench/lab/ (it runs from a checkout)."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "splitserve.bench" in packages and "splitserve.testing" in packages
    assert not [p for p in packages if _within(p, "splitserve.bench.lab")]


def test_every_package_but_the_laboratory_is_installed():
    """A built wheel (the images' `pip install .`) holds every package of the tree: pyproject
    lists them one by one, so a new folder with an __init__.py must be added there too."""
    import tomllib

    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tops = [d for d in ROOT.iterdir() if (d / "__init__.py").is_file() and d.name != "tests"]
    found = {"splitserve." + ".".join(init.parent.relative_to(ROOT).parts)
             for top in tops for init in top.rglob("__init__.py")}
    assert found - packages == {"splitserve.bench.lab"}
