"""Admission's wake-up: requests the policy could not place wait here until something that can
change its answer happens, instead of asking again on a timer.

What can change a decision is what the policy reads: a worker's load report, a worker joining,
leaving or turning healthy. All of them arrive with the pool's poll rounds, which call ``notify``;
every request waiting then asks the policy again, in the order it began to wait. A request
finishing does not wake them: what it frees (a batch slot, KV blocks) reaches the policy only with
the worker's next load report, so waking on it would only repeat the same answer (hundreds of
times a second under load). A wait also ends at the request's deadline, after which the
dispatcher asks once more and sheds (429) if still no pair will do.
"""

from __future__ import annotations

import asyncio


class AdmissionSignal:
    def __init__(self) -> None:
        self._event: asyncio.Event | None = None  # made by the first waiter, dropped by notify

    def notify(self) -> None:
        """Wake every waiting request."""
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self, timeout_s: float) -> bool:
        """Until the next ``notify`` (True) or ``timeout_s`` (False)."""
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await event.wait()
        except TimeoutError:
            return False
        return True
