"""The plugin registry: every filter, scorer and picker a policy configuration may name.

A plugin class declares its ``kind`` (filter, scorer, picker, pair_scorer, pair_picker) and its
``name``; ``@register`` files it under that name, and a second class with the same name is an
error (two plugins answering to one name would make a configuration mean two things). Policies
are built from names (``spec.py``), so this table and the presets (``presets.py``) are the whole
vocabulary of the router's ``--policy``/``--policy-config`` and the CRD's ``router.policy``.
"""

from __future__ import annotations

from typing import TypeVar

KINDS = ("filter", "scorer", "picker", "pair_scorer", "pair_picker")

_PLUGINS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: file ``cls`` under its ``name``; a duplicate name raises ValueError."""
    kind, name = getattr(cls, "kind", None), getattr(cls, "name", None)
    if kind not in KINDS:
        raise ValueError(f"plugin {cls.__qualname__} has kind {kind!r}, not one of {', '.join(KINDS)}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"plugin {cls.__qualname__} needs a name")
    other = _PLUGINS.get(name)
    if other is not None and other is not cls:
        raise ValueError(f"plugin name {name!r} is taken by {other.__module__}.{other.__qualname__}")
    _PLUGINS[name] = cls
    return cls


def lookup(kind: str, name: str) -> type:
    """The plugin class of ``kind`` called ``name``; ValueError naming the choices otherwise."""
    _load_builtins()
    cls = _PLUGINS.get(name)
    if cls is None or cls.kind != kind:
        raise ValueError(f"unknown {kind} {name!r} (known: {', '.join(names(kind))})")
    return cls


def names(kind: str) -> list[str]:
    """The registered names of one kind, sorted."""
    _load_builtins()
    return sorted(n for n, c in _PLUGINS.items() if c.kind == kind)


def _load_builtins() -> None:
    """Import the modules that register the built-in plugins (each registers on import)."""
    from splitserve.router.policy import filters, goodput, pickers, scorers  # noqa: F401
