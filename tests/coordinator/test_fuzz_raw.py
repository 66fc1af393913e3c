"""Raw bytes against every operation of the coordinator, over a real socket to a real uvicorn.

test_fuzz.py fuzzes through httpx and schemathesis, which only send what they can encode. Here
each request is written by hand (HTTP/1.1 on a plain socket), so a body can be any bytes (not
UTF-8, NUL, a lone UTF-8 surrogate, very long), a path parameter any percent-encoded bytes, and
a header value anything HTTP allows in a field (obs-text 0x80-0xFF, HTAB, visible ASCII).

The operations are enumerated from the app's routes (with what the OpenAPI schema says about
them: path parameter types, request body, the Authorization header), so a new route is fuzzed
without touching this file. Every request is otherwise valid and authenticated (a volunteer's
token, the owner's for admin routes), so the mangled part is the one thing being tested. For
every request: a complete HTTP response comes back (no dropped connection, reset or empty
read), its status is below 500, a JSON error is ASCII `{"detail": ...}`, and wherever the
operation reads the mangled part the answer is a 4xx that blames that part (not 401, 426 or 429
for a mangled body, say); where it does not, the answer is what the unmangled request gets.
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest
from swarm_helpers import copy_run, payload, serving

from crowdtrain.coordinator.rules import Coordinator
from crowdtrain.coordinator.server import create_app
from crowdtrain.wire import protocol
from crowdtrain.wire.protocol import JoinRequest, LeaseRequest

SEED = 0
RANDOM_SAMPLES = 6  # per operation and part, besides the fixed edge cases
TIMEOUT = 20.0  # seconds for one exchange: a server that does not answer fails, not hangs
FIELD_BYTES = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100)) + b" \t"  # a field value
CUSTOM_HEADER = b"X-Crowdtrain-Fuzz"
# statuses that blame something other than the mangled part: auth, API version, rate limit
ELSEWHERE = {401, 426, 429}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
OCTET_STREAM = "application/octet-stream"

EDGE_BYTES = [
    b"",
    b"\xff\xfe\x80",  # not UTF-8 (json.loads reads a UTF-16 BOM in it)
    b"\x80abc",
    b"\x00",
    b"\x00\x00\x00{",  # json.loads guesses UTF-32 from the NULs
    b"\xed\xa0\x80",  # a UTF-16 surrogate encoded as UTF-8: invalid UTF-8
    b'{"name": "\xff", "device": "cpu", "api_version": 1}',  # JSON around a bad byte
    b'{"device": "\\ud800"}',  # a lone surrogate escaped in valid JSON
    b"\xef\xbb\xbf\xff{}",  # a UTF-8 BOM (json.loads skips it), then not UTF-8
    b"[" * 20000,  # nested beyond the JSON parser's recursion limit
    b"\xff" * 65536,  # very long
]


def random_bytes(rng: random.Random, alphabet: bytes | None = None) -> bytes:
    n = rng.choice([1, 3, 16, 100, 1000])
    if alphabet is None:
        return rng.randbytes(n)
    return bytes(rng.choices(alphabet, k=n))


# ---------------------------------------------------------------------------- raw HTTP

@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class Dropped(AssertionError):
    pass


def exchange(port: int, raw: bytes) -> Reply:
    """Send `raw` as is and read until the server closes; the reply must be one complete
    HTTP response (status line, headers, the whole body its headers announce)."""
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(raw)
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:  # reset, broken pipe, timeout
        raise Dropped(f"connection dropped ({e!r}) after {len(data)} bytes: "
                      f"{data[:200]!r}") from None
    if not data:
        raise Dropped("the server closed the connection without answering")
    head, sep, rest = data.partition(b"\r\n\r\n")
    m = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?", head.split(b"\r\n")[0])
    if not sep or not m:
        raise Dropped(f"no complete status line and headers: {data[:200]!r}")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        n = int(headers[b"content-length"])
        if len(rest) < n:
            raise Dropped(f"body cut at {len(rest)} of {n} bytes")
        body = rest[:n]
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            n = int(size_line.split(b";")[0], 16)
            if n == 0:
                break
            if len(rest) < n + 2:
                raise Dropped("chunked body cut short")
            body, rest = body + rest[:n], rest[n + 2:]
    else:
        body = rest
    return Reply(int(m.group(1)), headers, body)


def request_bytes(method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                  body: bytes) -> bytes:
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1",
             b"Connection: close"]
    if not any(k.lower() == b"content-length" for k, _ in headers):
        headers = [*headers, (b"Content-Length", str(len(body)).encode())]
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# ---------------------------------------------------------------------------- operations

@dataclass
class Operation:
    method: str
    path: str  # template, e.g. /v1/submit/{lease_id}
    path_params: dict[str, str]  # name -> OpenAPI type ("integer", "string")
    body_types: list[str]  # request body media types the schema declares
    authenticated: bool  # takes the Authorization header

    @property
    def json_body(self) -> bool:
        return any(t == "application/json" for t in self.body_types)

    @property
    def reads_body(self) -> bool:
        return bool(self.body_types)

    @property
    def admin(self) -> bool:
        return self.path.startswith("/v1/admin/")

    @property
    def versioned(self) -> bool:  # API_HEADER is checked on these
        return self.path.startswith("/v1/")

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def operations(app) -> list[Operation]:
    """Every (method, path) the app routes, HEAD aside; described by the OpenAPI schema where
    the route is in it, else by the route's own path parameters (taken as strings)."""
    paths = app.openapi()["paths"]
    ops = []
    for route in app.routes:
        methods = sorted(m for m in getattr(route, "methods", None) or () if m in METHODS)
        for method in methods:
            op = paths.get(route.path, {}).get(method.lower())
            params = (op or {}).get("parameters", [])
            types = {p["name"]: p.get("schema", {}).get("type", "string")
                     for p in params if p["in"] == "path"}
            for name in getattr(route, "param_convertors", {}):
                types.setdefault(name, "string")
            ops.append(Operation(
                method, route.path, types,
                list((op or {}).get("requestBody", {}).get("content", {})),
                any(p["in"] == "header" and p["name"].lower() == "authorization"
                    for p in params)))
    return ops


