"""The KV links of a deployment as the router sees them: for each prefill worker, the decode
workers it has sent KV to, the backend their handshake chose, and how the link went.

Prefill workers report their negotiated peers in ``/load`` (``kv_peers``, one entry per decode
receiver endpoint, counted by the worker since it started); the router already polls every
worker's load, so it can export the links of the whole pool pair without a second scrape path:
the operator reads them from the router's ``/metrics`` into the InferenceService status, and a
dashboard can show which backend each pair uses (a fallback to tcp is a warning, never silent).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the operator reads KvLink from metrics without the router's HTTP client
    from splitserve.router.workers import WorkerState


@dataclass(frozen=True)
class KvLink:
    """One prefill -> decode link: worker URLs, backend, fallback, and the sender's counts (the
    router exports it as gauges, the operator reads it back from them)."""

    prefill: str
    decode: str
    backend: str
    fallback: bool
    transfers: int
    failures: int
    bytes_per_s: float | None


def _link(prefill: WorkerState, peer: dict[str, Any], decode_by_endpoint: dict[str, str]) -> KvLink | None:
    endpoint, backend = peer.get("peer"), peer.get("backend")
    if peer.get("side") != "send" or not isinstance(endpoint, str) or not isinstance(backend, str):
        return None
    if endpoint not in decode_by_endpoint:  # a decode worker gone (scaled away): not a link now
        return None
    rate = peer.get("bytes_per_s")
    return KvLink(
        prefill=prefill.url,
        decode=decode_by_endpoint[endpoint],
        backend=backend,
        fallback=bool(peer.get("fallback")),
        transfers=int(peer.get("transfers") or 0),
        failures=int(peer.get("failures") or 0),
        bytes_per_s=float(rate) if isinstance(rate, int | float) else None,
    )


def kv_links(prefill: Iterable[WorkerState], decode: Iterable[WorkerState]) -> list[KvLink]:
    """Every link the prefill workers' last loads report to a decode worker this router knows
    now, named by its URL (a worker's report keeps peers that have left)."""
    by_endpoint = {w.kv_endpoint: w.url for w in decode if w.kv_endpoint}
    links = []
    for w in prefill:
        for peer in (w.load.kv_peers if w.load is not None else ()):
            link = _link(w, peer, by_endpoint) if isinstance(peer, dict) else None
            if link is not None:
                links.append(link)
    return links
