"""Delivering workflow triggers to sinks, at least once, with the delivery id as idempotency key.

A *delivery* is one workflow trigger for one recipient (a row of the store's `deliveries` table,
created when membership events are published or a broadcast is sent). Its `payload` is the body of
Knock's workflow trigger API (`{"recipients": [...], "tenant": ..., "data": {...}}`), so every sink
sends the same thing. `sinks.py` holds the sinks behind one small interface; `loop.py` sends due
deliveries with retries, back-off, per-sink rate limits and a dead-letter list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Delivery:
    """One trigger to send. `idempotency_key` is the same on every attempt (the delivery id).

    `message_id` is set when the delivery belongs to a batch that a batching sink keeps (a webhook
    with `batch_size` > 1): the batch's id, the same on every attempt of the batch.
    """

    delivery_id: str
    workflow_key: str
    payload: dict
    attempts: int = 0
    message_id: str | None = None

    @property
    def idempotency_key(self) -> str:
        return self.delivery_id


@dataclass(frozen=True)
class Outcome:
    """What happened to one delivery on one attempt.

    `status` is "delivered", "retry" (a timeout, 429 or 5xx: try again, after `retry_after` seconds
    when the sink said so) or "failed" (a permanent refusal such as a 4xx other than 429).
    """

    status: str
    error: str | None = None
    retry_after: float | None = None

    @classmethod
    def delivered(cls) -> Outcome:
        return cls("delivered")

    @classmethod
    def retry(cls, error: str, retry_after: float | None = None) -> Outcome:
        return cls("retry", error, retry_after)

    @classmethod
    def failed(cls, error: str) -> Outcome:
        return cls("failed", error)
