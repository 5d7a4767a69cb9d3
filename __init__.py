"""splitserve: Kubernetes-native LLM serving with prefill and decode on separate worker pools.

The repository root is this package (pyproject maps ``splitserve`` to ``.``); each top-level
folder is one component. ``operator/`` deliberately has no ``__init__.py``: a regular package
named ``operator`` at the root would shadow the standard library's ``operator`` module.
"""

__version__ = "0.1.0"
