"""The coordinator's pages for people and monitors: the dashboard and Prometheus metrics.

`mount_web(app, coord)` adds to the FastAPI app:
- GET /                  the dashboard (crowdtrain/coordinator/static/index.html), which polls
                         the JSON status endpoint (protocol.STATUS) from the browser;
- GET /dashboard/{file}  the dashboard's static files, served by Starlette's `StaticFiles`
                         over that folder: only the files in it (a path that resolves outside
                         it is a 404), with ETag and Last-Modified, and 304 Not Modified to a
                         browser that has the file already;
- GET /metrics           Prometheus text format, built from `coord.status()` at scrape time.

The static files are a route whose one path parameter is the file's name, not a `Mount`:
the route is in `app.routes` with its method and parameter, as every other route is (the raw
fuzz test enumerates the routes to fuzz from there), and it hands the name to `StaticFiles`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.staticfiles import StaticFiles

from crowdtrain.coordinator.metrics import metrics_text
from crowdtrain.wire.protocol import Status

DASHBOARD_DIR = Path(__file__).parent / "static"
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: a new release must not show old JS


class HasStatus(Protocol):
    def status(self) -> Status: ...


class DashboardFiles(StaticFiles):
    """The dashboard's folder, every answer marked for revalidation (`NO_CACHE`): the browser
    asks each time and gets 304 while its copy's ETag still matches."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


def mount_web(app: FastAPI, coord: HasStatus) -> None:
    """Add the dashboard (/, /dashboard/{file}) and Prometheus metrics (/metrics) to `app`."""
    files = DashboardFiles(directory=DASHBOARD_DIR)

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        return await files.get_response("index.html", request.scope)

    @app.get("/dashboard/{file}", include_in_schema=False)
    async def dashboard_file(file: str, request: Request) -> Response:
        return await files.get_response(file, request.scope)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics",
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        """Run metrics in the Prometheus text format, computed from the ledger at scrape
        time (all names start with `crowdtrain_`)."""
        return Response(metrics_text(coord.status()), media_type=CONTENT_TYPE_LATEST)
