"""Named workloads: request lengths drawn to match published statistics, and arrival times.

Every system in a comparison must see the SAME requests, so all randomness comes from numpy
``Generator``s seeded by (seed, stream): lengths, arrival pattern, prompt text and prefix reuse
each have their own stream. Changing the rate rescales the arrival pattern and keeps every
length (and which request extends which); only the prompt *text* is re-drawn per rate, so a
server's prefix cache cannot answer a later rate of a sweep from the prompts of an earlier one.

Lengths are lognormal, fitted to the mean/median/p90 in ``shared/notes/workloads.md`` (the
median fixes mu, sigma is the least-squares compromise between the mean and the p90, which a
single lognormal rarely matches together), then scaled/clipped by ``LengthCaps`` so a small
model (the CPU demo has a 1,024-token context) can run the same shape. Where the notes give no
spread, the sigma is an assumption and says so in ``source``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Z90 = 1.2815515655446004  # standard normal 0.9-quantile

# Random-stream ids under one seed (see module docstring).
_LENGTHS, _ARRIVALS, _TEXT, _PREFIX = 0, 1, 2, 3


def fit_sigma(mean: float | None, median: float, p90: float | None) -> float:
    """Lognormal sigma that best matches the given mean and/or p90 for a fixed median.

    In log space the model gives ln(mean/median) = sigma^2/2 and ln(p90/median) = Z90*sigma;
    with both targets we minimise the sum of squared log errors (a 1-D search), with one we
    solve it exactly.
    """
    if median <= 0:
        raise ValueError(f"median must be > 0, got {median}")
    m = math.log(mean / median) if mean is not None else None
    q = math.log(p90 / median) if p90 is not None else None
    if m is not None and m <= 0 and q is None:
        raise ValueError("a lognormal needs mean > median; give a p90 or a sigma instead")
    if q is None:
        return math.sqrt(2 * m)  # type: ignore[operator]
    if m is None or m <= 0:
        return q / Z90

    def err(s: float) -> float:
        return (s * s / 2 - m) ** 2 + (Z90 * s - q) ** 2

    lo, hi = 1e-3, 4.0
    for _ in range(100):  # golden-section search; err is unimodal on this interval
        a = hi - (hi - lo) / 1.618033988749895
        b = lo + (hi - lo) / 1.618033988749895
        if err(a) < err(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


@dataclass(frozen=True)
class LengthDist:
    """Lognormal token-length distribution with the published targets it was fitted to."""

    median: float
    sigma: float
    target_mean: float | None = None
    target_p90: float | None = None
    hard_max: int | None = None  # the trace's own maximum, if it has one

    @classmethod
    def fit(
        cls, mean: float | None, median: float, p90: float | None = None,
        hard_max: int | None = None,
    ) -> LengthDist:
        """Fit sigma from the targets (see ``fit_sigma``); the median is kept exactly."""
        return cls(median, fit_sigma(mean, median, p90), mean, p90, hard_max)

    @classmethod
    def assumed(cls, mean: float, sigma: float, hard_max: int | None = None) -> LengthDist:
        """Only a mean is published: take an assumed sigma and put the median where it must be."""
        return cls(mean / math.exp(sigma * sigma / 2), sigma, mean, None, hard_max)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n integer lengths >= 1 (rounded), clipped to ``hard_max`` when set."""
        raw = rng.lognormal(math.log(self.median), self.sigma, size=n)
        out = np.maximum(1, np.rint(raw)).astype(np.int64)
        if self.hard_max is not None:
            out = np.minimum(out, self.hard_max)
        return out