@dataclass
class Live:
    port: int
    coord: Coordinator
    ops: list[Operation]
    invite: str
    admin: str
    token: str  # the main volunteer's
    lease_id: int  # the main volunteer's
    shard_sha: str
    joined: int = 0
    sent: dict[str, int] = field(default_factory=dict)  # part -> requests

    def uploader(self) -> tuple[str, protocol.Lease]:
        """A fresh volunteer with a fresh lease: a submit is not rate limited, not refused
        for its volunteer's earlier bad payloads, not a replay."""
        self.joined += 1
        resp = self.coord.join(JoinRequest(name=f"up{self.joined}", device="cpu",
                                           api_version=1, invite=self.invite))
        vol = self.coord.authenticate(resp.token)
        lease = self.coord.lease(vol, LeaseRequest()).lease
        assert lease is not None
        return resp.token, lease

    def valid(self, op: Operation) -> tuple[dict[str, str], dict[bytes, bytes], bytes]:
        """Path values, headers and body of a well-formed, authenticated request to `op`."""
        values = {"lease_id": str(self.lease_id), "round": "0", "sha256": self.shard_sha,
                  "who": "victim", "file": "index.html"}
        token = self.admin if op.admin else self.token
        body = b""
        headers = {b"Accept": b"*/*", protocol.API_HEADER.encode(): str(protocol.API_VERSION)
                   .encode()}
        if OCTET_STREAM in op.body_types:  # the upload: a valid payload for a fresh lease
            token, lease = self.uploader()
            values["lease_id"] = str(lease.lease_id)
            body = payload(lease, self.coord.shapes)
            headers[b"Content-Type"] = b"application/octet-stream"
        elif op.json_body:
            body = json.dumps(VALID_BODIES.get(op.path, {}) | (
                {"invite": self.invite} if op.path == protocol.JOIN else {})).encode()
            headers[b"Content-Type"] = b"application/json"
        if op.authenticated:
            headers[b"Authorization"] = b"Bearer " + token.encode()
        return {k: values.get(k, "1") for k in op.path_params}, headers, body

    def send(self, part: str, op: Operation, values: dict[str, str] | None = None,
             headers: dict[bytes, bytes | None] | None = None, body: bytes | None = None,
             encoded: dict[str, str] | None = None) -> Reply:
        """`op` with the valid parts, some replaced (a header set to None is left out);
        `encoded` path values go in as they are (already percent-encoded)."""
        v, h, b = self.valid(op)
        v.update(values or {})
        for name, value in (headers or {}).items():
            if value is None:
                h.pop(name, None)
            else:
                h[name] = value
        b = b if body is None else body
        target = op.path.format(**{k: (encoded or {}).get(k, quote(x, safe=""))
                                   for k, x in v.items()})
        reply = exchange(self.port, request_bytes(op.method, target.encode(), list(h.items()),
                                                  b))
        self.sent[part] = self.sent.get(part, 0) + 1
        if self.coord.ended:  # POST /v1/admin/end did its job: reopen for the next request
            with self.coord.ledger.tx() as db:
                db.execute("DELETE FROM meta WHERE key = 'ended'")
        return reply


