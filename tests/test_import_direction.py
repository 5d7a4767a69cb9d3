"""Every folder's imports point one way: router -> protocol <- workers -> engine -> kernels.

Read from the source (every ``import``, at module level or inside a function), each component
may import only the components below it. The engine is the engine only: it knows nothing of the
worker shell, the roles, the registry or the router. The router and the workers meet only in
``protocol`` (their messages) and ``discovery`` (the registry and heartbeat); the router reads the
model's tokenizer and config through ``engine.model_files`` (torch-free), and nothing else of the
engine, so a router process never loads torch.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent

# component -> what it may import of splitserve besides itself ("engine.model_files": that module only)
ALLOWED = {
    "protocol": set(),
    "discovery": {"trust"},
    "kvtransfer": {"trust"},
    "engine": {"protocol", "kvtransfer", "kernels"},
    "worker": {"engine", "kvtransfer", "discovery", "protocol", "trust"},
    "prefill": {"worker", "engine", "kvtransfer", "protocol", "trust"},
    "decode": {"worker", "engine", "kvtransfer", "protocol", "trust"},
    "router": {"protocol", "discovery", "trust", "cli", "engine.model_files"},
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
            if top != component and top not in allowed and name not in allowed:
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


def _loaded_by(modules: str) -> str:
    """Import every module of the given packages in a fresh interpreter; print what came with it
    that a torch-free process must not load."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {modules!r}.split():\n"
        "    pkg = importlib.import_module(name)\n"
        "    for m in pkgutil.walk_packages(getattr(pkg, '__path__', []), name + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'"
        " or m.startswith(('splitserve.engine.engine', 'splitserve.worker.shell'))))"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONSAFEPATH="1"), check=True)
    return out.stdout.strip() + out.stderr


def test_the_router_discovery_and_the_worker_commands_load_no_torch():
    """A router process (every module of ``splitserve.router``) and ``splitserve --help`` (the
    workers' command modules) never import torch or the engine."""
    assert _loaded_by("splitserve.router splitserve.discovery splitserve.protocol splitserve.worker.options "
                      "splitserve.worker.cli splitserve.prefill.cli splitserve.decode.cli") == "[]"
