"""No process of the project runs with the repository root on ``sys.path`` (issue 13).

Every top-level folder here (``kernels``, ``router``, ``engine``, ...) is also a name an
installed distribution may use: transformers imports Hugging Face's ``kernels`` package, and
with the repository root on ``sys.path`` our ``kernels/`` would shadow it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from splitserve.launcher.processes import Component, python_command

REPO = Path(__file__).resolve().parent.parent


def test_the_test_process_does_not_have_the_repository_root_on_sys_path() -> None:
    roots = [p for p in sys.path if p and Path(p).resolve() == REPO]
    assert not roots, f"the repository root is on sys.path: {sys.path}"


def test_a_child_the_project_starts_from_the_repository_root_imports_installed_kernels() -> None:
    """The child runs with the repository root as its working directory and without
    PYTHONSAFEPATH in its environment: only the project's own ``-P`` keeps our ``kernels/`` from
    shadowing the installed ``kernels`` distribution that transformers depends on."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    code = "import kernels, transformers; print(kernels.__file__)"
    got = subprocess.run(python_command("-c", code), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert got.returncode == 0, got.stderr[-3000:]
    imported = Path(got.stdout.strip().splitlines()[-1]).resolve()
    assert imported.parent != REPO / "kernels", f"our kernels/ shadowed the installed one: {imported}"


def test_launched_components_run_in_safe_path_mode() -> None:
    cmd = Component("router", ["router", "--help"], "http://127.0.0.1:1/health").command
    assert cmd[:3] == [sys.executable, "-P", "-m"], cmd