@dataclass(frozen=True)
class Workload:
    """A named request mix: input and output length distributions and where they come from.

    ``prefix_reuse`` is the probability that a request continues an earlier one (its prompt
    starts with that earlier prompt, as a multi-turn conversation does), for prefix caches.
    ``slo_ms`` is the default (TTFT, TPOT) target, from DistServe's artifact where it has one
    for this kind of workload (A100, 13B-class model): tighten or loosen it per model/hardware.
    """

    name: str
    description: str
    source: str
    input: LengthDist
    output: LengthDist
    slo_ms: tuple[float, float]
    prefix_reuse: float = 0.0


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "chat",
            "ShareGPT-like chatbot: short prompts, medium answers",
            "vLLM's ShareGPT sampling: input mean ~215, output mean ~197 tokens (notes). Spread "
            "not published there: sigma 1.0 (input) and 0.9 (output) are assumptions.",
            LengthDist.assumed(215, 1.0),
            LengthDist.assumed(197, 0.9),
            (250.0, 100.0),
        ),
        Workload(
            "conversation",
            "Azure LLM inference trace 2023, conversation service",
            "AzureLLMInferenceTrace_conv: input 1155/1020/2734, output 211/129/424 "
            "(mean/median/p90), output max 1000.",
            LengthDist.fit(1155, 1020, 2734),
            LengthDist.fit(211, 129, 424, hard_max=1000),
            (250.0, 100.0),
        ),
        Workload(
            "code",
            "Azure code completion: long contexts, very short completions",
            "AzureLLMInferenceTrace_code: input 2048/1469/5186, output 28/13/55 "
            "(mean/median/p90).",
            LengthDist.fit(2048, 1469, 5186),
            LengthDist.fit(28, 13, 55),
            (125.0, 200.0),
        ),
        Workload(
            "summarisation",
            "Summarisation: long documents in, short summaries out",
            "ASSUMED (no trace in the notes): LongBench-style documents, input 1800/1500/3500, "
            "output 90/75/170 (mean/median/p90); DistServe's summarisation SLO is TTFT 15 s, "
            "TPOT 0.15 s.",
            LengthDist.fit(1800, 1500, 3500),
            LengthDist.fit(90, 75, 170),
            (15000.0, 150.0),
        ),
        Workload(
            "long_conversation",
            "Mooncake (FAST'25) long multi-turn conversations with prefix reuse",
            "Mooncake FAST25 trace: input 12035/6909/27367 (mean/median/p90); output median "
            "350, mean 343 (sigma 0.25 assumed: a lognormal cannot have mean < median); ~37% "
            "of prefix blocks reused, modelled as prefix_reuse=0.37.",
            LengthDist.fit(12035, 6909, 27367),
            LengthDist(350, 0.25, 343),
            (15000.0, 150.0),
            prefix_reuse=0.37,
        ),
    )
}


def get_workload(name: str) -> Workload:
    """The named workload; an unknown name is an error listing the known ones."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None


@dataclass(frozen=True)
class LengthCaps:
    """Scale-down for small models: lengths are multiplied by ``scale`` then clipped.

    ``max_context`` bounds prompt + output (the output keeps its length; the prompt is cut to
    fit). Use e.g. ``LengthCaps(max_input=768, max_output=128, max_context=1024)`` for the CPU
    demo model; note that clipping changes the distribution's tail, scaling its whole shape.
    """

    scale: float = 1.0
    max_input: int | None = None
    max_output: int | None = None
    max_context: int | None = None
    min_input: int = 1

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        for name in ("max_input", "max_output", "max_context"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.min_input < 1:
            raise ValueError(f"min_input must be >= 1, got {self.min_input}")
        if self.max_context is not None and self.max_context < self.min_input + 1:
            raise ValueError(f"max_context must be >= min_input + 1, got {self.max_context}")

    def apply(self, inputs: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scaled and clipped (input, output) arrays."""
        inp = np.maximum(self.min_input, np.rint(inputs * self.scale)).astype(np.int64)
        out = np.maximum(1, np.rint(outputs * self.scale)).astype(np.int64)
        if self.max_input is not None:
            inp = np.minimum(inp, self.max_input)
        if self.max_output is not None:
            out = np.minimum(out, self.max_output)
        if self.max_context is not None:
            out = np.minimum(out, self.max_context - self.min_input)
            inp = np.maximum(self.min_input, np.minimum(inp, self.max_context - out))
        return inp, out