VALID_BODIES = {protocol.JOIN: {"name": "raw", "device": "cpu", "api_version": 1},
                protocol.LEASE: {}, protocol.ALIVE: {"step": 0}}


@pytest.fixture(scope="module")
def live(tiny_run, tmp_path_factory):
    # invite-only: joins through HTTP are not rate limited per address; min_contributions far
    # above what is submitted: no round closes under the test
    run = copy_run(tiny_run, tmp_path_factory.mktemp("fuzz_raw") / "run", inner_steps=5,
                   rounds=2, round_seconds=600, min_contributions=100_000, access="invite")
    coord = Coordinator(run, evaluate_rounds=False)
    try:
        invite = coord.ledger.add_invite(uses=1_000_000)
        admin = coord.new_admin_token()
        coord.join(JoinRequest(name="victim", device="cpu", api_version=1, invite=invite))
        main = coord.join(JoinRequest(name="fuzzer", device="cpu", api_version=1,
                                      invite=invite))
        lease = coord.lease(coord.authenticate(main.token), LeaseRequest()).lease
        ops = operations(create_app(coord))
        with serving(coord) as port:
            yield Live(port, coord, ops, invite, admin, main.token, lease.lease_id,
                       coord.info().train_shards[0].sha256)
    finally:
        coord.close()


@pytest.fixture(scope="module")
def baseline(live) -> dict[str, int]:
    """The status of each operation's well-formed request: what a part the operation does
    not read must leave unchanged."""
    out = {}
    for op in live.ops:
        out[str(op)] = check(live.send("baseline", op), op, "baseline").status
    return out


def check(reply: Reply, op: Operation, what: str) -> Reply:
    assert reply.status < 500, (str(op), what, reply.status, reply.body[:300])
    if reply.headers.get(b"content-type", b"").startswith(b"application/json") \
            and 400 <= reply.status < 500:
        assert reply.body.isascii(), (str(op), what, reply.body[:300])
        detail = json.loads(reply.body)["detail"]
        assert detail, (str(op), what, reply.body[:300])
    return reply


class Failures(list):
    def expect(self, cond: bool, op: Operation, what: str, reply: Reply) -> None:
        if not cond:
            self.append(f"{op} {what}: {reply.status} {reply.body[:200]!r}")

    def done(self) -> None:
        assert not self, f"{len(self)} failure(s):\n" + "\n".join(self[:40])


def test_every_route_is_enumerated(live):
    """The enumeration sees the whole API, hidden routes too (a guard against fuzzing
    nothing)."""
    seen = {str(op) for op in live.ops}
    for method, path in [("POST", protocol.JOIN), ("POST", protocol.LEASE),
                         ("POST", protocol.ALIVE), ("POST", protocol.SUBMIT),
                         ("GET", protocol.SHARD), ("GET", protocol.UPDATE),
                         ("GET", protocol.ADMIN_VOLUNTEERS), ("POST", protocol.ADMIN_BAN),
                         ("POST", protocol.ADMIN_UNBAN), ("POST", protocol.ADMIN_END),
                         ("GET", "/dashboard/{file}"), ("GET", "/openapi.json")]:
        assert f"{method} {path}" in seen, (method, path, sorted(seen))
    submit = next(op for op in live.ops if op.path == protocol.SUBMIT)
    assert submit.reads_body and submit.authenticated and submit.path_params == {
        "lease_id": "integer"}


