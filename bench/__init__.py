"""splitserve.bench."""
