"""The receiver's connection threads: one listening socket, threads that take turns accepting.

Leader/followers: one thread, the leader, accepts; when a connection arrives it hands the
leadership to a parked thread (or starts one, when none is parked) and serves the connection
itself, then leads again or parks. So the thread the kernel woke with the connection handles it:
no thread start (~0.1-0.15 ms on a busy 2-core machine) and no hand-over on a transfer's path; a
parked thread exits after ``idle_s`` without work, except the last one, kept as a spare so that
a sender after a quiet spell pays no thread start either. Between accepts (every
``watchdog_period_s`` at most) the leader runs the watchdog.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class ConnectionThreads:
    """Accepts on ``listener`` and runs ``serve(conn)`` for each connection on a thread."""

    def __init__(
        self,
        listener: socket.socket,
        name: str,
        serve: Callable[[socket.socket], None],
        watchdog: Callable[[], None],
        *,
        idle_s: float,
        watchdog_period_s: float,
    ) -> None:
        self._listener = listener
        self._listener.settimeout(watchdog_period_s)
        self._name = name
        self._serve = serve
        self._watchdog = watchdog
        self._idle_s = idle_s
        self._watchdog_period_s = watchdog_period_s
        self._next_watchdog = 0.0  # the leader's only
        self._closed = False
        # their own lock, so that the transfer table's notify_all never wakes a parked thread
        self._pool = threading.Condition()
        self._threads: set[threading.Thread] = set()  # every connection thread, alive
        self._parked = 0  # threads waiting in _follow() for the leadership
        self._leader = True  # some thread accepts (or is about to): the first one, below
        self._start_thread()

    def close(self, wait_s: float) -> None:
        """Refuse new senders at once (not left in the backlog while handlers wind down), let
        parked threads exit, and wait up to ``wait_s`` for the threads serving a connection."""
        self._closed = True
        self._listener.close()  # the leader's accept fails and, seeing _closed, it leaves
        with self._pool:
            self._pool.notify_all()  # parked threads exit
        deadline = time.monotonic() + wait_s
        while (threads := self._live_threads()) and time.monotonic() < deadline:
            for thread in threads:
                try:
                    thread.join(timeout=max(0.0, deadline - time.monotonic()))
                except RuntimeError:  # registered but not started yet: look again
                    time.sleep(0.001)

    def _start_thread(self) -> None:
        """Start a connection thread that begins as the leader (``self._leader`` is already
        set for it)."""
        thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        with self._pool:
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:  # no thread to spare: the caller leads again after its connection
            with self._pool:
                self._threads.discard(thread)
                self._leader = False
                self._pool.notify()  # a thread that parked meanwhile leads instead
            raise

    def _live_threads(self) -> list[threading.Thread]:
        with self._pool:
            return [t for t in self._threads if t is not threading.current_thread()]

    def _run(self) -> None:
        """A connection thread: lead (accept), serve what it accepted, then lead or park."""
        try:
            while True:
                conn = self._lead()
                if conn is None:
                    return
                self._serve(conn)
                if not self._follow():
                    return
        finally:
            with self._pool:
                self._threads.discard(threading.current_thread())

    def _lead(self) -> socket.socket | None:
        """As the leader: accept the next connection and pass the leadership on before
        returning it; run the watchdog meanwhile. None once closed."""
        while not self._closed:
            self._watchdog_due()  # before accept: never between a connection and its handler
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closed:
                    break
                log.warning("kv receiver accept failed: %s", exc)
                time.sleep(self._watchdog_period_s)
                continue
            self._pass_lead()
            return conn
        with self._pool:
            self._leader = False
        return None

    def _watchdog_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_watchdog:
            self._next_watchdog = now + self._watchdog_period_s
            self._watchdog()

    def _pass_lead(self) -> None:
        """Make another thread the leader, so the next sender is accepted while this thread
        serves its connection (a parked one; else a new one)."""
        with self._pool:
            if self._parked:
                self._leader = False
                self._pool.notify()
                return
        try:
            self._start_thread()  # keeps self._leader set: the new thread leads
        except RuntimeError as exc:
            log.warning("kv receiver could not start a connection thread: %s", exc)

    def _follow(self) -> bool:
        """After a connection: lead if nobody does, else park until asked to lead. False when
        this thread should exit (closed, or parked for ``idle_s``)."""
        with self._pool:
            deadline = time.monotonic() + self._idle_s
            while not self._closed:
                if not self._leader:
                    self._leader = True
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if not self._parked:  # stay as the one spare: a later sender then pays
                        deadline = time.monotonic() + self._idle_s  # no thread start
                        continue
                    return False
                self._parked += 1
                try:
                    self._pool.wait(remaining)
                finally:
                    self._parked -= 1
            return False
