"""splitserve.kernels: the model's attention and elementwise ops, each with a torch reference.

The engine calls only ``attention`` (``decode_attention``, ``prefill_attention``, ``write_kv``,
``gather_kv``) and ``ops`` (``rms_norm``, ``add_rms_norm``, ``silu_and_mul``,
``rope_and_write_kv``). Each dispatches (rule in ``_launch.py``, ``SPLITSERVE_KERNELS``) to a
Triton kernel in a ``triton_*.py`` module beside it or to the plain-torch reference.
"""