def test_baseline_requests_succeed(live, baseline):
    """The well-formed requests the fuzzing starts from do what they should: otherwise a 4xx
    below could be for them, not for the mangled part."""
    for op in live.ops:
        if op.path not in (protocol.BASE, protocol.TEACHER, protocol.UPDATE):  # 404 in this run
            assert baseline[str(op)] < 300, (str(op), baseline[str(op)])


def test_raw_bodies(live, baseline):
    """Raw bytes as the body, sent as JSON, as octet-stream and with no Content-Type: a 4xx
    that blames the body (400 not UTF-8 / not JSON, 422 not the message or not a payload)
    from every operation that reads one (the JSON messages, the upload), and no 5xx from
    any."""
    rng = random.Random(SEED)
    failures = Failures()
    for op in live.ops:
        samples = EDGE_BYTES + [random_bytes(rng) for _ in range(RANDOM_SAMPLES)]
        for content_type in (b"application/json", OCTET_STREAM.encode(), None):
            for body in samples:
                what = f"body {body[:24]!r}... ({len(body)} bytes) as {content_type!r}"
                try:
                    r = check(live.send("body", op, headers={b"Content-Type": content_type},
                                        body=body), op, what)
                except AssertionError as e:
                    failures.append(f"{op} {what}: {e}")
                    continue
                if op.reads_body:
                    failures.expect(400 <= r.status < 500 and r.status not in ELSEWHERE, op,
                                    what, r)
    failures.done()


PATH_EDGES = [b"", b"\xff\xfe\x80", b"\x00", b"\x00abc", b"/", b"..", b"%", b"?", b"#", b" ",
              b"\xed\xa0\x80", b"-1", b"9" * 30, b"1.5", b"\xff" * 5000]


def test_raw_path_parameters(live, baseline):
    """Each path parameter in turn is percent-encoded random bytes; every route reads its
    path parameters, so each answer is a 4xx (404 for nothing by that name, 422 for a
    parameter that is no integer, 400 from the HTTP parser for a request line too long)."""
    rng = random.Random(SEED + 1)
    failures = Failures()
    for op in live.ops:
        for name in op.path_params:
            samples = PATH_EDGES + [random_bytes(rng) for _ in range(RANDOM_SAMPLES)]
            for raw in samples:
                what = f"path {name}={raw[:24]!r}... ({len(raw)} bytes)"
                try:
                    r = check(live.send("path", op, encoded={name: quote(raw, safe="")}), op,
                              what)
                except AssertionError as e:
                    failures.append(f"{op} {what}: {e}")
                    continue
                # a trailing "/" (percent-encoded, decoded by the server) is a path Starlette
                # redirects to the one without it
                failures.expect(400 <= r.status < 500 and r.status not in ELSEWHERE
                                or r.status == 307 and raw.endswith(b"/"), op, what, r)
    failures.done()


HEADER_EDGES = {
    "Authorization": [b"", b"Bearer", b"Bearer ", b"Bearer \xff\xfe\x80", b"bearer x",
                      b"Bearer\t\x85\xa0", b"Basic \xff", b"Bearer " + b"\x80" * 8000],
    # "\x852", "2\xa0": Python's int() strips NEL and NBSP; "+2", "1_0", "\xb2" ("²") it reads
    protocol.API_HEADER: [b"", b"\xff\xfe\x80", b"\xb2", b"\x852", b"2\xa0", b"+2", b"1_0",
                          b"-1", b"0", b"9" * 5000, b"\x80" * 8000],
    "Content-Type": [b"", b"\xff\xfe\x80", b"application/\xff", b"text/plain; charset=\xff",
                     b"multipart/form-data; boundary=\xff", b"application/json; charset=\xff",
                     b"application/json\t\x80", b"\x80" * 8000],
    # refused by the HTTP parser, larger than any body the server takes (refused at once), or
    # well-formed and smaller than the body sent (SMALL_LENGTHS: the body is cut short)
    "Content-Length": [b"", b"abc", b"-1", b"+5", b"1e3", b"0x10", b"5 5", b"1,2", b"\xff",
                       b"\xb2", b"\x80" * 8000, b"9" * 40, b"18446744073709551616", b"0", b"1",
                       b"1,1"],
    CUSTOM_HEADER.decode(): [b"", b"\xff\xfe\x80", b"\t", b"\x80" * 8000],
}
SMALL_LENGTHS = {b"0", b"1", b"1,1"}
SMALL_BODY = b"{}"  # sent with every mangled Content-Length: longer than SMALL_LENGTHS


