"""Every folder's imports point one way: router -> protocol <- workers -> engine -> kernels.

Read from the source (every ``import``, at module level or inside a function), each component
may import only the components below it. The engine is the engine only: it knows nothing of the
worker shell, the roles, the registry or the router. The router and the workers meet only in
``protocol`` (their messages) and ``discovery`` (the registry and heartbeat); both read the model
through ``modelfiles`` (torch-free). The router imports nothing of the engine, so a router process
never loads torch.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent

# component -> what it may import of splitserve besides itself
ALLOWED = {
    "protocol": set(),
    "modelfiles": set(),
    "discovery": {"trust"},
    "kvtransfer": {"trust"},
    "engine": {"protocol", "modelfiles", "kvtransfer", "kernels"},
    "worker": {"engine", "kvtransfer", "discovery", "protocol", "trust"},
    "prefill": {"worker", "engine", "kvtransfer", "protocol", "trust"},
    "decode": {"worker", "engine", "kvtransfer", "protocol", "trust"},
    "router": {"protocol", "modelfiles", "discovery", "trust", "cli"},
}


def _imported(path: Path) -> set[str]:
    """The ``splitserve.<component>[.<module>]`` names ``path`` imports, relative ones resolved."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ["splitserve", *parts[: len(parts) - node.level]] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names = [module] + ([f"{module}.{a.name}" for a in node.names] if not node.module else [])
        else:
            continue
        out |= {".".join(n.split(".")[1:3]) for n in names if n.startswith("splitserve.")}
    return out


def _violations(component: str) -> list[str]:
    allowed = ALLOWED[component]
    bad = []
    for path in sorted((PACKAGE / component).rglob("*.py")):
        for name in sorted(_imported(path)):
            top = name.split(".")[0]
            if top != component and top not in allowed:
                bad.append(f"{path.relative_to(PACKAGE)} imports splitserve.{name}")
    return bad


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_a_component_imports_only_what_lies_below_it(component):
    assert _violations(component) == []


def test_the_scan_finds_an_upward_import(tmp_path, monkeypatch):
    """The scan itself: absolute, relative and function-level imports are each found."""
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "a.py").write_text(
        "from splitserve.router.config import X\nfrom .. import worker\n"
        "def f():\n    import splitserve.discovery.registry\n")
    assert _violations("engine") == [
        "engine/a.py imports splitserve.discovery.registry",
        "engine/a.py imports splitserve.router.config",
        "engine/a.py imports splitserve.worker",
    ]


def _loaded_by(modules: str, unwanted: tuple[str, ...]) -> str:
    """Import every module of the given packages in a fresh interpreter; print the modules named
    ``unwanted`` (or under them) that came with them."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {modules!r}.split():\n"
        "    pkg = importlib.import_module(name)\n"
        "    for m in pkgutil.walk_packages(getattr(pkg, '__path__', []), name + '.'):\n"
        "        importlib.import_module(m.name)\n"
        f"print(sorted(m for m in sys.modules if m in {unwanted!r} or m.startswith({tuple(u + '.' for u in unwanted)!r})))"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONSAFEPATH="1"), check=True)
    return out.stdout.strip() + out.stderr


def test_a_router_process_loads_neither_torch_nor_the_engine():
    """Every module of ``splitserve.router``, and what it stands on."""
    assert _loaded_by("splitserve.router splitserve.discovery splitserve.protocol splitserve.modelfiles",
                      ("torch", "splitserve.engine", "splitserve.worker")) == "[]"


def test_the_worker_commands_load_no_torch():
    """``splitserve --help`` registers the worker commands: loading torch waits for one to run."""
    assert _loaded_by("splitserve.worker.options splitserve.worker.cli splitserve.prefill.cli splitserve.decode.cli",
                      ("torch", "splitserve.engine.engine", "splitserve.worker.shell")) == "[]"
