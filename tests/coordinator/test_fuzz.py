"""Fuzzing the coordinator's untrusted inputs: the tensor-payload decoder (hypothesis), the
stats a payload carries through `Coordinator.submit`, every operation of the OpenAPI schema
(schemathesis, in-process ASGI), and hand-written hostile HTTP requests.

Every malformed input must be refused with a 4xx (or `CodecError` from the decoder) that names
the cause, never a 5xx or any other exception, and must leave the run as it was.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from types import SimpleNamespace

import httpx
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from schemathesis.checks import not_a_server_error
from swarm_helpers import copy_run, make_delta, payload, poisoned_payload, serving

from crowdtrain.coordinator.rules import Coordinator
from crowdtrain.coordinator.server import create_app
from crowdtrain.errors import Refused
from crowdtrain.wire import codecs, protocol
from crowdtrain.wire.protocol import LeaseRequest, SubmitStats

# Every dtype name the safetensors (Rust) header parser accepts, and its width in bits
ST_DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
             "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
             "C64", "F64", "I64", "U64"]
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
              "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16,
              "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
              "F64": 64, "I64": 64, "U64": 64}
# dtypes the Rust parser accepts but `safetensors.torch` has no torch mapping for
UNMAPPED_DTYPES = ["F4", "F6_E2M3", "F6_E3M2", "F8_E8M0"]
# ids SQLite cannot hold (it stores signed 64-bit integers), and edges that it can
OUT_OF_INT64 = [2**63, -(2**63) - 1, 2**64, 10**30]
EDGES = [None, *OUT_OF_INT64, 2**63 - 1, -1]
SMALL = {"a": (3, 4), "b": (5,)}  # a small model for hand-built headers
SMALL_BLOCK = 16
MAX_SECONDS = 10.0  # "never hang": one decode of a small payload must not take longer
FAST = settings(deadline=None, database=None)

BIG_INTS = [-1, -(2**63) - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
            10**30]


# ---------------------------------------------------------------------------- helpers

def _header_blob(header: object, data: bytes = b"", length: int | None = None,
                 pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def _stats_json(lease_id: int, rnd: int = 0, **kw) -> str:
    fields = {"lease_id": lease_id, "round": rnd, "steps": 5, "tokens": 1000, "mean_loss": 5.0,
              "seconds": 1.0, **kw}
    return json.dumps(fields)


def _raw_payload(wire: dict, codec: str, stats: str | None, block: int = codecs.BLOCK) -> bytes:
    meta = {"codec": codec, "block": str(block)}
    if stats is not None:
        meta["stats"] = stats
    return st_save(wire, metadata=meta)


def check_decode(blob: bytes, shapes: dict, max_bytes: int | None = None):
    """`from_bytes` either refuses with CodecError or returns exactly the expected, finite
    float32 tensors and a str -> str metadata dict; anything else propagates and fails."""
    t0 = time.monotonic()
    try:
        tensors, meta = codecs.from_bytes(blob, shapes, max_bytes=max_bytes)
    except codecs.CodecError:
        return None
    finally:
        assert time.monotonic() - t0 < MAX_SECONDS, "from_bytes took too long"
    assert set(tensors) == set(shapes)
    for name, shape in shapes.items():
        t = tensors[name]
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32, name
        assert tuple(t.shape) == tuple(shape), name
        assert bool(torch.isfinite(t).all()), name
    assert isinstance(meta, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    return tensors, meta


@pytest.fixture(scope="module")
def tiny_shapes(tiny_run):
    _, ckpt = tiny_run.load_model()
    return {k: tuple(v.shape) for k, v in ckpt.tensors.items()}


@pytest.fixture(scope="module")
def valid_blobs(tiny_shapes):
    delta = make_delta(tiny_shapes)
    return {c: codecs.to_bytes(delta, c, meta={"stats": "{}"}) for c in codecs.CODECS}


def _coordinator(tiny_run, tmp_path) -> Coordinator:
    # min_contributions far above what the tests submit: no round can close under them
    run = copy_run(tiny_run, tmp_path / "run", inner_steps=5, rounds=2, round_seconds=600,
                   min_contributions=1000)
    return Coordinator(run, evaluate_rounds=False)


def _refused_rows(coord: Coordinator) -> list:
    return [r for r in coord.ledger.contributions() if r["status"] == "refused"]


def _accepted_rows(coord: Coordinator) -> list:
    return [r for r in coord.ledger.contributions() if r["status"] == "accepted"]


# ---------------------------------------------------------------------------- strategies

json_scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(BIG_INTS)
                | st.floats() | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=8)
dims = st.integers(0, 8) | st.sampled_from(BIG_INTS) | st.integers()
fuzz_shape = st.lists(dims, max_size=4) | json_values
offsets = st.integers(0, 96) | st.sampled_from(BIG_INTS) | st.integers()
fuzz_offsets = st.lists(offsets, max_size=3) | json_values
fuzz_dtype = st.sampled_from(ST_DTYPES) | st.text(max_size=8) | json_values
fuzz_entry = (st.fixed_dictionaries({"dtype": fuzz_dtype, "shape": fuzz_shape,
                                     "data_offsets": fuzz_offsets},
                                    optional={"extra": json_values})
              | json_values)
tensor_names = (st.sampled_from(["a", "b", "a:q", "a:scale", "b:q", "b:scale", ""])
                | st.text(max_size=6))
meta_values = (st.sampled_from(list(codecs.CODECS))
               | st.sampled_from(["16", "256", "0", "15", "65537", "1e3", " 256", "0256",
                                  "９", "-16", "999999"])
               | st.text(max_size=10) | json_values)
fuzz_metadata = (st.dictionaries(st.sampled_from(["codec", "block", "stats"]) | st.text(max_size=5),
                                 meta_values, max_size=4)
                 | json_values)
header_lengths = (st.none() | st.integers(0, 2**64 - 1)
                  | st.sampled_from([0, 1, 7, 8, 2**32, 100 * 1024 * 1024 + 1, 2**63, 2**64 - 1]))


def _valid_small_header(codec: str) -> tuple[dict, bytes]:
    """The parsed header and data section of a valid payload for SMALL."""
    delta = {k: torch.full(s, 0.5) for k, s in SMALL.items()}
    blob = codecs.to_bytes(delta, codec, block=SMALL_BLOCK)
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


# ---------------------------------------------------------------------------- 1. decoder

@settings(FAST, max_examples=300)
@given(blob=st.binary(max_size=2048)
       | st.builds(lambda n, rest: struct.pack("<Q", n) + rest,
                   st.integers(0, 300) | st.integers(0, 2**64 - 1), st.binary(max_size=512)))
def test_decoder_random_bytes(tiny_shapes, blob):
    assert check_decode(blob, tiny_shapes, max_bytes=1 << 20) is None


mutations = st.lists(
    st.one_of(st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(0, 255),
                        st.booleans()),
              st.tuples(st.just("truncate"), st.integers(0, 2**31)),
              st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64))),
    min_size=1, max_size=6)


@settings(FAST, max_examples=120)
@given(codec=st.sampled_from(codecs.CODECS), ops=mutations)
def test_decoder_mutated_valid_payload(tiny_shapes, valid_blobs, codec, ops):
    blob = bytearray(valid_blobs[codec])
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    for op in ops:
        if op[0] == "flip" and blob:
            _, pos, val, in_header = op
            pos = pos % min(len(blob), 8 + n) if in_header else pos % len(blob)
            blob[pos] = val
        elif op[0] == "truncate":
            blob = blob[: op[1] % (len(blob) + 1)]
        elif op[0] == "extend":
            blob += op[1]
    limit = len(valid_blobs[codec]) + 32  # some extensions go past the limit
    check_decode(bytes(blob), tiny_shapes, max_bytes=limit)


@settings(FAST, max_examples=300)
@given(tensors=st.dictionaries(tensor_names, fuzz_entry, max_size=4),
       metadata=st.none() | fuzz_metadata, data=st.binary(max_size=96),
       length=header_lengths, pad=st.integers(0, 8))
def test_decoder_fuzzed_header(tensors, metadata, data, length, pad):
    header = dict(tensors)
    if metadata is not None:
        header["__metadata__"] = metadata
    check_decode(_header_blob(header, data, length, pad), SMALL, max_bytes=1 << 16)


@settings(FAST, max_examples=300)
@given(codec=st.sampled_from(codecs.CODECS), data=st.data())
def test_decoder_valid_header_with_one_fuzzed_field(codec, data):
    header, body = _valid_small_header(codec)
    names = sorted(k for k in header if k != "__metadata__")
    where = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "metadata", "extra",
                                       "drop", "body", "retype"]))
    if where == "retype":  # another dtype over the same bytes, with a shape that fits them
        name = data.draw(st.sampled_from(names))
        # half the time one torch cannot represent: the parser accepts it, torch may not
        dtype = data.draw(st.sampled_from(UNMAPPED_DTYPES) | st.sampled_from(ST_DTYPES))
        lo, hi = header[name]["data_offsets"]
        assume((hi - lo) * 8 % DTYPE_BITS[dtype] == 0)
        header[name]["dtype"] = dtype
        header[name]["shape"] = [(hi - lo) * 8 // DTYPE_BITS[dtype]]
    elif where in ("dtype", "shape", "data_offsets"):
        name = data.draw(st.sampled_from(names))
        value = data.draw({"dtype": fuzz_dtype, "shape": fuzz_shape,
                           "data_offsets": fuzz_offsets}[where])
        header[name][where] = value
    elif where == "metadata":
        key = data.draw(st.sampled_from(["codec", "block", "stats"]) | st.text(max_size=5))
        header["__metadata__"][key] = data.draw(meta_values)
    elif where == "extra":
        header[data.draw(tensor_names)] = data.draw(fuzz_entry)
    elif where == "drop":
        del header[data.draw(st.sampled_from(sorted(header)))]
    else:
        body = data.draw(st.binary(max_size=len(body) + 16))
    check_decode(_header_blob(header, body), SMALL, max_bytes=1 << 16)


_WRONG_DTYPES = [torch.float32, torch.float16, torch.float64, torch.int32, torch.bool,
                 torch.bfloat16, torch.int8, torch.uint8]


@settings(FAST, max_examples=150)
# the dense codecs' layouts (the sparse codec's hostile payloads: tests/wire/test_sparse.py)
@given(codec=st.sampled_from([c for c in codecs.CODECS if c != "sparse"]), data=st.data())
def test_decoder_valid_header_wrong_dtypes_and_shapes(codec, data):
    """A well-formed safetensors file whose tensors have a dtype or shape other than the codec
    needs: accepted only if every dtype and shape is right, else CodecError."""
    want: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, shape in SMALL.items():
        numel = 1
        for s in shape:
            numel *= s
        if codec in codecs.QUANTIZED:
            nq = numel if codec == "int8" else (numel + 1) // 2  # int4: two values a byte
            want[name + ":q"] = (torch.int8, (nq,))
            want[name + ":scale"] = (torch.float32, ((numel + SMALL_BLOCK - 1) // SMALL_BLOCK,))
        else:
            want[name] = (torch.float16 if codec == "fp16" else torch.float32, shape)
    wire, all_right = {}, True
    for key, (dtype, shape) in want.items():
        got_dtype = data.draw(st.sampled_from([dtype, *_WRONG_DTYPES]), label=f"{key} dtype")
        got_shape = data.draw(st.sampled_from([shape, shape[::-1], (*shape, 1), (1, *shape),
                                               tuple(s + 1 for s in shape), (), (0,)]),
                              label=f"{key} shape")
        all_right &= got_dtype == dtype and tuple(got_shape) == tuple(shape)
        wire[key] = torch.ones(got_shape).to(got_dtype)
    blob = _raw_payload(wire, codec, None, block=SMALL_BLOCK)
    result = check_decode(blob, SMALL)
    assert (result is not None) == all_right, (codec, {k: (v.dtype, v.shape)
                                                       for k, v in wire.items()})


@pytest.mark.parametrize("dtype", ST_DTYPES)
def test_decoder_every_safetensors_dtype_is_decoded_or_a_codec_error(dtype):
    """Every dtype name the safetensors parser accepts, over well-formed bytes. F4, F6_E2M3,
    F6_E3M2 and F8_E8M0 parse, but `safetensors.torch.load` has no torch dtype for them and
    raises KeyError, which must still come out as CodecError."""
    n = 12 * DTYPE_BITS[dtype] // 8  # the 12 elements of "a" in this dtype
    header = {"a": {"dtype": dtype, "shape": [3, 4], "data_offsets": [0, n]},
              "b": {"dtype": "F32", "shape": [5], "data_offsets": [n, n + 20]},
              "__metadata__": {"codec": "fp32", "block": "256"}}
    result = check_decode(_header_blob(header, b"\0" * (n + 20)), SMALL)
    assert (result is not None) == (dtype == "F32")


# ---------------------------------------------------------------------------- 1b. stats

@pytest.fixture
def coord(tiny_run, tmp_path):
    c = _coordinator(tiny_run, tmp_path)
    yield c
    c.close()


@pytest.fixture
def wire_int8(tiny_shapes):
    return codecs.encode(make_delta(tiny_shapes), "int8")


stats_strings = (st.text(max_size=200)
                 | json_values.map(json.dumps)
                 | st.dictionaries(st.sampled_from(["lease_id", "round", "steps", "tokens",
                                                    "mean_loss", "seconds", "device"]),
                                   json_scalars, max_size=7).map(json.dumps))


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stats=stats_strings | st.none())
def test_submit_arbitrary_stats_are_refused_and_recorded(coord, wire_int8, stats):
    vol = coord.authenticate(coord.join(protocol.JoinRequest(
        name="fuzz", device="cpu", api_version=1)).token)
    lease = coord.lease(vol, LeaseRequest()).lease
    try:
        SubmitStats.model_validate_json(stats or "")
        assume(False)  # a (vanishingly rare) valid SubmitStats: not this test's business
    except ValueError:
        pass
    blob = _raw_payload(wire_int8, "int8", stats)
    before = len(_refused_rows(coord))
    with pytest.raises(Refused) as e:
        coord.submit(vol, lease.lease_id, blob)
    assert e.value.status == 422 and "stats" in e.value.reason
    rows = _refused_rows(coord)
    assert len(rows) == before + 1 and rows[-1]["reason"] == e.value.reason
    assert not _accepted_rows(coord)


int_fields = st.integers(-5, 5000) | st.sampled_from(BIG_INTS) | st.integers()
any_value = json_scalars


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_submit_structured_stats_refused_or_validly_accepted(coord, wire_int8, data):
    """Stats with every field fuzzed (huge ints, negative, NaN/inf, wrong types): either a 4xx
    refusal that the ledger records, or an acceptance of stats that really are valid."""
    vol = coord.authenticate(coord.join(protocol.JoinRequest(
        name="fuzz", device="cpu", api_version=1)).token)
    lease = coord.lease(vol, LeaseRequest()).lease
    fields = {"lease_id": lease.lease_id, "round": lease.round, "steps": 5, "tokens": 1000,
              "mean_loss": 5.0, "seconds": 1.0}
    fuzzers = {"lease_id": int_fields | any_value, "round": int_fields | any_value,
               "steps": int_fields | any_value, "tokens": int_fields | any_value,
               "mean_loss": st.floats() | any_value, "seconds": st.floats() | any_value,
               "device": st.text(max_size=80) | any_value}
    for name in data.draw(st.sets(st.sampled_from(sorted(fuzzers)), min_size=1, max_size=3),
                          "fuzzed fields"):
        fields[name] = data.draw(fuzzers[name], name)
    for name in data.draw(st.sets(st.sampled_from(sorted(fields)), max_size=1), "dropped"):
        del fields[name]
    stats = json.dumps(fields)
    # byte-distinct payloads: the replay check must not be what refuses them
    blob = _raw_payload(wire_int8, "int8", stats)
    before = len(_refused_rows(coord))
    try:
        resp = coord.submit(vol, lease.lease_id, blob)
    except Refused as e:
        assert 400 <= e.status < 500, (e.status, e.reason)
        rows = _refused_rows(coord)
        assert len(rows) == before + 1 and rows[-1]["reason"] == e.reason
        return
    valid = SubmitStats.model_validate_json(stats)
    assert valid.lease_id == lease.lease_id and valid.round == lease.round
    assert valid.tokens > 0
    assert resp.accepted and resp.round == 0
    row = next(r for r in coord.ledger.contributions() if r["id"] == resp.contribution_id)
    assert row["status"] == "accepted" and row["lease_id"] == lease.lease_id


@pytest.mark.parametrize("field", ["tokens", "steps", "lease_id", "round"])
def test_submit_stats_beyond_int64_are_refused(coord, wire_int8, field):
    """SQLite stores at most signed 64-bit integers: stats beyond that must be a 422, not an
    OverflowError out of the ledger (and no payload file may be left behind)."""
    vol = coord.authenticate(coord.join(protocol.JoinRequest(
        name="big", device="cpu", api_version=1)).token)
    lease = coord.lease(vol, LeaseRequest()).lease
    stats = json.loads(_stats_json(lease.lease_id))
    stats[field] = 2**63
    blob = _raw_payload(wire_int8, "int8", json.dumps(stats))
    with pytest.raises(Refused) as e:
        coord.submit(vol, lease.lease_id, blob)
    assert e.value.status == 422
    assert not _accepted_rows(coord)
    assert not list(coord.run.contributions_dir.rglob("*.safetensors"))


def test_submit_unknown_lease_beyond_int64_is_refused(coord, wire_int8):
    vol = coord.authenticate(coord.join(protocol.JoinRequest(
        name="big", device="cpu", api_version=1)).token)
    with pytest.raises(Refused) as e:
        coord.submit(vol, 2**63, _raw_payload(wire_int8, "int8", _stats_json(2**63)))
    assert 400 <= e.value.status < 500 and "lease" in e.value.reason
    assert len(_refused_rows(coord)) <= 1


# ---------------------------------------------------------------------------- 2. schemathesis

@pytest.fixture
def api_app(tiny_run, tmp_path):
    """The real app over a real coordinator, its lifespan (the ticker) run by a TestClient
    here; schemathesis gets the same app minus the lifespan, so that its own lifespan
    handling (shut down at the end of each test, before fixtures) cannot close the ledger
    under the final checks."""
    coord = _coordinator(tiny_run, tmp_path)
    app = create_app(coord)

    async def without_lifespan(scope, receive, send):
        if scope["type"] == "lifespan":  # refusing it before receiving means "unsupported"
            raise RuntimeError("the lifespan is run by the test's TestClient")
        await app(scope, receive, send)

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post(protocol.JOIN, json={"name": "fuzzer", "device": "cpu",
                                             "api_version": 1})
        assert r.status_code == 200, r.text
        yield SimpleNamespace(app=without_lifespan, coord=coord, client=client,
                              token=r.json()["token"], admin=coord.new_admin_token())
        # after every generated request: the run is where it was and still answers
        assert client.get(protocol.STATUS).status_code == 200
        assert client.get(protocol.INFO).status_code == 200
        assert coord.round == 0 and not _accepted_rows(coord)


@pytest.fixture
def api_schema(api_app):
    return schemathesis.openapi.from_asgi("/openapi.json", api_app.app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
# the first value of each is what the coverage phase uses: a real token, the generated ids
@schema.given(authed=st.sampled_from([True, False]), boundary=st.sampled_from(EDGES))
@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_openapi_operations_never_answer_5xx(case, authed, boundary, api_app):
    if authed:  # half the cases carry a real token: the owner's for admin routes
        token = api_app.admin if case.path.startswith("/v1/admin/") else api_app.token
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        case.headers = {**headers, "Authorization": f"Bearer {token}"}
    if boundary is not None:  # 64-bit edges, which the generator seldom reaches on its own
        for name, value in (case.path_parameters or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                case.path_parameters[name] = boundary
    case.call_and_validate(checks=[not_a_server_error])
    assert api_app.coord.round == 0


# ---------------------------------------------------------------------------- 3. hand-written

@pytest.fixture
def client(tiny_run, tmp_path):
    coord = _coordinator(tiny_run, tmp_path)
    with TestClient(create_app(coord), raise_server_exceptions=False) as c:
        c.coord = coord
        yield c


def join(client, name="alice", **extra) -> dict:
    r = client.post(protocol.JOIN, json={"name": name, "device": "cpu", "api_version": 1,
                                         **extra})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def take_lease(client, h) -> protocol.Lease:
    r = client.post(protocol.LEASE, json={}, headers=h)
    assert r.status_code == 200, r.text
    lease = protocol.LeaseResponse.model_validate(r.json()).lease
    assert lease is not None, r.text
    return lease


def expect(r, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    if not isinstance(detail, str):  # FastAPI's validation errors: a list of objects
        detail = json.dumps(detail)
    for w in words:
        assert w in detail, (w, detail)


def test_hostile_requests_are_refused_and_leave_the_run_unchanged(client):
    coord = client.coord
    shapes = coord.shapes
    submit = protocol.SUBMIT.format
    alice = join(client, "alice")
    lease = take_lease(client, alice)
    good = payload(lease, shapes)
    refusals = 0  # submits that reach Coordinator.submit and must be recorded as refused

    # authentication
    expect(client.post(protocol.LEASE, json={}), 401, "missing bearer token")
    expect(client.post(submit(lease_id=lease.lease_id), content=good), 401, "missing bearer")
    expect(client.post(protocol.LEASE, json={}, headers={"Authorization": "Basic eA=="}), 401,
           "missing bearer token")
    bad = {"Authorization": "Bearer not-a-token"}
    expect(client.post(protocol.LEASE, json={}, headers=bad), 401, "unknown volunteer token")
    expect(client.post(submit(lease_id=lease.lease_id), content=good, headers=bad), 401,
           "unknown volunteer token")
    expect(client.get(protocol.MODEL, headers=bad), 401, "unknown volunteer token")

    # the path
    expect(client.post(submit(lease_id=999_999), content=good, headers=alice), 404,
           "unknown lease 999999")
    refusals += 1
    expect(client.post("/v1/submit/abc", content=good, headers=alice), 422, "lease_id",
           "int_parsing")
    expect(client.post("/v1/submit/1.5", content=good, headers=alice), 422, "lease_id")

    # the body's size
    n = len(good)
    r = client.post(submit(lease_id=lease.lease_id), content=good,
                    headers={**alice, "Content-Length": str(n + 100)})
    expect(r, 400, "truncated upload", f"got {n} of {n + 100} bytes")
    big = b"\0" * (coord.upload_limit + 1)
    expect(client.post(submit(lease_id=lease.lease_id), content=big, headers=alice), 413,
           "exceeds the limit")
    r = client.post(submit(lease_id=lease.lease_id), content=b"x",
                    headers={**alice, "Content-Length": str(coord.upload_limit + 1)})
    expect(r, 413, "exceeds the limit")

    # the payload's tensors
    st_ok = SubmitStats(lease_id=lease.lease_id, round=0, steps=5, tokens=1000, mean_loss=5.0,
                        seconds=1.0).model_dump_json()
    fp64 = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    expect(client.post(submit(lease_id=lease.lease_id), content=_raw_payload(fp64, "fp32", st_ok),
                       headers=alice), 422, "invalid payload", "float64")
    refusals += 1
    wrong = {k: torch.zeros(s[::-1] if len(s) == 2 else (s[0] + 1,)) for k, s in shapes.items()}
    expect(client.post(submit(lease_id=lease.lease_id),
                       content=_raw_payload(wrong, "fp32", st_ok), headers=alice),
           422, "payload codec 'fp32' is not this run's 'int8'")  # before any tensor is read
    refusals += 1
    longer = codecs.encode({k: torch.zeros(s[0] + 1 if len(s) == 1 else s[0] * s[1] + 1)
                              for k, s in shapes.items()}, "int8")
    expect(client.post(submit(lease_id=lease.lease_id),
                       content=_raw_payload(longer, "int8", st_ok), headers=alice),
           422, "invalid payload", "shape")
    refusals += 1
    key = next(iter(shapes))
    expect(client.post(submit(lease_id=lease.lease_id),
                       content=poisoned_payload(lease, shapes, key), headers=alice),
           422, "invalid payload", "non-finite")
    refusals += 1
    expect(client.post(submit(lease_id=lease.lease_id), content=b"junk", headers=alice), 422,
           "invalid payload", "truncated")
    refusals += 1

    # the payload's stats
    r = client.post(submit(lease_id=lease.lease_id), content=payload(lease, shapes, round=1),
                    headers=alice)
    expect(r, 422, f"payload is for lease {lease.lease_id} round 1",
           f"not lease {lease.lease_id} round 0")
    refusals += 1
    r = client.post(submit(lease_id=lease.lease_id),
                    content=payload(lease, shapes, lease_id=lease.lease_id + 7), headers=alice)
    expect(r, 422, f"payload is for lease {lease.lease_id + 7}")
    refusals += 1
    r = client.post(submit(lease_id=lease.lease_id), content=payload(lease, shapes, tokens=0),
                    headers=alice)
    expect(r, 422, "no tokens")
    refusals += 1
    r = client.post(submit(lease_id=lease.lease_id),
                    content=_raw_payload(codecs.encode(make_delta(shapes), "int8"), "int8",
                                         "{not json"), headers=alice)
    expect(r, 422, "invalid stats")
    refusals += 1

    # one contribution accepted on purpose, then reuse and replay
    r = client.post(submit(lease_id=lease.lease_id), content=good, headers=alice)
    assert r.status_code == 200 and r.json()["accepted"], r.text
    again = payload(lease, shapes, seed=1)
    expect(client.post(submit(lease_id=lease.lease_id), content=again, headers=alice), 409,
           f"lease {lease.lease_id} already has an accepted contribution")
    refusals += 1
    bob = join(client, "bob")
    bob_lease = take_lease(client, bob)
    expect(client.post(submit(lease_id=bob_lease.lease_id), content=good, headers=bob), 409,
           "replayed payload")
    refusals += 1
    expect(client.post(submit(lease_id=lease.lease_id), content=again, headers=bob), 403,
           "belongs to another volunteer")
    refusals += 1

    # a banned volunteer
    carol = join(client, "carol")
    carol_lease = take_lease(client, carol)
    with coord.ledger.tx() as db:
        db.execute("UPDATE volunteers SET banned = 1 WHERE name = 'carol'")
    expect(client.post(protocol.LEASE, json={}, headers=carol), 403, "banned")
    expect(client.post(submit(lease_id=carol_lease.lease_id),
                       content=payload(carol_lease, shapes, seed=3), headers=carol), 403,
           "banned")
    expect(client.get(protocol.MODEL, headers=carol), 403, "banned")

    # joining
    expect(client.post(protocol.JOIN, json={}), 422, "missing", "name", "device",
           "api_version")
    expect(client.post(protocol.JOIN, json={"name": "dave", "api_version": 1}), 422,
           "missing", "device")
    expect(client.post(protocol.JOIN, json={"name": "x" * 49, "device": "cpu",
                                            "api_version": 1}), 422, "name", "pattern")
    expect(client.post(protocol.JOIN, json={"name": "eve", "device": "d" * 65,
                                            "api_version": 1}), 422, "device", "64")
    expect(client.post(protocol.JOIN, json={"name": "eve", "device": "cpu",
                                            "api_version": 99}), 426, "upgrade", "v99")
    expect(client.post(protocol.JOIN, json={"name": "eve", "device": "cpu",
                                            "api_version": 0}), 426, "upgrade")
    expect(client.post(protocol.JOIN, json={"name": "eve", "device": "cpu",
                                            "api_version": "one"}), 422, "api_version")
    expect(client.post(protocol.JOIN, content=b"{", headers={"Content-Type": "application/json"}),
           422, "json")
    expect(client.get(protocol.INFO, headers={protocol.API_HEADER: "abc"}), 426, "upgrade")
    newer = protocol.API_VERSION + 1
    expect(client.get(protocol.INFO, headers={protocol.API_HEADER: str(newer)}), 426, "upgrade",
           f"v{newer}")

    # nothing changed but the one contribution made on purpose; every refusal is on record
    assert coord.round == 0
    accepted = _accepted_rows(coord)
    assert [(a["lease_id"], a["volunteer_id"]) for a in accepted] == [(lease.lease_id, 1)]
    assert len(_refused_rows(coord)) == refusals
    r = client.get(protocol.STATUS)
    assert r.status_code == 200
    st = protocol.Status.model_validate(r.json())
    assert st.round == 0 and not st.finished and len(st.refusals) == refusals
    assert {v.name: v.accepted for v in st.volunteers} == {"alice": 1, "bob": 0, "carol": 0}


@pytest.mark.parametrize("dtype", UNMAPPED_DTYPES)
def test_submit_with_dtype_torch_cannot_load_is_422(client, dtype):
    h = join(client)
    lease = take_lease(client, h)
    shapes = client.coord.shapes
    header, offset = {}, 0
    for name, shape in shapes.items():
        numel = 1
        for s in shape:
            numel *= s
        bits = 32 if offset else DTYPE_BITS[dtype]  # the first tensor in the odd dtype
        assert numel * bits % 8 == 0
        header[name] = {"dtype": "F32" if offset else dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + numel * bits // 8]}
        offset += numel * bits // 8
    header["__metadata__"] = {"codec": "fp32", "block": "256",
                              "stats": _stats_json(lease.lease_id)}
    r = client.post(protocol.SUBMIT.format(lease_id=lease.lease_id),
                    content=_header_blob(header, b"\0" * offset), headers=h)
    expect(r, 422, "invalid payload")
    assert client.get(protocol.STATUS).status_code == 200


def test_submit_to_lease_id_beyond_int64_is_refused(client):
    h = join(client)
    lease = take_lease(client, h)
    good = payload(lease, client.coord.shapes)
    for lease_id in (2**63, -(2**63) - 1, 10**30):
        r = client.post(protocol.SUBMIT.format(lease_id=lease_id), content=good, headers=h)
        assert r.status_code in (404, 422), (r.status_code, r.text)  # unknown, or out of range
        assert "lease" in json.dumps(r.json()["detail"])
    assert client.get(protocol.STATUS).status_code == 200


@pytest.mark.parametrize("who", ["\u00b2", "\u0663", "99999999999999999999", "-1", "nobody"])
def test_admin_ban_of_an_unknown_volunteer_is_404(client, who):
    """`who` is an id or a name; strings that look numeric to str.isdigit() but are not ASCII
    digits, or ids beyond SQLite's int64, name nobody: 404, not a 500."""
    admin = {"Authorization": f"Bearer {client.coord.new_admin_token()}"}
    for path in (protocol.ADMIN_BAN, protocol.ADMIN_UNBAN):
        r = client.post(path.format(who=who), headers=admin)
        expect(r, 404, "no volunteer with id or name")
    assert client.get(protocol.STATUS).status_code == 200


