"""The coordinator's pages for people and monitors: the dashboard and Prometheus metrics.

`mount_web(app, coord)` adds to the FastAPI app:
- GET /                  the dashboard (crowdtrain/dashboard/index.html), which polls the
                         JSON status endpoint (protocol.STATUS) from the browser;
- GET /dashboard/{file}  the dashboard's static files: only the files in that folder, by
                         exact name, so no path can reach anything outside it;
- GET /metrics           Prometheus text format, built from `coord.status()` at scrape time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from crowdtrain.coordinator.metrics import metrics_text
from crowdtrain.wire.protocol import Status

DASHBOARD_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
               ".png": "image/png", ".ico": "image/x-icon"}
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: a new release must not show old JS


class HasStatus(Protocol):
    def status(self) -> Status: ...


def _static(name: str) -> Response:
    files = {p.name: p for p in DASHBOARD_DIR.iterdir() if p.is_file()}
    path = files.get(name)
    if path is None or path.suffix not in MEDIA_TYPES:
        return Response(f"no dashboard file named {name!r}\n", status_code=404,
                        media_type="text/plain")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=NO_CACHE)


def mount_web(app: FastAPI, coord: HasStatus) -> None:
    """Add the dashboard (/, /dashboard/{file}) and Prometheus metrics (/metrics) to `app`."""

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return _static("index.html")

    @app.get("/dashboard/{file}", include_in_schema=False)
    def dashboard_file(file: str) -> Response:
        return _static(file)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics",
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        """Run metrics in the Prometheus text format, computed from the ledger at scrape
        time (all names start with `crowdtrain_`)."""
        return Response(metrics_text(coord.status()), media_type=CONTENT_TYPE_LATEST)
