"""Per-pair KV transfer time: what the router measured for each (prefill, decode) pair, with the
latency model as the prior.

A prefill worker's answer says how long the KV transfer ran past the end of the prompt's compute
(``transfer_ms``): that tail is what the transfer adds to the first token. Pairs differ (same
node or not, shared memory or TCP, a busy link), so the estimate is kept per pair as an EWMA of
measured / predicted (a ratio, since prompts differ in length) that starts at 1, the model's
own price: a pair never measured is priced by the model alone.
"""

from __future__ import annotations

import math

from splitserve.router.policy.latency import LatencyModel

_MIN_PRIOR_MS = 0.01  # a model that prices transfers at 0 still gets a ratio to learn


class TransferEstimator:
    def __init__(self, model: LatencyModel, alpha: float = 0.2, max_pairs: int = 65_536) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.model, self.alpha, self.max_pairs = model, alpha, max_pairs
        self._ratio: dict[tuple[str, str], float] = {}

    def prior_ms(self, tokens: float) -> float:
        return self.model.transfer_ms(tokens)

    def estimate_ms(self, prefill_url: str, decode_url: str, prior_ms: float) -> float:
        """The pair's transfer time for a prompt the model prices at ``prior_ms``."""
        return prior_ms * self._ratio.get((prefill_url, decode_url), 1.0)

    def estimates_ms(self, prefill_url: str, decode_urls: list[str], prior_ms: float) -> list[float]:
        """``estimate_ms`` for one prefill worker and each of ``decode_urls``."""
        if not self._ratio:  # nothing measured yet (or no prefill answer says): the model
            return [prior_ms] * len(decode_urls)
        get = self._ratio.get
        return [prior_ms * get((prefill_url, d), 1.0) for d in decode_urls]

    def observe(self, prefill_url: str, decode_url: str, tokens: int, measured_ms: float | None) -> None:
        """One measured transfer of ``tokens`` prompt tokens; None or nonsense is ignored."""
        if measured_ms is None or not math.isfinite(measured_ms) or measured_ms < 0:
            return
        key = (prefill_url, decode_url)
        ratio = measured_ms / max(self.prior_ms(tokens), _MIN_PRIOR_MS)
        if key not in self._ratio and len(self._ratio) >= self.max_pairs:
            self._ratio.clear()  # workers came and went for a long time: start over
        old = self._ratio.get(key, 1.0)  # the prior: the model is right
        self._ratio[key] = old + self.alpha * (ratio - old)
