"""splitserve.testing: test doubles and references, for the tests and the benches only.

- ``stub_worker``: model-less prefill and decode workers speaking the workers' protocol
  (router tests, ``bench/lab/router.py``);
- ``hf_reference``: Hugging Face transformers as the reference for exactness checks.

The product (router, workers, engine, operator, ...) never imports this package
(tests/test_import_layers.py checks it).
"""
