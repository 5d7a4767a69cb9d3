"""splitserve.launcher: `splitserve up`, every process of a local deployment on one machine."""
