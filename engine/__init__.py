"""splitserve.engine: the engine only (nano-vllm's shape): model, loader, paged KV cache and block
manager, scheduler, runner (CUDA graphs, warm-up), sampler, and the asyncio door into its thread.
It imports nothing above it (no worker shell, role, registry or router): ``protocol``,
``modelfiles`` (reading a model), ``kvtransfer`` (the cache's wire layout) and ``kernels`` only.
The HTTP workers around it live in ``splitserve.worker``, ``splitserve.prefill`` and
``splitserve.decode``."""
