"""The volunteer's side of the HTTP API: one client with the API version header, the bearer
token, retries with backoff on network failures and 5xx, refusals (4xx) raised in words, byte
counters; and the heartbeat a worker sends while it trains a lease."""

from __future__ import annotations

import logging
import random
import threading
import time

import httpx

from crowdtrain.errors import CrowdtrainError
from crowdtrain.wire import protocol

log = logging.getLogger(__name__)


class CoordinatorRefused(CrowdtrainError):
    def __init__(self, status: int, detail: str):
        super().__init__(f"coordinator refused ({status}): {detail}")
        self.status, self.detail = status, detail


class Client:
    """httpx with the API header, the bearer token, retry with backoff, and byte counters."""

    def __init__(self, url: str, retry_for: float = 600.0):
        self.url = url.rstrip("/")
        self.retry_for = retry_for
        self.token: str | None = None
        self.bytes_in = self.bytes_out = 0
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(30.0, read=300.0),
                                 headers={protocol.API_HEADER: str(protocol.API_VERSION)})

    def auth(self) -> dict[str, str]:
        """The bearer-token header once joined (the API version header is on every request)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def call(self, method: str, path: str, *, json_body: dict | None = None,
             content: bytes | None = None) -> httpx.Response:
        headers = self.auth()
        if content is not None:
            headers["Content-Type"] = "application/octet-stream"
        delay, start = 0.5, time.monotonic()
        while True:
            try:
                r = self.http.request(method, path, json=json_body, content=content,
                                      headers=headers)
            except httpx.TransportError as e:
                problem = f"cannot reach the coordinator at {self.url} ({type(e).__name__})"
            else:
                if r.status_code < 400:
                    self.bytes_in += len(r.content)
                    self.bytes_out += len(content or b"")
                    return r
                if r.status_code < 500:
                    try:
                        detail = r.json().get("detail", r.text)
                    except ValueError:
                        detail = r.text
                    if r.status_code == 426:
                        raise CrowdtrainError(str(detail))
                    raise CoordinatorRefused(r.status_code, str(detail))
                problem = f"coordinator error {r.status_code}"
            if time.monotonic() - start > self.retry_for:
                raise CrowdtrainError(f"{problem}; gave up after {self.retry_for:.0f}s of "
                                      "retrying. Check the URL and your connection, then join "
                                      "again")
            log.warning("%s; retrying in %.1fs", problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0) * random.uniform(0.8, 1.2)

    def close(self) -> None:
        self.http.close()


class Heartbeat:
    """While a lease trains: tells the coordinator every `protocol.HEARTBEAT_SECONDS` that the
    work is alive (so a dead worker's lease is given up in seconds, not at the deadline), from
    a thread with its own connection. `closed` turns true when the coordinator answers that the
    lease is no longer open (its round closed): the training can stop early."""

    def __init__(self, client: Client, lease_id: int,
                 every: float = protocol.HEARTBEAT_SECONDS) -> None:
        self.path = protocol.ALIVE.format(lease_id=lease_id)
        self.every, self.step, self.closed = every, 0, False
        self._headers = {**client.http.headers, **client.auth()}
        self._url = client.url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")

    def _beat(self) -> None:
        with httpx.Client(base_url=self._url, timeout=5.0, headers=self._headers) as http:
            while True:
                try:
                    r = http.post(self.path, json={"step": self.step})
                    if r.status_code == 200 and r.json().get("ok") is False:
                        self.closed = True
                        return
                except (httpx.HTTPError, ValueError):
                    pass  # a missed beat is harmless; several in a row give the lease up
                if self._stop.wait(self.every):
                    return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