def random_header(rng: random.Random, name: str) -> bytes:
    value = random_bytes(rng, FIELD_BYTES)
    if name == "Authorization" and rng.random() < 0.5:
        value = b"Bearer " + value
    if name == protocol.API_HEADER and value.strip(b" \t").isdigit():
        value += b"x"  # never a valid version by chance
    if name == "Content-Length" and rng.random() < 0.5:  # a number beyond any limit
        value = str(rng.randrange(10**20, 10**60)).encode()
    return value


def expected(op: Operation, name: str, value: bytes) -> str:
    """What header `name` = `value` must get from `op`: "401/403", "426", "4xx" (one that
    blames this header), "same" (the header is not read: the unmangled answer) or "any"."""
    if name == "Authorization":
        return "401/403" if op.authenticated else "same"
    if name == protocol.API_HEADER:
        return "426" if op.versioned else "same"
    if name == "Content-Type":  # read to decide whether the body is JSON
        if not op.json_body:
            return "same"
        return "any" if b"json" in value.lower() else "4xx"
    if name == "Content-Length":  # cuts the body short or is refused (400, 413) at once
        if op.reads_body:
            return "4xx"
        return "same" if value in SMALL_LENGTHS else "any"
    return "same"


def test_raw_header_values(live, baseline):
    """Field values of any bytes HTTP allows, in each header the server reads and in one it
    does not (which must change nothing)."""
    rng = random.Random(SEED + 2)
    failures = Failures()
    for op in live.ops:
        for name, edges in HEADER_EDGES.items():
            samples = edges + [random_header(rng, name) for _ in range(RANDOM_SAMPLES)]
            for value in samples:
                what = f"header {name}: {value[:24]!r}... ({len(value)} bytes)"
                body = SMALL_BODY if name == "Content-Length" else None
                try:
                    r = check(live.send("header", op, headers={name.encode(): value},
                                        body=body), op, what)
                except AssertionError as e:
                    failures.append(f"{op} {what}: {e}")
                    continue
                want = expected(op, name, value)
                if want == "401/403":
                    failures.expect(r.status in (401, 403), op, what, r)
                elif want == "426":
                    failures.expect(r.status == 426, op, what, r)
                elif want == "4xx":
                    failures.expect(400 <= r.status < 500 and r.status not in ELSEWHERE, op,
                                    what, r)
                elif want == "same":
                    failures.expect(r.status == baseline[str(op)], op,
                                    f"{what} (unmangled: {baseline[str(op)]})", r)
    failures.done()


def test_coverage_and_the_run_is_intact(live):
    """Runs last: how much was sent, and the server still answers and the run is where it was
    (round 0, open)."""
    sent = dict(live.sent)
    print(f"\nraw fuzz: {len(live.ops)} operations, requests per part: {sent}")
    assert sent.get("body", 0) >= 3 * len(EDGE_BYTES) * len(live.ops)
    assert sent.get("path", 0) >= len(PATH_EDGES) * 5
    assert sent.get("header", 0) >= len(live.ops) * 5 * 4
    t0 = time.monotonic()
    op = next(op for op in live.ops if op.path == protocol.STATUS)
    assert live.send("final", op).status == 200
    assert time.monotonic() - t0 < TIMEOUT
    assert live.coord.round == 0 and not live.coord.finished
