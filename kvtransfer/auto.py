"""The negotiating backend ("auto"): each pair of workers uses the fastest backend both support.

A worker's ``--kv-backend`` (default "auto") becomes the ``requested`` of its offer
(``negotiate.py`` has the rule); a named backend is honoured where the peer can do it too, and
otherwise the pair falls back to tcp with a warning.

Sender: before the first transfer to a receiver endpoint it sends OFFER on a connection of its
own and reads the receiver's OFFER; both ends compute the same choice. The choice is kept per
endpoint, with the receiver instance that answered, and asked again after a transfer to it fails
with a lost connection or an unavailable backend. Each transfer then runs on the chosen
backend's own sender, made on first use, whose HELLO names that backend and that instance.

A receiver restarted at the same address (say it lost its GPU, or nixl failed to set up, so it
now offers less) is another instance: it refuses a HELLO negotiated with the old one before any
layer moves, and leaves the transfer pending. The sender then forgets the choice, negotiates
again and runs the same transfer once more (an INFO line; the caller sees no failure). What the
sender held against the old instance (failures in a row, backends avoided) is dropped too.
What it keeps per endpoint is bounded (``peers.MAX_PEERS``) and forgotten once the endpoint is
idle for ``peers.IDLE_S``.

Receiver: one listening endpoint serves HELLOs of every backend it offers, each with that
backend's own layer source; what a backend needs once per receiver (the CUDA IPC share of the
cache; the NIXL agent with the cache registered) is made when it is offered or, for nixl, when a
peer first picks it.

An end offers nixl only where its probe (``nixl.probe``, once per process) made an agent with
UCX. A backend that still fails to set up on either end is withdrawn from that end's offer with
a warning, and the pair chooses again without it within the same transfer: the receiver before
it answers the OFFER, the sender when it makes the backend's sender (then it asks again).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from splitserve.trust import InternalSecret

from . import auth, metrics
from .base import FailureReason, FirstToken, KVSender, KVSpec, TransferError, TransferResult
from .layout import check_cache
from .negotiate import (
    AUTO,
    FALLBACK,
    Choice,
    Offer,
    choose,
    host_identity,
    new_instance,
    nixl_has_fast_path,
    offered,
)
from .peers import IDLE_S, MAX_PEERS, PeerTable
from .receiver import LayerSource, SocketReceiver
from .registry import available_backends, backend_class
from .sender import SocketSender, peer_restarted
from .wire import FrameType, expect_frame, parse_endpoint, send_frame, tune_socket

log = logging.getLogger(__name__)

RENEGOTIATE = (FailureReason.CONNECTION_LOST, FailureReason.BACKEND_UNAVAILABLE)
STRIKES = 2  # transfers to one endpoint failing in a row on one backend before the pair avoids it
AVOID_S = 600.0  # how long it is avoided for that endpoint (the peer may be fixed or replaced)


def _renegotiate(err: TransferError) -> bool:
    """Whether a failure may mean that the peer's abilities changed (it restarted)."""
    return err.reason in RENEGOTIATE or (
        err.reason == FailureReason.HANDSHAKE_MISMATCH and "backend" in (err.field or ""))


def usable_backends(gpu: bool) -> list[str]:
    """The backends this process can run: tcp and shm always (Linux), cuda_ipc with a GPU,
    nixl where its probe made a UCX agent in this process (nixl.probe logs what it found)."""
    from .nixl import probe

    usable = [FALLBACK, "shm"]
    if gpu:
        usable.append("cuda_ipc")
    if probe(gpu) is None:
        usable.append("nixl")
    return usable


def _warn_withdrawn(side: str, backend: str, err: Exception) -> None:
    log.warning("kv %s: backend %s could not be set up here (%s); no longer offered, peers "
                "negotiate without it", side, backend, err)


def local_offer(requested: str, gpu: bool, instance: str = "") -> Offer:
    backends = offered(requested, usable_backends(gpu))
    slow = ("nixl",) if "nixl" in backends and not nixl_has_fast_path() else ()
    return Offer(backends, host_identity(), gpu, requested, slow, instance)


