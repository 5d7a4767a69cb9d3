"""A request's state inside one engine.

Life cycle: WAITING (queued, no blocks) -> RUNNING (has blocks, in the batch) -> FINISHED.
A prefill-only engine stops a sequence at PREFILLED: its first token is sampled and its blocks
are kept until the KV transfer is done, then the worker frees them.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from splitserve.engine.sampling import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREFILLED = "prefilled"
    FINISHED = "finished"


_ids = itertools.count()

# The value of a sampled token that is still on its way from the device: the engine queues the
# next step before the previous step's tokens reach the host (see ``LLMEngine.step``).
PLACEHOLDER = -1


@dataclass(eq=False, slots=True)  # slots: its fields are read per token per step
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prefill_only: bool = False
    seq_id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(init=False)
    num_prompt_tokens: int = field(init=False)  # the prompt never changes after creation
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_scheduled_tokens: int = 0  # tokens the current step computes (set by the scheduler)
    finish_reason: str | None = None
    stop_string: str | None = None
    generator: torch.Generator | None = None
    # Prefill workers stream the prompt's KV as it is computed: called with (layer, KV of the
    # whole prompt for that layer, token-major) right after the layer's forward pass.
    on_layer_kv: Callable[[int, torch.Tensor], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return -(-len(self.token_ids) // block_size)

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size : (i + 1) * block_size]
