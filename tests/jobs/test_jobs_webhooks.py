"""Standard Webhooks: the published test vector, a real receiver that fails first, retries, give-up,
and a terminal job state delivered signed from the service."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from jobs_helpers import AUTH, tiny_job, upload, wait_for

from advisor.jobs.store import Store
from advisor.jobs.webhooks import RETRY_DELAYS_S, WebhookSender, sign, verify

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    body = '{"test": 2432232314}'
    sig = sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": sig,
    }
    assert verify(SECRET, headers, body, now=1614265330)
    assert not verify(SECRET, headers, body + " ", now=1614265330)  # tampered body
    assert not verify(SECRET, headers, body, now=1614265330 + 3600)  # replayed an hour later
    assert not verify("whsec_" + "QUJD", headers, body, now=1614265330)  # another secret


class Receiver:
    """A real HTTP endpoint: answers `statuses` in turn (then 200) and records what it got."""

    def __init__(self, statuses: list[int]):
        self.statuses = list(statuses)
        self.got: list[tuple[dict[str, str], str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(statuses: list[int]) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _sender(tmp_path: Path, url: str, clock: list[float]) -> WebhookSender:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create()
    return WebhookSender(store, url, SECRET, clock=lambda: clock[0])


JOB = {"id": "ftjob-0123456789ab", "status": "succeeded", "fine_tuned_model": "ft:m::x", "error": None}


def test_failed_deliveries_are_retried_with_backoff_then_delivered(tmp_path: Path, receiver) -> None:
    rx = receiver([500, 503])
    clock = [1_000_000.0]
    s = _sender(tmp_path, rx.url, clock)
    s.enqueue(JOB)
    assert s.send_due() == 0 and len(rx.got) == 1
    assert s.send_due() == 0 and len(rx.got) == 1  # not due before its backoff
    clock[0] += RETRY_DELAYS_S[0]
    assert s.send_due() == 0 and len(rx.got) == 2
    clock[0] += RETRY_DELAYS_S[1]
    assert s.send_due() == 1 and len(rx.got) == 3
    (row,) = s.store.webhooks_for(JOB["id"])
    assert row["status"] == "delivered" and row["attempts"] == 3
    ids = {h["webhook-id"] for h, _ in rx.got}
    assert ids == {row["id"]}  # one id across retries: receivers de-duplicate on it
    for headers, body in rx.got:
        assert verify(SECRET, headers, body, now=int(headers["webhook-timestamp"]))
    doc = json.loads(rx.got[-1][1])
    assert doc["type"] == "fine_tuning.job.succeeded" and doc["data"]["id"] == JOB["id"]


def test_deliveries_are_given_up_after_the_last_retry(tmp_path: Path, receiver) -> None:
    rx = receiver([500] * 100)
    clock = [0.0]
    s = _sender(tmp_path, rx.url, clock)
    s.enqueue(JOB)
    for _ in range(len(RETRY_DELAYS_S) + 1):
        s.send_due()
        clock[0] += max(RETRY_DELAYS_S) + 1
    (row,) = s.store.webhooks_for(JOB["id"])
    assert row["status"] == "failed" and row["attempts"] == len(RETRY_DELAYS_S) + 1 and row["last_error"] == "HTTP 500"
    assert s.send_due() == 0 and len(rx.got) == len(RETRY_DELAYS_S) + 1


def test_a_terminal_job_is_posted_signed(make_client, tiny_root: Path, receiver) -> None:
    rx = receiver([502])  # the first attempt fails; the retry (5 s x 0.01) succeeds
    client = make_client(webhook_url=rx.url, webhook_secret=SECRET, webhook_retry_scale=0.01)
    f = upload(client, tiny_root / "train.jsonl")
    job = client.post("/v1/fine_tuning/jobs", headers=AUTH, json=tiny_job(tiny_root / "model", f["id"])).json()
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=AUTH)
    wait_for(lambda: {"n": len(rx.got)}, lambda d: d["n"] >= 2, timeout=60)
    headers, body = rx.got[-1]
    assert verify(SECRET, headers, body)
    doc = json.loads(body)
    assert doc["type"] == "fine_tuning.job.cancelled" and doc["data"]["id"] == job["id"]
    assert doc["data"]["error"]["code"] == "cancelled"
