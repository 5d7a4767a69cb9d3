"""The internal secret: where it comes from, and the keys and MACs derived from it.

Where from, in order: a file named by ``--internal-secret-file`` or ``SPLITSERVE_INTERNAL_SECRET_FILE``
(a mounted Kubernetes Secret, or the file ``splitserve up`` writes), else the value of
``SPLITSERVE_INTERNAL_SECRET`` (a Secret as an environment variable). Never a command-line value:
any local user can read a process's arguments in ``/proc/<pid>/cmdline``.

A MAC covers a purpose and a list of parts, each length-prefixed, so no two different lists
give the same bytes ("ab","c" vs "a","bc") and a MAC made for one purpose never verifies for
another (a KV proof is no registry MAC).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

ENV_FILE = "SPLITSERVE_INTERNAL_SECRET_FILE"
ENV_VALUE = "SPLITSERVE_INTERNAL_SECRET"
MIN_BYTES = 16  # shorter is guessable; generate_secret() gives 43 characters


class SecretError(ValueError):
    """A configured secret cannot be used (missing file, empty, too short); says which."""


class InternalSecret:
    """The shared secret of one deployment. Its value never appears in ``repr`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes) -> None:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        raw = raw.strip()
        if len(raw) < MIN_BYTES:
            raise SecretError(f"the internal secret must be at least {MIN_BYTES} bytes, got {len(raw)}")
        self._value = raw

    def __repr__(self) -> str:
        return "InternalSecret(<hidden>)"

    def key(self, purpose: str) -> bytes:
        """The key for one use (``http``, ``kv``, ``registry``): knowing one reveals no other."""
        return _derive(self._value, purpose)

    def sign(self, purpose: str, *parts: str | bytes) -> str:
        """Hex HMAC-SHA256 over ``parts`` under the key for ``purpose``."""
        return hmac.new(self.key(purpose), _encode(parts), hashlib.sha256).hexdigest()

    def verify(self, purpose: str, mac: object, *parts: str | bytes) -> bool:
        """Whether ``mac`` is :meth:`sign` of ``parts`` (constant-time; any non-string is False)."""
        return isinstance(mac, str) and hmac.compare_digest(mac.encode(), self.sign(purpose, *parts).encode())


@functools.lru_cache(maxsize=64)
def _derive(value: bytes, purpose: str) -> bytes:
    return hmac.new(value, b"splitserve/" + purpose.encode(), hashlib.sha256).digest()


def _encode(parts: tuple[str | bytes, ...]) -> bytes:
    out = bytearray()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def read_secret(
    path: str | None, *, file_env: str, value_env: str, what: str,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """A secret string from ``path`` (or the file named by ``file_env``), else from the variable
    ``value_env``; None when none is configured. A named file that cannot be read, or an empty
    one, is an error naming ``what``: a typo must not silently switch authentication off."""
    env = os.environ if environ is None else environ
    path = path or env.get(file_env) or None
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise SecretError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from exc
        if not value:
            raise SecretError(f"the {what} file {path} is empty")
        return value
    value = (env.get(value_env) or "").strip()
    return value or None


def load_internal_secret(
    path: str | None = None, environ: Mapping[str, str] | None = None
) -> InternalSecret | None:
    """The configured internal secret (see the module docstring), or None when there is none."""
    value = read_secret(path, file_env=ENV_FILE, value_env=ENV_VALUE, what="internal secret",
                        environ=environ)
    return InternalSecret(value) if value else None


def generate_secret() -> str:
    """A fresh random secret (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def write_secret_file(path: Path, value: str) -> Path:
    """Write ``value`` to ``path`` readable by this user only (created 0600, never world-readable
    even for an instant)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


def add_secret_argument(parser: argparse.ArgumentParser) -> None:
    """``--internal-secret-file``: the only way to name the secret on a command line (its path)."""
    parser.add_argument(
        "--internal-secret-file", default=None, metavar="FILE",
        help=f"file holding the secret shared by router and workers (default: env {ENV_FILE}, "
             f"else the value of {ENV_VALUE}; none = internal ports unauthenticated)",
    )
