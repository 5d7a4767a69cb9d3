"""splitserve.trust: the shared internal secret and what it authenticates.

Only the router faces users; everything behind it (router -> worker HTTP, prefill -> decode KV
connections, registry entries) proves knowledge of one shared secret, read from a file or the
environment (how Kubernetes mounts Secrets), never from a command-line argument. Each use gets
its own key derived from the secret (``InternalSecret.key``), so what one channel reveals (the
HTTP header travels on every request) is useless on the others. Imports nothing of splitserve:
every layer may use it.
"""

from .http import HEADER, InternalAuthMiddleware, auth_headers, warn_unauthenticated
from .secret import (
    ENV_FILE,
    ENV_VALUE,
    InternalSecret,
    SecretError,
    add_secret_argument,
    generate_secret,
    load_internal_secret,
    read_secret,
    write_secret_file,
)

__all__ = [
    "HEADER",
    "InternalAuthMiddleware",
    "auth_headers",
    "warn_unauthenticated",
    "ENV_FILE",
    "ENV_VALUE",
    "InternalSecret",
    "SecretError",
    "add_secret_argument",
    "generate_secret",
    "load_internal_secret",
    "read_secret",
    "write_secret_file",
]
