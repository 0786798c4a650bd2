"""What the daemon's two framed servers share: the message socket's connections
(`net.messages`, local programs) and the peer hop's (`net.message_hop`, other daemons). Each
is an asyncio protocol that authenticates its client first, then serves pipelined requests;
this base bounds what one client can make the daemon hold: a deadline for the handshake, and
reading paused while the requests in progress hold too many body bytes or the client does
not read its replies. A refused connection gets its error frame, then is closed.
"""

from __future__ import annotations

import asyncio

from transferd.errors import ProtocolError, TransferdError

__all__ = ["FramedConnection"]


class FramedConnection(asyncio.Protocol):
    """A framed connection served by the daemon. Subclasses name themselves (`what`, in
    errors), encode their own ERROR frame and say how a refusal is logged (`refused`)."""

    what = "framed connection"
    transport: asyncio.Transport  # set by connection_made (or by the subclass that adopts one)

    def __init__(self, *, handshake_timeout_s: float, max_outstanding_bytes: int) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        self.max_outstanding_bytes = max_outstanding_bytes
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.outstanding = 0  # bytes of the bodies of this client's requests in progress
        self.write_blocked = False  # the client does not read its replies fast enough
        self.reading = True

    def _open(self) -> bool:
        return hasattr(self, "transport") and not self.transport.is_closing()

    # -- the handshake's deadline

    def arm_handshake(self) -> None:
        """The client has `handshake_timeout_s` to authenticate (not armed once closing: a
        timer would outlive the connection)."""
        if self._open() and self.handshake_timer is None:
            self.handshake_timer = asyncio.get_running_loop().call_later(
                self.handshake_timeout_s, self._handshake_expired)

    def handshake_done(self) -> None:
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None

    def _handshake_expired(self) -> None:
        self.handshake_timer = None
        self.fail(ProtocolError(f"{self.what}: not authenticated within "
                                f"{self.handshake_timeout_s:g} s"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.handshake_done()

    # -- flow control: stop reading while the requests in progress hold too many bytes or the
    # replies are not read, so a fast client cannot make the daemon buffer without bound.

    def pause_writing(self) -> None:
        self.write_blocked = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self.update_reading()

    def took(self, body_bytes: int) -> None:
        """A request of `body_bytes` started."""
        self.outstanding += body_bytes
        self.update_reading()

    def finished(self, body_bytes: int) -> None:
        """A request of `body_bytes` ended (answered or not)."""
        self.outstanding -= body_bytes
        self.update_reading()

    def update_reading(self) -> None:
        if not self._open():
            return
        want = not self.write_blocked and self.outstanding <= self.max_outstanding_bytes
        if want != self.reading:
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # -- refusing

    def error_frame(self, request_id: int, exc: TransferdError) -> bytes:
        raise NotImplementedError

    def refused(self, exc: TransferdError) -> None:
        raise NotImplementedError

    def write(self, frame: bytes) -> None:
        if self._open():
            self.transport.write(frame)

    def fail(self, exc: TransferdError, request_id: int = 0) -> None:
        """Refuse the connection: the error, then close."""
        self.refused(exc)
        if self._open():
            self.transport.write(self.error_frame(request_id, exc))
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, replies unsent (the daemon is stopping: a client that
        does not read must not hold its shutdown)."""
        if hasattr(self, "transport"):
            self.transport.abort()
