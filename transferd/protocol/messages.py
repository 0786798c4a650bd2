"""Interactive messages: small objects delivered to a peer's inbox with a deadline, on the
control or interactive class.

A message crosses as its raw body, with a `MessageEnvelope` in the request headers (id, class,
sent-at and deadline as Unix time, so deadlines assume NTP-synchronised clocks, as the request
signatures' timestamps already do). The receiver answers `MessageAck` and flags a message that
arrived after its deadline `late`; it is still delivered (a miss is reported, never a silent
drop). `MessageLedger` makes receiving idempotent per (source, id): a retry whose first answer
was lost gets the same answer and stores nothing twice. The sender's view of one message is its
`MessageReceipt`.
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from typing import Annotated

from pydantic import (
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    computed_field,
)

from netplan.plan import TrafficClass
from transferd.protocol.wire import FrozenModel, WireModel

__all__ = [
    "MAX_INBOX_WAIT_MS",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_CLASSES",
    "InboxAnswer",
    "InboxMessage",
    "InboxQuery",
    "MessageAck",
    "MessageEnvelope",
    "MessageLedger",
    "MessageQuery",
    "MessageReceipt",
    "late_reason",
]

MESSAGE_CLASSES = (TrafficClass.CONTROL, TrafficClass.INTERACTIVE)
MAX_MESSAGE_BYTES = 16 << 20  # "small objects": bigger payloads belong to `transferd send`
# Bound a long-poll: a proxy or client timeout is usually about a minute.
MAX_INBOX_WAIT_MS = 60_000.0


def _message_class(value: TrafficClass) -> TrafficClass:
    if value not in MESSAGE_CLASSES:
        raise ValueError(
            f"{value.value!r} is not a message class (control, interactive);"
            " send bulk data with `transferd send`"
        )
    return value


MessageClass = Annotated[TrafficClass, PlainValidator(lambda v: _message_class(TrafficClass(v)))]


def _from_base64(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {exc}") from exc


Base64Body = Annotated[
    bytes,
    PlainValidator(_from_base64),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
]


class MessageEnvelope(FrozenModel):
    """The headers of a message between daemons (the body is the message's bytes)."""

    model_config = ConfigDict(extra="ignore", validate_by_name=True)

    id: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        validation_alias="X-Transferd-Message-Id"
    )
    traffic_class: MessageClass = Field(validation_alias="X-Transferd-Class")
    sent_at: float = Field(validation_alias="X-Transferd-Sent-At")  # Unix seconds
    deadline: float | None = Field(
        default=None, validation_alias="X-Transferd-Deadline"
    )  # Unix seconds

    def headers(self) -> dict[str, str]:
        out = {
            "X-Transferd-Message-Id": self.id,
            "X-Transferd-Class": self.traffic_class.value,
            "X-Transferd-Sent-At": f"{self.sent_at:.6f}",
        }
        if self.deadline is not None:
            out["X-Transferd-Deadline"] = f"{self.deadline:.6f}"
        return out


class MessageAck(WireModel):
    """The receiving daemon's answer: when it took the message and whether that was late."""

    id: str
    late: bool
    received_at: float


class MessageQuery(FrozenModel):
    """`POST /v1/messages/{peer}?class=interactive&deadline_ms=50&wait=1` (local API)."""

    model_config = ConfigDict(validate_by_name=True)

    traffic_class: MessageClass = Field(
        default=TrafficClass.INTERACTIVE, validation_alias="class"
    )
    deadline_ms: Annotated[float, Field(ge=0)] | None = None  # None: the daemon's default
    wait: bool = True  # False: answer 202 once queued


class InboxQuery(FrozenModel):
    """`GET /v1/inbox?wait_ms=1000&max=100` (local API)."""

    wait_ms: Annotated[float, Field(ge=0, le=MAX_INBOX_WAIT_MS)] = 0.0
    max: Annotated[int, Field(ge=1, le=10_000)] = 100


class MessageReceipt(WireModel):
    """What the sender learns: delivered or queued, late or not, and any budget miss reason."""

    model_config = ConfigDict(validate_by_name=True)

    id: str
    peer: str
    traffic_class: TrafficClass = Field(serialization_alias="class", validation_alias="class")
    delivered: bool
    late: bool
    latency_ms: float | None
    budget_miss: str | None


class InboxMessage(WireModel):
    """A received message as a local consumer reads it (`transferd inbox`: one per line)."""

    # `size` is written for readers and derived from the body when read back.
    model_config = ConfigDict(validate_by_name=True, extra="ignore")

    id: str
    source: str = Field(serialization_alias="from", validation_alias="from")
    traffic_class: TrafficClass = Field(serialization_alias="class", validation_alias="class")
    sent_at: float
    deadline: float | None
    received_at: float
    late: bool
    body: Base64Body = Field(
        serialization_alias="body_b64", validation_alias="body_b64", repr=False
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def size(self) -> int:
        return len(self.body)


class InboxAnswer(WireModel):
    messages: list[InboxMessage]


def late_reason(peer: str, ack: MessageAck, deadline: float | None) -> str | None:
    """Why a delivered message is late (the peer took it after its deadline), or None."""
    if not ack.late or deadline is None:
        return None
    late_ms = max(0.0, ack.received_at - deadline) * 1000.0
    return f"reached {peer} {late_ms:.1f} ms after its deadline"


class MessageLedger:
    """Messages received, for idempotency: the answer already given to each (source, id),
    the newest `max_entries` of them."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._answers: OrderedDict[tuple[str, str], MessageAck] = OrderedDict()

    def accept(
        self, source: str, envelope: MessageEnvelope, body: bytes, now: float
    ) -> tuple[MessageAck, InboxMessage | None]:
        """The answer for this message, and the message to deliver (None: a retry of one
        delivered already)."""
        key = (source, envelope.id)
        known = self._answers.get(key)
        if known is not None:
            return known, None
        late = envelope.deadline is not None and now > envelope.deadline
        message = InboxMessage(
            id=envelope.id,
            source=source,
            traffic_class=envelope.traffic_class,
            sent_at=envelope.sent_at,
            deadline=envelope.deadline,
            received_at=now,
            late=late,
            body=body,
        )
        return MessageAck(id=envelope.id, late=late, received_at=now), message

    def record(self, source: str, ack: MessageAck) -> None:
        """Remember the answer once the message is stored (a refused one may come again)."""
        self._answers[(source, ack.id)] = ack
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)

