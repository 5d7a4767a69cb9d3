"""splitserve.bench.lab: the laboratory's measurement scripts, no user command.

Micro-benchmarks and checks behind ``bench/RESULTS.md`` (kernels, GEMV, KV transfer, prefill +
transfer, the router's overhead against stub workers, the simulator's speed and accuracy, chaos),
run from a checkout (``python -m splitserve.bench.lab.NAME``, ``bash bench/gpu_all.sh``). Not
installed with the package (pyproject lists no ``splitserve.bench.lab``); nothing outside
``bench/`` and ``tests/`` imports it (tests/test_import_layers.py).
"""
