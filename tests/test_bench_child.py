"""The line-driven child of the GPU transfer benchmarks (their GPU parts need CUDA; this does not)."""

from __future__ import annotations

import pytest
from splitserve.bench.lab.child import LineChild

ECHO = "import sys\nprint('READY', flush=True)\nfor line in sys.stdin:\n    print(line.strip().upper(), flush=True)"


def test_a_child_answers_line_by_line_and_exits_at_end_of_input():
    child = LineChild(ECHO, what="echo")
    assert child.read().strip() == "READY"
    child.send("abc")
    assert child.read().strip() == "ABC"
    child.close()
    assert child.proc.returncode == 0


def test_a_dead_child_is_named():
    child = LineChild("raise SystemExit(3)", what="receiver")
    with pytest.raises(RuntimeError, match="the receiver process died"):
        child.read()
    child.close()
