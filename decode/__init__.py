"""splitserve.decode."""
