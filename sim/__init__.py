"""``splitserve sim``: a discrete-event simulator of the router, prefill, decode and colocated
workers, driven by the bench's workloads and the profiled latency model, with the engine's own
scheduler and block manager deciding every step (so the simulated rules cannot drift from the
served ones)."""
