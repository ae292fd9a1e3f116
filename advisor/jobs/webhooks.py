"""Webhooks for terminal job states, signed the Standard Webhooks way and retried with backoff.

Signature (https://www.standardwebhooks.com): ``webhook-signature: v1,<base64 HMAC-SHA256>`` over
``"<webhook-id>.<webhook-timestamp>.<body>"`` with the secret's bytes (a ``whsec_`` secret is
base64 after the prefix). The id stays the same across retries so receivers can de-duplicate; the
timestamp is the time of each attempt, so receivers can refuse replays of old deliveries.

Deliveries are rows in the store (``ft_webhooks``): a restart neither loses nor repeats a delivered
one. Retry schedule after a failure: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, then given up (``failed``),
scaled by ``backoff_scale`` (tests use a small one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from advisor.jobs.spec import new_id
from advisor.jobs.store import Store

log = logging.getLogger("advisor.jobs.webhooks")

RETRY_DELAYS_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0)
TOLERANCE_S = 300


def secret_bytes(secret: str) -> bytes:
    """`whsec_<base64>` -> the decoded key; any other string -> its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :])
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header value for one delivery."""
    mac = hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict[str, str], body: str, now: float | None = None) -> bool:
    """What a receiver does: recompute, compare in constant time, refuse stale timestamps."""
    h = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, ts = h["webhook-id"], int(h["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > TOLERANCE_S:
        return False
    expected = sign(secret, msg_id, ts, body).split(",", 1)[1]
    for sig in h.get("webhook-signature", "").split():
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


def payload(event_type: str, job: dict[str, Any]) -> str:
    """OpenAI's webhook event shape, with the terminal state and error in `data`."""
    doc = {
        "id": new_id("evt"),
        "object": "event",
        "type": event_type,
        "created_at": int(time.time()),
        "data": {
            "id": job["id"],
            "status": job["status"],
            "fine_tuned_model": job.get("fine_tuned_model"),
            "error": job.get("error"),
        },
    }
    return json.dumps(doc, separators=(",", ":"))


@dataclass
class WebhookSender:
    """Sends due deliveries from the store; call `send_due()` periodically (the manager does)."""

    store: Store
    url: str
    secret: str | None
    timeout_s: float = 10.0
    backoff_scale: float = 1.0
    clock: Callable[[], float] = time.time

    def enqueue(self, job: dict[str, Any]) -> None:
        event_type = f"fine_tuning.job.{job['status']}"
        self.store.add_webhook(
            {
                "id": new_id("msg"),
                "job_id": job["id"],
                "type": event_type,
                "payload": payload(event_type, job),
                "next_attempt_at": self.clock(),
            }
        )

    def headers(self, msg_id: str, body: str) -> dict[str, str]:
        ts = int(self.clock())
        h = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts)}
        if self.secret:
            h["webhook-signature"] = sign(self.secret, msg_id, ts, body)
        return h

    def send_due(self, client: httpx.Client | None = None) -> int:
        """Attempt every due delivery once; returns how many were delivered."""
        due = self.store.due_webhooks(self.clock())
        if not due:
            return 0
        own = client is None
        client = client or httpx.Client(timeout=self.timeout_s, follow_redirects=False)
        delivered = 0
        try:
            for d in due:
                delivered += self._attempt(client, d)
        finally:
            if own:
                client.close()
        return delivered

    def _attempt(self, client: httpx.Client, d: dict[str, Any]) -> bool:
        attempts = d["attempts"] + 1
        error: str | None = None
        try:
            r = client.post(self.url, content=d["payload"].encode(), headers=self.headers(d["id"], d["payload"]))
            if 200 <= r.status_code < 300:
                self.store.update_webhook(d["id"], status="delivered", attempts=attempts, last_error=None)
                return True
            error = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if attempts > len(RETRY_DELAYS_S):
            log.warning("webhook %s for %s given up after %d attempts: %s", d["id"], d["job_id"], attempts, error)
            self.store.update_webhook(d["id"], status="failed", attempts=attempts, last_error=error)
        else:
            delay = RETRY_DELAYS_S[attempts - 1] * self.backoff_scale
            self.store.update_webhook(
                d["id"], attempts=attempts, last_error=error, next_attempt_at=self.clock() + delay
            )
        return False