def _check_requested(requested: str) -> None:
    if requested != AUTO and requested not in available_backends():
        raise ValueError(f"unknown KV transfer backend {requested!r}; known: "
                         f"{[AUTO, *available_backends()]}")


@dataclasses.dataclass
class _Peer:
    """What a sender knows of one receiver endpoint (guarded by the sender's lock)."""

    instance: str = ""  # the receiver instance last negotiated with ("": a peer that sends none)
    choice: Choice | None = None  # negotiated with ``instance``; None: ask before the next transfer
    strikes: dict[str, int] = dataclasses.field(default_factory=dict)  # backend -> failed in a row
    avoid: dict[str, float] = dataclasses.field(default_factory=dict)  # backend -> avoided until


class _Renegotiated(Exception):
    """The receiver restarted since the pair negotiated: the choice is forgotten and the
    layers rewound, so the transfer can run once more on a new negotiation."""


class _Replayable:
    """The caller's layers, which can start again from layer 0 as long as layer 1 was not asked
    for: a socket sender takes at most layer 0 before its HELLO is answered (to learn the
    length), so a transfer refused at its handshake can run again. Only layer 0 is kept, until
    layer 1 is asked for; from there the layers flow through ``itertools.chain`` (no Python
    call per layer)."""

    def __init__(self, layers: Iterable[Any]) -> None:
        self._source = iter(layers)
        self._first: list[Any] = []  # layer 0, once taken and while layer 1 is not
        self.rewindable = True

    def start(self) -> Iterator[Any]:
        """The layers from layer 0 (again: only while ``rewindable``)."""
        return itertools.chain(self._head(), self._past_head(), self._source)

    def _head(self) -> Iterator[Any]:
        if not self._first:
            self._first.extend(itertools.islice(self._source, 1))
        yield from self._first

    def _past_head(self) -> Iterator[Any]:
        self.rewindable, self._first = False, []
        yield from ()


