"""HTTP transport of the coordinator: FastAPI routes over `Coordinator`, run by uvicorn.

Decode -> authenticate -> size-check -> hand to the coordinator -> encode. Routes and messages
come from protocol.py; refusals become 4xx with `{"detail": reason}` as ASCII JSON, whatever
bytes the request held (a body that is not UTF-8 or not JSON, odd path or header bytes: a 4xx
that names the part, never a 5xx), and the unread rest of a refused request's body is drained
so that the answer reaches the client (`add_error_handlers`, `add_request_checks`). Uploads are
streamed to a spool file on disk as they arrive (never held whole in memory) and cut off at the
payload limit (uploads.py). A background thread ticks the coordinator so rounds close on time
even when nobody is calling (`ticking`). `create_app` puts these and the routes together.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Header, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from crowdtrain import __version__
from crowdtrain.coordinator.dashboard import mount_web
from crowdtrain.coordinator.ratelimit import RateLimiter
from crowdtrain.coordinator.rules import Coordinator, Volunteer
from crowdtrain.coordinator.uploads import receive_upload
from crowdtrain.errors import Refused
from crowdtrain.wire import protocol

log = logging.getLogger(__name__)

SAFETENSORS = "application/octet-stream"
ECHO_CHARS = 200  # of a refused input echoed back in a validation error
DRAIN_IDLE_SECONDS = 5.0  # an unread request body is drained while it keeps coming
FASTAPI_BODY_ERROR = "There was an error parsing the body"  # FastAPI's words for a body that
# json.loads raised something other than JSONDecodeError on (not UTF-8, nested too deep)


def error_response(status: int, detail: Any, headers: dict[str, str] | None = None) -> Response:
    """`{"detail": ...}` as ASCII JSON: request bytes echoed in it cannot make it unencodable
    (lone surrogates, raw bytes) or non-ASCII."""
    return Response(json.dumps({"detail": detail}, ensure_ascii=True), status_code=status,
                    media_type="application/json", headers=headers)


def _echo(value: Any) -> Any:
    """A validation error's `input`/`ctx`, made JSON-safe: bytes (a body that was not parsed as
    JSON) become their ASCII repr, long values are cut, non-finite floats and unknown objects
    become text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        cut = repr(raw[:ECHO_CHARS])
        return cut + (f"... ({len(raw)} bytes)" if len(raw) > ECHO_CHARS else "")
    if isinstance(value, str):
        return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + "..."
    if isinstance(value, dict):
        return {str(k): _echo(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_echo(v) for v in value]
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return _echo(str(value))


def validation_detail(errors: Any) -> list[dict]:
    """FastAPI's list of validation errors, JSON-safe (see `_echo`). A body that was not read as
    JSON (a Content-Type other than application/json) is validated as raw bytes: say so."""
    out = []
    for err in errors:
        err = dict(err)
        if isinstance(err.get("input"), (bytes, bytearray)) and tuple(err.get("loc", ()))[:1] \
                == ("body",):
            err["msg"] = (f"{err.get('msg', 'invalid body')}: the body was not read as JSON; "
                          "send a JSON object with Content-Type: application/json")
        out.append({str(k): _echo(v) for k, v in err.items()})
    return out


class DrainUnreadBody:
    """ASGI middleware: before a response starts, read and drop what is left of the request
    body (while it keeps arriving, up to `limit` bytes of body in all). A request refused
    before its body is read (401 for a stale token, 422 for a bad lease id, in front of a whole
    upload) would otherwise be answered and closed with the body unread, and the kernel then
    resets the connection: the client often loses the answer it was sent and sees "connection
    reset"."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        # nothing to drain: a body larger than we read anyway, or one not sent until we say so
        done = (declared.isdigit() and int(declared) > self.limit) \
            or b"100-continue" in headers.get(b"expect", b"").lower()

        received = 0

        async def tracked_receive():
            nonlocal done, received
            message = await receive()
            received += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        async def draining_send(message) -> None:
            if message["type"] == "http.response.start":
                while not done and received <= self.limit:
                    try:
                        await asyncio.wait_for(tracked_receive(), DRAIN_IDLE_SECONDS)
                    except TimeoutError:  # the client stopped sending: answer anyway
                        break
            await send(message)

        await self.app(scope, tracked_receive, draining_send)


def add_error_handlers(app: FastAPI) -> None:
    """Refusals and malformed requests, whatever bytes they held, answered by `error_response`:
    a `Refused` with its status and reason, a validation error as 422 with its input echoed
    JSON- and ASCII-safe, a body FastAPI could not parse as 400 with the parser's reason."""

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return error_response(exc.status, exc.reason)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own handler echoes the input, which fails on lone surrogates and on a raw
        # body that is not UTF-8 (jsonable_encoder decodes bytes): echo it JSON- and ASCII-safe
        return error_response(422, validation_detail(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        cause = exc.__cause__
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR and cause is not None:
            # a JSON body json.loads could not even tokenize: say why (ASCII: the codec's or
            # the parser's own words, e.g. "'utf-8' codec can't decode byte 0xff in position 0")
            why = str(cause).encode("ascii", "backslashreplace").decode()[:ECHO_CHARS]
            if isinstance(cause, UnicodeDecodeError):
                why = f"it is not UTF-8 ({why})"
            elif isinstance(cause, RecursionError):
                why = "it is nested too deeply"
            return error_response(400, f"request body is not valid JSON: {why}")
        return await http_exception_handler(request, exc)


def add_request_checks(app: FastAPI, oldest: int, limit: int) -> None:
    """Checks on every request before its route runs: an API version header on /v1/ must name a
    version in [`oldest`, API_VERSION] (426), a Content-Length must be a number of bytes (400)
    no larger than `limit` (413); and the unread rest of a refused request's body is drained
    (`DrainUnreadBody`, the outermost middleware)."""

    @app.middleware("http")
    async def api_version(request: Request, call_next):
        v = request.headers.get(protocol.API_HEADER)
        if v is not None and request.url.path.startswith("/v1/"):
            v = v.strip(" \t")  # a version is ASCII digits, nothing else (int() takes
            # "²", "1_0", "+2", and strips NEL and NBSP around them)
            version = int(v) if v.isascii() and v.isdigit() and len(v) <= 9 else None
            if version is None or not oldest <= version <= protocol.API_VERSION:
                return error_response(426, protocol.upgrade_message(version, oldest))
        # a declared body larger than any route takes is refused before anything waits for it
        declared = request.headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                return error_response(400, "invalid Content-Length header: not a number of "
                                           "bytes")
            if int(declared) > limit:
                size = declared if len(declared) <= 20 else "over 10**20"
                return error_response(413, f"request body of {size} bytes exceeds the limit "
                                           f"of {limit} bytes")
        return await call_next(request)

    app.add_middleware(DrainUnreadBody, limit=limit)  # added last: the outermost


class CountServed:
    """ASGI middleware: the response bytes sent on each route (its path template, e.g.
    `/v1/blobs/{sha256}`), counted into `coord.served` (Status.bytes_served): what shows how
    much of a run's traffic the coordinator itself carries."""

    def __init__(self, app, coord: Coordinator):
        self.app, self.coord = app, coord

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = 0

        async def counting(message):
            nonlocal sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.zerocopysend":  # pragma: no cover
                sent += int(message.get("count") or 0)
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            route = scope.get("route")
            self.coord.count_served(getattr(route, "path", None) or "(no route)", sent)


def ticking(coord: Coordinator, tick_seconds: float):
    """The app's lifespan: a background thread ticks the coordinator every `tick_seconds`, so
    rounds close on time even when nobody is calling; at shutdown it stops and the coordinator
    closes."""
    stop = threading.Event()

    def ticker() -> None:
        wait = tick_seconds
        while not stop.wait(wait):
            try:
                coord.tick()
                wait = tick_seconds
            except OSError as e:  # disk full, read-only disk: pause until it is fixed
                log.error("cannot close round %d: %s. The previous checkpoint is intact and "
                          "the run is paused; free disk space and it resumes (retrying every "
                          "10 s)", coord.round, e)
                wait = 10.0
            except Exception:  # a bug: keep serving, say so, retry slowly
                log.exception("closing round %d failed; retrying in 10 s", coord.round)
                wait = 10.0

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t = threading.Thread(target=ticker, daemon=True, name="crowdtrain-ticker")
        t.start()
        yield
        stop.set()
        t.join(timeout=30)
        coord.close()

    return lifespan


def bearer(authorization: str | None, what: str) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise Refused(401, f"missing bearer token: {what}")
    return authorization.removeprefix("Bearer ").strip()


def limited(limiter: RateLimiter, key: str, what: str) -> None:
    wait = limiter.allow(key)
    if wait > 0:
        raise Refused(429, f"too many {what}; retry in {wait:.0f}s")


def add_run_routes(app: FastAPI, coord: Coordinator, volunteer: Callable[..., Volunteer],
                   oldest: int) -> None:
    """Info, status and joining (open to all; joins rate-limited per address on open runs),
    then what a volunteer downloads: the tokenizer, shards, the model, a LoRA run's base, a
    distillation run's teacher, the rounds' updates."""
    join_limit = RateLimiter(rate=1 / 30, burst=10)  # per client address, open runs only

    @app.get(protocol.INFO, response_model=protocol.RunInfo)
    def info() -> protocol.RunInfo:
        return coord.info()

    @app.get(protocol.STATUS, response_model=protocol.Status)
    def status() -> protocol.Status:
        return coord.status()

    @app.post(protocol.JOIN, response_model=protocol.JoinResponse)
    def join(req: protocol.JoinRequest, request: Request) -> protocol.JoinResponse:
        if not oldest <= req.api_version <= protocol.API_VERSION:
            raise Refused(426, protocol.upgrade_message(req.api_version, oldest))
        if coord.cfg.access == "open":
            limited(join_limit, request.client.host if request.client else "?", "joins from "
                    "this address")
        return coord.join(req)

    @app.get(protocol.TOKENIZER)
    def tokenizer() -> FileResponse:
        return FileResponse(coord.run.tokenizer_path, media_type="application/json")

    @app.get(protocol.SHARD, responses={200: {"content": {SAFETENSORS: {}}}})
    def shard(sha256: str, vol: Volunteer = Depends(volunteer)) -> FileResponse:
        path = coord.shard_paths.get(sha256)
        if path is None:
            raise Refused(404, f"no train shard with sha256 {sha256[:16]}...")
        coord.count_bytes_out(path.stat().st_size)
        return FileResponse(path, media_type=SAFETENSORS)

    @app.get(protocol.MODEL, responses={200: {"content": {SAFETENSORS: {}}}})
    def model(vol: Volunteer = Depends(volunteer)) -> FileResponse:
        rnd, path, sha = coord.model_file()
        coord.count_bytes_out(path.stat().st_size)
        return FileResponse(path, media_type=SAFETENSORS,
                            headers={protocol.ROUND_HEADER: str(rnd), protocol.SHA256_HEADER: sha})

    @app.get(protocol.ARTIFACTS, response_model=protocol.Artifacts)
    def artifacts(vol: Volunteer = Depends(volunteer)) -> protocol.Artifacts:
        return coord.artifacts()

    @app.get(protocol.BLOB, responses={200: {"content": {"application/octet-stream": {}}}})
    def blob(sha256: str, vol: Volunteer = Depends(volunteer)) -> FileResponse:
        """An announced file by sha256, with HTTP range requests (a broken download resumes);
        the same bytes a web server serves from the public folder."""
        path = coord.public.path(sha256)
        coord.count_bytes_out(path.stat().st_size)
        return FileResponse(path, media_type="application/octet-stream")

    @app.get(protocol.BASE, responses={200: {"content": {SAFETENSORS: {}}}})
    def base(vol: Volunteer = Depends(volunteer)) -> FileResponse:
        path, sha = coord.base_file()
        coord.count_bytes_out(path.stat().st_size)
        return FileResponse(path, media_type=SAFETENSORS, headers={protocol.SHA256_HEADER: sha})

    @app.get(protocol.TEACHER, responses={200: {"content": {SAFETENSORS: {}}}})
    def teacher(vol: Volunteer = Depends(volunteer)) -> FileResponse:
        path, sha = coord.teacher_file()
        coord.count_bytes_out(path.stat().st_size)
        return FileResponse(path, media_type=SAFETENSORS, headers={protocol.SHA256_HEADER: sha})

    @app.get(protocol.UPDATE, responses={200: {"content": {SAFETENSORS: {}}}})
    def update(round: int, vol: Volunteer = Depends(volunteer)) -> FileResponse:
        path = coord.update_file(round)
        coord.count_bytes_out(path.stat().st_size)
        return FileResponse(path, media_type=SAFETENSORS,
                            headers={protocol.ROUND_HEADER: str(round)})


def add_work_routes(app: FastAPI, coord: Coordinator,
                    volunteer: Callable[..., Volunteer]) -> None:
    """A volunteer's round: lease, heartbeats, the upload (streamed to disk by `uploads`;
    submissions rate-limited per volunteer)."""
    submit_limit = RateLimiter(rate=1.0, burst=20)  # per volunteer

    @app.post(protocol.LEASE, response_model=protocol.LeaseResponse)
    def lease(req: protocol.LeaseRequest,
              vol: Volunteer = Depends(volunteer)) -> protocol.LeaseResponse:
        return coord.lease(vol, req)

    @app.post(protocol.ALIVE, response_model=protocol.AliveResponse)
    def alive(msg: protocol.Alive, lease_id: int = Path(ge=1, le=protocol.INT64_MAX),
              vol: Volunteer = Depends(volunteer)) -> protocol.AliveResponse:
        return coord.alive(vol, lease_id, msg)

    @app.post(protocol.SUBMIT, response_model=protocol.SubmitResponse,
              openapi_extra={"requestBody": {"required": True,
                                             "content": {SAFETENSORS: {"schema": {
                                                 "type": "string", "format": "binary"}}}}})
    async def submit(request: Request,
                     lease_id: int = Path(ge=1, le=protocol.INT64_MAX),
                     vol: Volunteer = Depends(volunteer)) -> protocol.SubmitResponse:
        limited(submit_limit, str(vol.id), "submissions from this volunteer")
        path, sha = await receive_upload(request, coord.spool, coord.upload_limit)
        return await run_in_threadpool(coord.submit_file, vol, lease_id, path, sha)


def add_admin_routes(app: FastAPI, coord: Coordinator, owner_only: Callable[..., None]) -> None:
    """The owner's controls, behind the admin token."""

    @app.get(protocol.ADMIN_VOLUNTEERS, response_model=list[protocol.AdminVolunteer],
             dependencies=[Depends(owner_only)])
    def admin_volunteers() -> list[protocol.AdminVolunteer]:
        return coord.admin_volunteers()

    @app.post(protocol.ADMIN_BAN, response_model=protocol.AdminAck,
              dependencies=[Depends(owner_only)])
    def admin_ban(who: str) -> protocol.AdminAck:
        return coord.set_banned(who, True)

    @app.post(protocol.ADMIN_UNBAN, response_model=protocol.AdminAck,
              dependencies=[Depends(owner_only)])
    def admin_unban(who: str) -> protocol.AdminAck:
        return coord.set_banned(who, False)

    @app.post(protocol.ADMIN_END, response_model=protocol.AdminAck,
              dependencies=[Depends(owner_only)])
    def admin_end() -> protocol.AdminAck:
        return coord.end_run()


def create_app(coord: Coordinator, tick_seconds: float = 0.2) -> FastAPI:
    app = FastAPI(title="crowdtrain coordinator", version=__version__,
                  lifespan=ticking(coord, tick_seconds),
                  description="Volunteer DiLoCo training over HTTP. Tensors travel as "
                  "safetensors bodies; see crowdtrain/protocol.py.")
    oldest = protocol.min_api_version(coord.cfg.codec, coord.run.config.teacher is not None,
                                      coord.run.index.masked, coord.cfg.sparse_ef_decay,
                                      coord.cfg.fresh_leases)
    add_error_handlers(app)
    add_request_checks(app, oldest, coord.upload_limit)
    app.add_middleware(CountServed, coord=coord)

    def volunteer(authorization: str | None = Header(None)) -> Volunteer:
        return coord.authenticate(bearer(authorization, "join first (`crowdtrain join URL`)"))

    def owner_only(authorization: str | None = Header(None)) -> None:
        coord.check_admin(bearer(authorization, "admin endpoints need the owner's admin token"))

    add_run_routes(app, coord, volunteer, oldest)
    add_work_routes(app, coord, volunteer)
    add_admin_routes(app, coord, owner_only)
    mount_web(app, coord)
    return app


def serve(coord: Coordinator, host: str = "127.0.0.1", port: int = 8470,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """Run the coordinator until Ctrl-C (uvicorn handles the signal and shuts down cleanly)."""
    import uvicorn

    uvicorn.run(create_app(coord), host=host, port=port, log_level="warning",
                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=5)
