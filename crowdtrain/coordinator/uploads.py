"""Receiving a contribution's upload over HTTP: the request body is streamed to a spool file as
it arrives (memory stays ~ one chunk per upload, whatever the model size), hashed on the way,
and cut off at the run's payload limit. A body that is too long, shorter or longer than its
Content-Length, or abandoned by its client is refused (4xx), and nothing of it stays on disk."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from starlette.requests import ClientDisconnect, Request

from crowdtrain.errors import Refused


async def receive_upload(request: Request, spool: Callable[[], tuple[Path, BinaryIO]],
                         limit: int) -> tuple[Path, str]:
    """Stream `request`'s body (at most `limit` bytes) into a fresh file from `spool` (the
    coordinator's `spool`); returns the file and the body's sha256. The caller owns the file."""
    declared = request.headers.get("content-length")
    if declared is not None and (not (declared.isascii() and declared.isdigit())
                                 or int(declared) > limit):
        raise Refused(413, f"payload of {declared} bytes exceeds the limit of {limit} "
                           "bytes for this model")
    try:
        path, f = spool()
    except OSError as e:
        raise Refused.cannot_store(e) from None
    size, sha = 0, hashlib.sha256()
    try:
        try:
            with f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise Refused(413, f"payload exceeds the limit of {limit} bytes "
                                           "for this model")
                    sha.update(chunk)
                    f.write(chunk)
        except ClientDisconnect:
            raise Refused(400, f"truncated upload: the client went away after {size} of "
                               f"{declared} bytes") from None
        except OSError as e:
            raise Refused.cannot_store(e) from None
        if declared is not None and size < int(declared):
            raise Refused(400, f"truncated upload: got {size} of {declared} bytes")
        if declared is not None and size > int(declared):
            raise Refused(400, f"body of {size} bytes is longer than its Content-Length "
                               f"{declared}")
    except BaseException:  # refused or cancelled: nothing of it stays on disk
        path.unlink(missing_ok=True)
        raise
    return path, sha.hexdigest()
