"""Worker command-line options and the frozen config they become.

Kept free of torch imports: ``splitserve --help`` registers every subcommand, and should not pay
for loading torch to print a usage message.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from splitserve.engine.config import EngineConfig, RunnerConfig, SchedulerConfig
from splitserve.kvtransfer.registry import available_backends
from splitserve.trust import add_secret_argument


def add_worker_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer.json) or GGUF file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default_port, help=f"HTTP port (default {default_port})")
    parser.add_argument("--advertise-host", default=None, help="address peers use to reach this worker (default: --host, or 127.0.0.1 for 0.0.0.0)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if present)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=RunnerConfig.gpu_memory_utilization,
                        help="fraction of the device's total memory this worker may use for weights, "
                             f"activations, CUDA graphs and KV cache (default {RunnerConfig.gpu_memory_utilization}"
                             "; workers sharing a device need fractions that sum to at most 1)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch (default 64)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prompt tokens per prefill batch (default 8192)")
    parser.add_argument("--chunked-prefill", action="store_true", help="mix prompt chunks into decode steps (the colocated baseline)")
    parser.add_argument("--kv-backend", default="auto", choices=available_backends(),
                        help="KV transfer backend (default auto: the fastest that both workers of "
                             "a pair support; a named one is used where the peer supports it too, "
                             "else tcp, with a warning)")
    parser.add_argument("--generation", default="", help="serving generation: workers of different generations never pair")
    parser.add_argument("--redis-url", default=None, help="announce this worker in a Redis registry (optional)")
    parser.add_argument("--redis-namespace", default="splitserve", help="key prefix in Redis, so services can share one Redis (default splitserve)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for the decode step (debugging)")
    parser.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                        help="queue each step before the previous step's tokens reach the host "
                             "(auto: on CUDA, where it hides the host's work; off: for debugging "
                             "and comparison; on: also on the CPU, for testing)")
    parser.add_argument("--random-weights", action="store_true", help="random weights of the model's shape (timing only)")
    add_secret_argument(parser)
    parser.add_argument("--redis-password-file", default=None, metavar="FILE",
                        help="file holding the Redis password (default: env SPLITSERVE_REDIS_PASSWORD_FILE, else SPLITSERVE_REDIS_PASSWORD)")
    parser.add_argument("--public-metrics", action="store_true",
                        help="serve /metrics without the internal header (for a Prometheus that NetworkPolicies admit)")


@dataclass(frozen=True)
class WorkerOptions:
    role: str
    engine: EngineConfig
    host: str
    port: int
    advertise_host: str
    kv_backend: str
    generation: str
    redis_url: str | None
    redis_namespace: str = "splitserve"
    kv_port: int = 0
    kv_timeout: float = 30.0
    internal_secret_file: str | None = None  # the path only; the value is read at start-up
    redis_password_file: str | None = None
    public_metrics: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.advertise_host}:{self.port}"


def options_from_args(args: argparse.Namespace, role: str) -> WorkerOptions:
    engine = EngineConfig(
        RunnerConfig(
            model_dir=args.model,
            dtype=args.dtype,
            device=args.device,
            block_size=args.block_size,
            num_kv_blocks=args.num_kv_blocks,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            random_weights=args.random_weights,
            cuda_graphs=not args.enforce_eager,
            max_num_seqs=args.max_num_seqs,
        ),
        SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            chunked_prefill=args.chunked_prefill,
        ),
        overlap={"auto": None, "on": True, "off": False}[args.overlap],
    )
    advertise = args.advertise_host or ("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host)
    return WorkerOptions(
        role=role,
        engine=engine,
        host=args.host,
        port=args.port,
        advertise_host=advertise,
        kv_backend=args.kv_backend,
        generation=args.generation,
        redis_url=args.redis_url,
        redis_namespace=args.redis_namespace,
        kv_port=getattr(args, "kv_port", 0),
        kv_timeout=getattr(args, "kv_timeout", 30.0),
        internal_secret_file=args.internal_secret_file,
        redis_password_file=args.redis_password_file,
        public_metrics=args.public_metrics,
    )