class AutoSender(KVSender):
    """Prefill side: negotiates per receiver endpoint, then sends with that backend's sender.
    kwargs (secret, timeouts, streams, device) go to the backend senders where they apply."""

    backend = AUTO
    max_streams = 1  # streams > 1 go to the backends that have them (tcp), capped for others

    def __init__(self, spec: KVSpec, *, requested: str = AUTO, gpu: bool | None = None,
                 **kwargs: Any) -> None:
        """``gpu``: whether the layers come from a GPU (default: whether CUDA is available)."""
        if spec.backend != AUTO:
            raise ValueError(f"spec.backend is {spec.backend!r}, this sender is {AUTO!r}")
        _check_requested(requested)
        self.spec = spec
        self.requested = requested
        self.secret: InternalSecret | None = kwargs.get("secret")
        self.connect_timeout = float(kwargs.get("connect_timeout", 5.0))
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._senders: dict[str, SocketSender] = {}
        # per endpoint; a peer idle for IDLE_S (> AVOID_S: an avoidance runs out first) is
        # forgotten, and it negotiates again if it comes back
        self._peers: PeerTable[str, _Peer] = PeerTable(MAX_PEERS, IDLE_S)
        self._gpu = gpu
        self._offer: Offer | None = None
        self._closed = False

    @property
    def offer(self) -> Offer:
        if self._offer is None:  # lazily: asking CUDA and NIXL costs a little
            gpu = torch.cuda.is_available() if self._gpu is None else self._gpu
            self._offer = local_offer(self.requested, gpu, new_instance())
        return self._offer

    def send(
        self,
        request_id: str,
        endpoint: str,
        kv_layers: Iterable[Any],
        first_token: FirstToken,
        meta: Mapping[str, Any] | None = None,
        *,
        num_tokens: int | None = None,
    ) -> TransferResult:
        """``KVSender.send`` on the backend negotiated with ``endpoint``. A receiver that
        restarted at that address since (another instance: its offer may differ) refuses the
        HELLO before any layer went; then the pair negotiates again and the transfer runs once
        more, which the caller does not see."""
        layers = _Replayable(kv_layers)
        args = (request_id, endpoint, layers, first_token, meta, num_tokens)
        try:
            return self._attempt(*args, final=False)
        except _Renegotiated:
            return self._attempt(*args, final=True)

    def _attempt(self, request_id: str, endpoint: str, layers: _Replayable,
                 first_token: FirstToken, meta: Mapping[str, Any] | None,
                 num_tokens: int | None, *, final: bool) -> TransferResult:
        try:
            choice, instance = self._negotiated(endpoint, request_id)
        except TransferError as err:  # the receiver did not answer: no backend to count it under
            metrics.record_failure("send", AUTO, err.reason)
            metrics.record_peer_failure("send", endpoint, AUTO, err.reason)
            raise err.with_request(request_id) from err
        choice, instance, sender = self._sender_for(choice, instance, endpoint, request_id)
        try:
            result = sender.send(request_id, endpoint, layers.start(), first_token, meta,
                                 num_tokens=num_tokens, negotiated_with=instance or None)
        except TransferError as err:
            if peer_restarted(err):
                self._forget(endpoint, instance)
                if not final and layers.rewindable:
                    log.info("kv send: the receiver at %s restarted since the pair negotiated "
                             "(%s); negotiating again and retrying request %s", endpoint,
                             err.message, request_id)
                    raise _Renegotiated() from err
                metrics.record_failure("send", choice.backend, err.reason)  # (sender skipped it)
            metrics.record_peer_failure("send", endpoint, choice.backend, err.reason)
            if _renegotiate(err):
                self._strike(endpoint, choice.backend, instance, err)
            raise
        metrics.record_peer_success("send", endpoint, choice.backend, result.bytes, result.seconds)
        with self._lock:
            known = self._peers.get(endpoint)
            if known is not None:
                known.strikes.pop(choice.backend, None)
        return result

    def _forget(self, endpoint: str, instance: str) -> None:
        """Drop the choice negotiated with ``instance`` (kept if made anew meanwhile)."""
        with self._lock:
            known = self._peers.get(endpoint)
            if known is not None and known.instance == instance:
                known.choice = None

    def _strike(self, endpoint: str, backend: str, instance: str, err: TransferError) -> None:
        """A transfer on ``backend`` failed in a way a new negotiation may heal: forget the
        choice; after ``STRIKES`` in a row (set up fine, yet it cannot move bytes to that peer,
        e.g. UCX cannot connect the two hosts) offer that endpoint the rest for ``AVOID_S``.
        Strikes hold against one receiver instance: a restarted one starts afresh."""
        with self._lock:
            known = self._peers.get(endpoint)
            if known is None or known.instance != instance:  # negotiated anew meanwhile
                return
            known.choice = None
            if backend == FALLBACK:
                return
            strikes = known.strikes[backend] = known.strikes.get(backend, 0) + 1
            if strikes < STRIKES:
                return
            del known.strikes[backend]
            known.avoid[backend] = time.monotonic() + AVOID_S
        log.warning("kv send: backend %s failed %d transfers in a row to %s (%s); that pair "
                    "negotiates without it for %.0f s", backend, strikes, endpoint, err, AVOID_S)

    def _offer_for(self, endpoint: str) -> Offer:
        """This end's offer to ``endpoint``: less the backends avoided for it (``_strike``)."""
        offer, now = self.offer, time.monotonic()
        with self._lock:
            known = self._peers.get(endpoint)
            for backend, until in list(known.avoid.items()) if known is not None else ():
                if until <= now:
                    del known.avoid[backend]
                else:
                    offer = offer.without(backend)
        return offer

    def _met_instance(self, endpoint: str, instance: str) -> bool:
        """Note the receiver instance that answered an OFFER; True when it is another one than
        before (the receiver restarted): the failures counted and the backends avoided against
        the old one are forgotten, they say nothing of the new one."""
        with self._lock:
            known = self._peers.get(endpoint)
            if known is None or not known.instance or not instance or known.instance == instance:
                return False
            old, known.instance = known.instance, instance
            avoided = sorted(known.avoid)
            known.strikes.clear()
            known.avoid.clear()
        log.info("kv send: the receiver at %s is a new instance (%s, was %s)%s", endpoint,
                 instance, old, f"; offering it {avoided} again" if avoided else "")
        return True

    def _sender_for(self, choice: Choice, instance: str, endpoint: str,
                    request_id: str) -> tuple[Choice, str, SocketSender]:
        """The chosen backend's sender; a backend that fails to set up here is withdrawn from
        this end's offer and the pair negotiates again without it (tcp always sets up)."""
        while True:
            try:
                return choice, instance, self._sender(choice.backend)
            except TransferError as err:
                if err.reason != FailureReason.BACKEND_UNAVAILABLE or choice.backend == FALLBACK:
                    raise
                self._withdraw(choice.backend, err)
            choice, instance = self._negotiated(endpoint, request_id)

    def _withdraw(self, backend: str, err: TransferError) -> None:
        _warn_withdrawn("send", backend, err)
        with self._lock:
            self._offer = self.offer.without(backend)
            for _, known in self._peers.items():
                if known.choice is not None and known.choice.backend == backend:
                    known.choice = None

    def choice(self, endpoint: str, request_id: str = "offer") -> Choice:
        """The backend for ``endpoint`` (negotiated on first use, on behalf of ``request_id``:
        a receiver that refuses to answer fails that transfer at once, as it would a HELLO)."""
        return self._negotiated(endpoint, request_id)[0]

    def _negotiated(self, endpoint: str, request_id: str) -> tuple[Choice, str]:
        """The choice for ``endpoint`` and the receiver instance it was negotiated with."""
        with self._lock:
            known = self._peers.get(endpoint)
            if known is not None and known.choice is not None:
                return known.choice, known.instance
        mine = self._offer_for(endpoint)
        peer = self._ask(endpoint, request_id, mine)
        if self._met_instance(endpoint, peer.instance) and self._offer_for(endpoint) != mine:
            mine = self._offer_for(endpoint)  # what was avoided against the old one is back
            peer = self._ask(endpoint, request_id, mine)
        choice = choose(mine, peer)
        metrics.report_choice("send", endpoint, choice, peer)
        with self._lock:
            known = self._peers.setdefault(endpoint, _Peer)
            known.choice, known.instance = choice, peer.instance
        return choice, peer.instance

    def close(self) -> None:
        with self._lock:
            self._closed = True
            senders = list(self._senders.values())
        for sender in senders:
            sender.close()

    def _ask(self, endpoint: str, request_id: str, mine: Offer) -> Offer:
        """Exchange offers with the receiver at ``endpoint`` (TransferError on failure)."""
        try:
            sock = socket.create_connection(
                parse_endpoint(endpoint), timeout=self.connect_timeout)
        except OSError as exc:
            raise TransferError(FailureReason.CONNECTION_LOST,
                                f"cannot reach the KV receiver at {endpoint}: {exc}") from exc
        with sock:
            try:
                tune_socket(sock, self.connect_timeout)
                nonce = auth.new_nonce() if self.secret is not None else ""
                send_frame(sock, FrameType.OFFER, {"request_id": request_id,
                                                   "offer": mine.to_dict(),
                                                   **(auth.hello_fields(nonce) if nonce else {})})
                if self.secret is not None:  # as for a HELLO: only to a receiver of ours
                    auth.authenticate_receiver(sock, self.secret, nonce, request_id, AUTO)
                meta = expect_frame(sock, FrameType.OFFER).meta
                return Offer.from_dict(meta.get("offer") or {})
            except TransferError:
                raise
            except (OSError, ValueError) as exc:
                raise TransferError(FailureReason.CONNECTION_LOST,
                                    f"no KV offer from {endpoint}: {exc}") from exc

    def _sender(self, backend: str) -> SocketSender:
        with self._lock:
            if self._closed:
                raise TransferError(FailureReason.CLOSED, "sender is closed")
            sender = self._senders.get(backend)
            if sender is None:
                sender = self._senders[backend] = self._make(backend)
            return sender

    def _make(self, backend: str) -> SocketSender:
        cls = backend_class(backend, "sender")
        kwargs = dict(self._kwargs)
        kwargs["streams"] = min(int(kwargs.get("streams", 1)), cls.max_streams)
        if backend not in ("cuda_ipc", "nixl"):
            kwargs.pop("device", None)
        return cls(dataclasses.replace(self.spec, backend=backend), **kwargs)


