"""Downloads of the run's files by sha256 (volunteer/client.download): a transfer broken halfway
resumes where it stopped with an HTTP range request, against a real HTTP server; a server that
ignores ranges makes it start again; a wrong sha256 is refused and nothing is kept; and the
coordinator's own blob route answers range requests."""

from __future__ import annotations

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from crowdtrain.errors import CorruptDataError
from crowdtrain.volunteer.client import CoordinatorRefused, download

DATA = os.urandom(3_000_000)
SHA = hashlib.sha256(DATA).hexdigest()


class FlakyServer:
    """Serves DATA at /blob with range requests; the first `breaks` answers send half of what
    they promise and drop the connection. Records each request's Range header."""

    def __init__(self, breaks: int = 1, ranges: bool = True):
        self.breaks, self.ranges, self.seen = breaks, ranges, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                rng = self.headers.get("Range")
                outer.seen.append(rng)
                if self.path != "/blob":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng and outer.ranges else 0
                body = DATA[start:]
                if start:
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.breaks > 0:
                    outer.breaks -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FlakyServer()
    yield s
    s.close()


def test_a_download_broken_halfway_resumes_where_it_stopped(server, tmp_path):
    dest = tmp_path / "cache" / SHA
    with httpx.Client() as http:
        download(http, f"{server.url}/blob", dest, SHA, "a shard", retry_for=30)
    assert dest.read_bytes() == DATA and not (tmp_path / "cache" / f"{SHA}.part").exists()
    first, second = server.seen
    assert first is None  # the first request asks for the whole file ...
    assert second == f"bytes={len(DATA) // 2}-"  # ... the second only what did not arrive


def test_a_server_without_ranges_makes_it_start_again(tmp_path):
    s = FlakyServer(ranges=False)
    try:
        with httpx.Client() as http:
            download(http, f"{s.url}/blob", tmp_path / "f", SHA, "a shard", retry_for=30)
    finally:
        s.close()
    assert (tmp_path / "f").read_bytes() == DATA and len(s.seen) == 2


def test_a_file_whose_sha256_differs_is_refused_and_not_kept(tmp_path):
    s = FlakyServer(breaks=0)
    try:
        with httpx.Client() as http, pytest.raises(CorruptDataError, match="corrupt"):
            download(http, f"{s.url}/blob", tmp_path / "f", "0" * 64, "a shard", retry_for=5)
        with httpx.Client() as http, pytest.raises(CoordinatorRefused) as e:
            download(http, f"{s.url}/missing", tmp_path / "g", SHA, "a shard", retry_for=5)
    finally:
        s.close()
    assert e.value.status == 404
    assert not any(tmp_path.iterdir())  # neither the file nor a part of it


def test_the_coordinators_blob_route_answers_range_requests(tiny_run, tmp_path):
    from fastapi.testclient import TestClient
    from swarm_helpers import copy_run

    from crowdtrain.coordinator.rules import Coordinator
    from crowdtrain.coordinator.server import create_app
    from crowdtrain.wire import protocol

    run = copy_run(tiny_run, tmp_path / "run")
    coord = Coordinator(run, evaluate_rounds=False)
    with TestClient(create_app(coord)) as c:
        r = c.post(protocol.JOIN, json={"name": "ann", "device": "cpu",
                                        "api_version": protocol.API_VERSION})
        auth = {"Authorization": f"Bearer {r.json()['token']}"}
        art = protocol.Artifacts.model_validate(c.get(protocol.ARTIFACTS, headers=auth).json())
        whole = (run.public_dir / art.model_sha256).read_bytes()
        assert hashlib.sha256(whole).hexdigest() == art.model_sha256
        assert len(whole) == art.model_bytes
        r = c.get(protocol.BLOB.format(sha256=art.model_sha256),
                  headers={**auth, "Range": "bytes=100-"})
        assert r.status_code == 206 and r.content == whole[100:]
        assert coord.status().bytes_served[protocol.BLOB] == len(whole) - 100  # per route
        assert c.get(protocol.BLOB.format(sha256="f" * 64), headers=auth).status_code == 404
        assert c.get(protocol.BLOB.format(sha256=art.model_sha256)).status_code == 401