def sample_lengths(
    workload: Workload, n: int, seed: int, caps: LengthCaps | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(input, output) token lengths for n requests; independent of rate and tokenizer."""
    if n < 1:
        raise ValueError(f"number of requests must be >= 1, got {n}")
    rng = np.random.default_rng([seed, _LENGTHS])
    inputs = workload.input.sample(rng, n)
    outputs = workload.output.sample(rng, n)
    return (caps or LengthCaps()).apply(inputs, outputs)


def arrival_times(n: int, rate: float, seed: int, cv: float = 1.0) -> np.ndarray:
    """Send offsets in seconds (first at 0) of a renewal process with mean rate ``rate``.

    Inter-arrival gaps are Gamma with shape 1/cv^2 and mean 1/rate: cv = 1 is Poisson
    (exponential gaps), cv > 1 bursty (BurstGPT-like), cv < 1 more regular. The unit-rate
    pattern depends on (seed, cv) only, so every rate replays the same pattern, time-scaled.
    """
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if not cv > 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    rng = np.random.default_rng([seed, _ARRIVALS])
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / shape, size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)]) / rate


@dataclass(frozen=True)
class Request:
    """One request to send: when, what prompt, how many tokens to generate."""

    index: int
    arrival_s: float
    prompt: str
    prompt_tokens: int  # exact for the given tokenizer, else the drawn (approximate) length
    max_tokens: int
    prefix_of: int | None = None  # index of the earlier request whose prompt this one extends


@dataclass
class RequestSet:
    """The requests of one run plus what produced them (stored in the results file)."""

    workload: str
    seed: int
    rate: float
    cv: float
    exact_lengths: bool
    caps: LengthCaps
    requests: list[Request] = field(default_factory=list)

    def meta(self) -> dict:
        """JSON-ready description (results file ``workload`` entry)."""
        return {
            "name": self.workload,
            "seed": self.seed,
            "rate": self.rate,
            "arrival_cv": self.cv,
            "exact_lengths": self.exact_lengths,
            "caps": {
                "scale": self.caps.scale,
                "max_input": self.caps.max_input,
                "max_output": self.caps.max_output,
                "max_context": self.caps.max_context,
            },
            "num_requests": len(self.requests),
            "mean_prompt_tokens": _mean([r.prompt_tokens for r in self.requests]),
            "mean_max_tokens": _mean([r.max_tokens for r in self.requests]),
        }


def _mean(values: Sequence[int]) -> float:
    return sum(values) / len(values) if values else math.nan


def build_requests(
    workload: Workload | str,
    num_requests: int,
    rate: float,
    seed: int = 0,
    cv: float = 1.0,
    caps: LengthCaps | None = None,
    tokenizer_path: str | None = None,
    with_text: bool = True,
) -> RequestSet:
    """The full, reproducible request list for one run of ``workload`` at ``rate``.

    ``with_text=False`` leaves every prompt empty (the simulator needs only lengths, arrivals
    and prefix sharing, which do not depend on the text; drawing text is most of the time)."""
    from splitserve.bench.prompts import PromptBuilder

    wl = get_workload(workload) if isinstance(workload, str) else workload
    caps = caps or LengthCaps()
    inputs, outputs = sample_lengths(wl, num_requests, seed, caps)
    times = arrival_times(num_requests, rate, seed, cv)
    builder = PromptBuilder.from_path(tokenizer_path)
    text_rng = np.random.default_rng([seed, _TEXT, _rate_key(rate)])
    prefix_rng = np.random.default_rng([seed, _PREFIX])
    bodies: list[list[str]] = []
    out = RequestSet(wl.name, seed, rate, cv, builder.exact, caps)
    for i in range(num_requests):
        target = int(inputs[i])
        parent = _pick_parent(prefix_rng, wl.prefix_reuse, out.requests, target)
        head = bodies[parent] if parent is not None else []
        words = builder.extend(text_rng, head, target) if with_text else []
        bodies.append(words)
        prompt = "".join(words)
        count = builder.count(prompt) if builder.exact and with_text else target
        out.requests.append(
            Request(i, float(times[i]), prompt, count, int(outputs[i]), parent)
        )
    return out


def _rate_key(rate: float) -> int:
    """A stable integer for a rate (to the millisecond-per-request), for seeding."""
    return int(round(rate * 1000))


def _pick_parent(
    rng: np.random.Generator, p: float, earlier: Sequence[Request], target: int
) -> int | None:
    """With probability p, an earlier request whose prompt is shorter than ``target``."""
    if p <= 0 or not earlier or rng.random() >= p:
        return None
    fits = [r.index for r in earlier if r.prompt_tokens < target]
    if not fits:
        return None
    return int(fits[int(rng.integers(len(fits)))])
