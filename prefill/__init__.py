"""splitserve.prefill."""