class AutoReceiver(SocketReceiver):
    """Decode side: one endpoint for every backend it offers (module doc)."""

    backend = AUTO

    def __init__(self, spec: KVSpec, kv_cache: torch.Tensor, *args: Any,
                 requested: str = AUTO, **kwargs: Any) -> None:
        _check_requested(requested)
        check_cache(spec, kv_cache)
        gpu = bool(kv_cache.is_cuda)
        self._offer = local_offer(requested, gpu)
        self.shared_cache = None  # cuda_ipc's share of the cache (CudaIpcSource reads it)
        if "cuda_ipc" in self._offer.backends:
            from .cuda_ipc import _Target

            try:
                self.shared_cache = _Target(kv_cache, share=True)
            except (TransferError, RuntimeError) as err:  # CUDA refused to share the cache
                self._withdraw("cuda_ipc", err)
        self._nixl: Any = None  # nixl.CacheRegistration, once a peer picks nixl
        self._nixl_lock = threading.Lock()
        super().__init__(spec, kv_cache, *args, **kwargs)
        self._offer = dataclasses.replace(self._offer, instance=self.instance)
        self._spec_dict = None  # no fast path: a HELLO names a real backend, check_spec checks it

    def offer(self) -> Offer:
        return self._offer

    def check_spec(self, theirs: KVSpec) -> None:
        if theirs.backend not in self._offer.backends:
            raise TransferError(
                FailureReason.HANDSHAKE_MISMATCH,
                f"backend {theirs.backend!r} is not one this receiver offers "
                f"({list(self._offer.backends)})", field="backend")
        dataclasses.replace(self.spec, backend=theirs.backend).check_compatible(theirs)

    def prepare(self, backend: str) -> bool:
        """Set up what ``backend`` needs once (nixl: the cache registered with an agent); one
        that fails is withdrawn from the offer (False) and the peer is answered without it."""
        if backend == "nixl":
            try:
                self._registration()
            except TransferError as err:  # make_agent/CacheRegistration: BACKEND_UNAVAILABLE
                self._withdraw("nixl", err)
                return False
        return True

    def _withdraw(self, backend: str, err: Exception) -> None:
        _warn_withdrawn("receive", backend, err)
        self._offer = self._offer.without(backend)

    def open_source(self, hello: dict[str, Any], nbytes: int) -> LayerSource:
        backend = hello["spec"]["backend"]  # one this receiver offers (check_spec)
        if backend == "tcp":
            from .tcp import InlineSource

            return InlineSource(nbytes)
        if backend == "shm":
            from .shm import ShmSource

            return ShmSource(hello, nbytes, self.spec.num_layers)
        if backend == "cuda_ipc":
            from .cuda_ipc import CudaIpcSource

            return CudaIpcSource(self, hello, nbytes)
        from .nixl import NixlSource

        return NixlSource(self, self._registration(), hello, nbytes)

    def close(self) -> None:
        super().close()
        with self._nixl_lock:
            if self._nixl is not None:
                self._nixl.close()

    def _registration(self) -> Any:
        with self._nixl_lock:
            if self._nixl is None:
                from .nixl import CacheRegistration

                self._nixl = CacheRegistration(self.kv_cache)
            return self._nixl
