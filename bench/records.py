"""One measured request: the unit every other bench module exchanges.

The load generator fills these, the statistics read them, and the results JSON stores them as
plain dicts (``to_dict``/``from_dict``), so a report can recompute attainment for other SLOs
from the raw timings without re-running the load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class RequestRecord:
    """Timings of one request, in seconds relative to the start of its run.

    ``sent_s`` is when the request left (``scheduled_s`` is when it should have: the difference
    is load-generator lateness); ``ttft_s`` and ``e2e_s`` are measured from ``sent_s`` to the
    first and the last token event. ``itl_s`` holds every gap between consecutive streamed token
    events (SSE chunks that carry a choice; a server may pack several tokens into one chunk,
    splitserve's router does when detokenising holds text back); ``output_tokens`` is the
    server's ``usage.completion_tokens`` when it reports one, else the number of token events.
    A failed request has ``error`` set; its timings are whatever was measured before the
    failure and it counts as an SLO miss.
    """

    index: int
    scheduled_s: float
    prompt_tokens: int
    max_tokens: int
    sent_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Completed with a first token and no error."""
        return self.error is None and self.ttft_s is not None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (last - first token time) / (n - 1).

        Equals the mean inter-token gap when every SSE chunk carries one token, and stays right
        when a server packs several tokens into one chunk. None for failed requests and for
        requests with a single output token (there is no decode step to time).
        """
        if self.error is not None or self.ttft_s is None or self.e2e_s is None:
            return None
        if self.output_tokens < 2:
            return None
        return max(0.0, self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the results file's request entry)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        """Inverse of ``to_dict``; unknown keys are an error so schema drift is noticed."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown request record fields: {sorted(unknown)}")
        return cls(**data)
