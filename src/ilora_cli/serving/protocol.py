"""uvicorn's HTTP/1.1 protocol (h11) with a clock on what each connection owes: its next request.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) but restarts that clock on every byte,
and has no clock at all while it waits for a request's head or body: a client that opens a connection and
sends nothing, or one byte at a time, holds it forever. The app cannot help with the head, which it only sees
once it is whole. This protocol, given to uvicorn as its ``http`` class, closes a connection whose request line
and headers have not arrived within ``read_timeout_s`` of its opening (or of its previous answer). The body is
the app's to time (``app.BodyLimit`` answers 408 after ``read_timeout_s``); this protocol closes a connection
whose body is still unfinished at twice that, for a body nobody reads (after an early answer: 401, 413, 503).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("uvicorn.error")

WAITING = (h11.IDLE, h11.SEND_BODY)  # the client's states in which the server waits for it: a head, a body


class RequestDeadline(H11Protocol):
    """H11Protocol that closes a connection whose next request does not arrive in time (module docstring)."""

    read_timeout_s = 10.0  # set by with_timeout
    _clock: asyncio.TimerHandle | None = None
    _timing: object = None  # the client state the clock is running for (h11.IDLE or h11.SEND_BODY)

    @classmethod
    def with_timeout(cls, seconds: float) -> type[RequestDeadline]:
        """This protocol with ``read_timeout_s`` set (uvicorn builds one per connection from the class)."""
        return type(cls.__name__, (cls,), {"read_timeout_s": seconds})

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Start the clock when the client starts owing something else (a head, a body); stop it once the
        request is whole. Bytes that arrive meanwhile do not restart it."""
        state = self.conn.their_state
        if state not in WAITING or self.transport.is_closing():
            self._stop_clock()
        elif state is not self._timing:
            self._stop_clock()
            seconds = self.read_timeout_s * (1 if state is h11.IDLE else 2)
            self._timing, self._clock = state, self.loop.call_later(seconds, self._overdue)

    def _stop_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
        self._clock = self._timing = None

    def _overdue(self) -> None:
        waited = "request line and headers" if self._timing is h11.IDLE else "body"
        self._clock = self._timing = None
        if not self.transport.is_closing():
            log.info("Closed a connection whose %s did not arrive in time (read_timeout_s).", waited)
            self.transport.close()
