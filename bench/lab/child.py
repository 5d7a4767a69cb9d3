"""The other side of a GPU transfer benchmark, in a child process (its own CUDA context, as a
real peer worker has), driven one line at a time over its stdin and stdout."""

from __future__ import annotations

import subprocess

from splitserve.launcher.processes import python_command


class LineChild:
    """``python -c code *args``; ``send`` writes a line, ``read`` waits for one."""

    def __init__(self, code: str, *args: str, what: str) -> None:
        self.what = what
        self.proc = subprocess.Popen(
            [*python_command("-c"), code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> str:
        """The child's next line; RuntimeError once it has died."""
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.what} process died")
        return line

    def close(self) -> None:
        """End of input: the child finishes and exits (killed if it has not within 30 s)."""
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