@pytest.mark.parametrize("path,body", [
    (protocol.JOIN, b'{"name": "x", "device": "\\ud800", "api_version": 1}'),
    (protocol.LEASE, b'{"device": "\\udfff"}'),
])
def test_lone_surrogate_in_json_is_422(client, path, body):
    """JSON may escape a lone UTF-16 surrogate; pydantic rejects the string, and the 422 that
    echoes it back must still be encodable."""
    h = join(client)
    r = client.post(path, content=body, headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 422, (r.status_code, r.text)
    assert "device" in json.dumps(r.json()["detail"])


@pytest.fixture
def live(tiny_run, tmp_path):
    """A real coordinator over real HTTP (uvicorn in a thread)."""
    coord = _coordinator(tiny_run, tmp_path)
    with serving(coord) as port:
        yield port, coord


def _raw_http(port: int, head: bytes, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        s.shutdown(socket.SHUT_WR)  # the client stops sending: the rest never arrives
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return out


def test_truncated_upload_over_a_real_socket(live, caplog):
    """A real client that declares more bytes than it sends and stops: the server answers a
    4xx or nothing (the client is gone), never a 5xx, records nothing as accepted, and treats
    it as the volunteer's problem (no unhandled exception in the coordinator's log)."""
    port, coord = live
    url = f"http://127.0.0.1:{port}"
    r = httpx.post(url + protocol.JOIN, json={"name": "alice", "device": "cpu",
                                              "api_version": 1})
    token = r.json()["token"]
    h = {"Authorization": f"Bearer {token}"}
    lease = protocol.LeaseResponse.model_validate(
        httpx.post(url + protocol.LEASE, json={}, headers=h).json()).lease
    good = payload(lease, coord.shapes)
    head = (f"POST {protocol.SUBMIT.format(lease_id=lease.lease_id)} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(good)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with caplog.at_level(logging.WARNING):
        out = _raw_http(port, head, good[: len(good) // 2])
        time.sleep(0.5)  # let the server notice the disconnect and finish the request
    if out:
        status = int(out.split(b" ", 2)[1])
        assert 400 <= status < 500, out[:300]
    assert not _accepted_rows(coord)
    # the server is fine, and the same lease still takes the whole payload
    assert httpx.get(url + protocol.STATUS).status_code == 200
    r = httpx.post(url + protocol.SUBMIT.format(lease_id=lease.lease_id), content=good,
                   headers=h)
    assert r.status_code == 200 and r.json()["accepted"], r.text
    crashes = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert not crashes, [(rec.getMessage(), rec.exc_info and rec.exc_info[0]) for rec in crashes]
