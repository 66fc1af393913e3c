"""The volunteer's side of the HTTP API: one client with the API version header, the bearer
token, retries with backoff on network failures and 5xx, refusals (4xx) raised in words, byte
counters; downloads of the run's files by sha256 that resume where a broken transfer stopped
(HTTP range requests), from the coordinator or the run's public URL; and the heartbeat a worker
sends while it trains a lease."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from pathlib import Path

import httpx

from crowdtrain.errors import CorruptDataError, CrowdtrainError
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
        self.public_url: str | None = None  # the run's files by sha256, when it has one
        self._public: httpx.Client | None = None
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

    def fetch(self, sha256: str, dest: Path, what: str) -> Path:
        """The run's file with this sha256 (announced by the coordinator) into `dest`: from
        the public URL when the run has one (falling back to the coordinator if the web server
        does not have it yet), else from the coordinator; resumed across broken transfers and
        sha256-checked whatever served it."""
        if self.public_url:
            try:
                return download(self.public, f"{self.public_url}/{sha256}", dest, sha256, what,
                                retry_for=self.retry_for, counter=self)
            except CoordinatorRefused as e:
                if e.status != 404:
                    raise
                log.warning("%s is not on %s yet; fetching it from the coordinator", what,
                            self.public_url)
        return download(self.http, protocol.BLOB.format(sha256=sha256), dest, sha256, what,
                        headers=self.auth(), retry_for=self.retry_for, counter=self)

    @property
    def public(self) -> httpx.Client:
        """A plain client for the public URL: no bearer token travels to a web server."""
        if self._public is None:
            self._public = httpx.Client(timeout=httpx.Timeout(30.0, read=300.0))
        return self._public

    def close(self) -> None:
        self.http.close()
        if self._public is not None:
            self._public.close()


def download(http: httpx.Client, url: str, dest: Path, sha256: str, what: str, *,
             headers: dict | None = None, retry_for: float = 600.0, counter=None) -> Path:
    """GET `url` into `dest` (written as `dest`.part, renamed once whole): a transfer that
    breaks resumes with a range request from the bytes already on disk, retried with backoff
    for `retry_for` seconds; the whole file's sha256 must be `sha256`. A server that ignores
    the range (200) starts the file again. 4xx: CoordinatorRefused."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    delay, start = 0.5, time.monotonic()
    while True:
        have = part.stat().st_size if part.is_file() else 0
        hdrs = {**(headers or {}), "Accept-Encoding": "identity",  # the bytes as stored
                **({"Range": f"bytes={have}-"} if have else {})}
        problem = None
        try:
            with http.stream("GET", url, headers=hdrs) as r:
                if r.status_code == 416:  # the part on disk is not a prefix we can extend
                    part.unlink(missing_ok=True)
                    continue
                if 400 <= r.status_code < 500:
                    r.read()
                    try:
                        detail = r.json().get("detail", r.text)
                    except ValueError:
                        detail = r.text[:200]
                    raise CoordinatorRefused(r.status_code, f"{what}: {detail}")
                if r.status_code >= 500:
                    problem = f"server error {r.status_code} for {what}"
                else:
                    resumed = r.status_code == 206 and _range_start(r) == have
                    with open(part, "ab" if resumed else "wb") as f:
                        for chunk in r.iter_bytes():  # as they arrive: a break keeps them
                            f.write(chunk)
                            if counter is not None:
                                counter.bytes_in += len(chunk)
                    expected = _expected_size(r, have if resumed else 0)
                    got = part.stat().st_size
                    if expected is None or got == expected:
                        break
                    problem = f"{what}: the transfer ended at {got} of {expected} bytes"
        except httpx.TransportError as e:
            problem = f"{what}: the transfer broke ({type(e).__name__})"
        if time.monotonic() - start > retry_for:
            raise CrowdtrainError(f"{problem}; gave up after {retry_for:.0f}s of retrying. "
                                  "Check your connection, then join again")
        log.warning("%s; resuming in %.1fs", problem, delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0) * random.uniform(0.8, 1.2)
    h = hashlib.sha256()
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise CorruptDataError(f"{what} is corrupt: sha256 {h.hexdigest()[:12]}... != announced "
                               f"{sha256[:12]}...; join again to fetch it anew")
    os.replace(part, dest)
    return dest


def _range_start(r: httpx.Response) -> int | None:
    """The first byte of a 206 answer (`Content-Range: bytes START-END/TOTAL`)."""
    try:
        return int(r.headers["content-range"].split()[1].split("-")[0])
    except (KeyError, IndexError, ValueError):
        return None


def _expected_size(r: httpx.Response, offset: int) -> int | None:
    """The whole file's size the answer promises: Content-Range's total, else offset +
    Content-Length; None when it says neither (then what arrived is taken as whole)."""
    total = r.headers.get("content-range", "").rpartition("/")[2]
    if total.isdigit():
        return int(total)
    length = r.headers.get("content-length")
    return offset + int(length) if length and length.isdigit() else None


class Heartbeat:
    """While a lease trains: tells the coordinator every `protocol.HEARTBEAT_SECONDS` that the
    work is alive (so a dead worker's lease is given up in seconds, not at the deadline), from
    a thread with its own connection. `closed` turns true when the coordinator answers that the
    lease is no longer open (its round closed): the training can stop early. `finish` turns
    true when it asks the lease to end now and send the steps done (an overlapped round it
    could not pace)."""

    def __init__(self, client: Client, lease_id: int,
                 every: float = protocol.HEARTBEAT_SECONDS) -> None:
        self.path = protocol.ALIVE.format(lease_id=lease_id)
        # `every` may change while it runs: a lease trained ahead beats every
        # protocol.HEARTBEAT_AHEAD_SECONDS until the update it waits for is published
        self.every, self.step, self.closed, self.finish = every, 0, False, False
        self.open_round: int | None = None  # the coordinator's open round, as last heard
        self._headers = {**client.http.headers, **client.auth()}
        self._url = client.url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")

    def _beat(self) -> None:
        with httpx.Client(base_url=self._url, timeout=5.0, headers=self._headers) as http:
            while True:
                try:
                    r = http.post(self.path, json={"step": self.step})
                    if r.status_code == 200:
                        answer = protocol.AliveResponse.model_validate(r.json())
                        self.open_round = answer.round
                        self.finish = self.finish or answer.finish
                        if not answer.ok:
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
