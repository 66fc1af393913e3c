"""`crowdtrain status URL`: fetch a coordinator's status and render it for a terminal.

`fetch_status(url)` GETs protocol.STATUS and turns every way that can fail into a one-line
CrowdtrainError saying what to check. `render_status(status)` builds rich renderables: a
header line, the recent rounds, the volunteers' leaderboard and the recent refusals.
"""

from __future__ import annotations

import time

import httpx
from pydantic import ValidationError
from rich.console import Group
from rich.table import Table
from rich.text import Text

from crowdtrain.coordinator.metrics import ACTIVE_SECONDS, latest_val_loss, round_tokens_per_s
from crowdtrain.errors import CrowdtrainError
from crowdtrain.wire import protocol
from crowdtrain.wire.protocol import Status

RECENT_ROUNDS = 10
RECENT_REFUSALS = 10


def fetch_status(url: str, timeout: float = 10) -> Status:
    """The coordinator's status at `url` (its base URL, e.g. http://host:8470)."""
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise CrowdtrainError(f"{url!r} is not an http(s) URL: give the coordinator's address, "
                              "e.g. http://HOST:8470")
    target = base + protocol.STATUS
    try:
        r = httpx.get(target, timeout=timeout, headers={protocol.API_HEADER:
                                                        str(protocol.API_VERSION)})
    except httpx.TimeoutException:
        raise CrowdtrainError(f"the coordinator at {base} did not answer within {timeout:g} s: "
                              "check that it is running and not overloaded") from None
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise CrowdtrainError(f"cannot reach the coordinator at {base} ({e or type(e).__name__}):"
                              " check the URL and that `crowdtrain serve` is running there"
                              ) from None
    if r.status_code != 200:
        try:
            detail = str(r.json()["detail"])
        except Exception:
            detail = r.reason_phrase
        raise CrowdtrainError(f"{target} answered HTTP {r.status_code} ({detail}): check that "
                              "the URL is a crowdtrain coordinator of a compatible version")
    try:
        return Status.model_validate_json(r.content)
    except ValidationError as e:
        raise CrowdtrainError(f"{target} did not answer with a crowdtrain status ({e.error_count()}"
                              " invalid fields): check that the URL is a crowdtrain coordinator"
                              ) from None


# ---------------------------------------------------------------------- formatting


def fmt_int(n: int | float) -> str:
    return f"{round(n):,}"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def fmt_ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}min ago"
    if s < 172800:
        return f"{s / 3600:.0f}h ago"
    return f"{s / 86400:.0f}d ago"


# ---------------------------------------------------------------------- rendering


def _header(st: Status, now: float) -> Text:
    t = Text()
    t.append(st.run_name, style="bold")
    t.append("  ")
    if st.finished:
        t.append(f"finished after {st.round} rounds", style="bold green")
    else:
        t.append(f"round {st.round}", style="bold cyan")
        if st.round_deadline is not None:
            t.append(f" (closes within {fmt_seconds(max(0.0, st.round_deadline - now))})",
                     style="cyan")
        if st.round_waiting:
            t.append(f"  ·  waiting: {st.round_waiting}", style="yellow")
        if st.close_failing:
            t.append(f"  ·  closing the round fails (retrying): {st.close_failing}",
                     style="bold red")
    per_param = st.payload_bytes / st.params if st.params else 0.0
    t.append(f"  ·  {fmt_int(st.params)} params  ·  {per_param:.2f} bytes/param per upload "
             f"({fmt_bytes(st.payload_bytes)})", style="dim")
    val = latest_val_loss(st)
    if val is not None:
        t.append(f"  ·  held-out loss {fmt_loss(val)}")
        if st.initial_val_loss is not None and val != st.initial_val_loss:
            t.append(f" (from {fmt_loss(st.initial_val_loss)})", style="dim")
    return t


def _rounds_table(st: Status) -> Table | Text:
    if not st.rounds:
        return Text("no rounds yet", style="dim")
    shown = st.rounds[-RECENT_ROUNDS:]
    title = "rounds" if len(shown) == len(st.rounds) else \
        f"last {len(shown)} of {len(st.rounds)} rounds"
    tb = Table(title=title, title_justify="left", title_style="bold")
    for col in ("round", "state", "contributions", "refused", "tokens", "train loss",
                "held-out loss", "MB in", "MB out", "duration", "tokens/s"):
        tb.add_column(col, justify="left" if col == "state" else "right")
    for r in shown:
        tps = round_tokens_per_s(r)
        dur = r.closed_at - r.opened_at if r.closed_at is not None else None
        final = st.finished and r.round == st.round and r.state == "open"  # the final model
        state = Text("final model" if final else r.state,
                     style="green" if r.state == "closed" else "dim" if final else "cyan")
        tb.add_row(str(r.round), state, fmt_int(r.contributions),
                   Text(str(r.refused), style="red" if r.refused else ""), fmt_int(r.tokens),
                   fmt_loss(r.train_loss), fmt_loss(r.val_loss), f"{r.bytes_in / 1e6:.1f}",
                   f"{r.bytes_out / 1e6:.1f}", "-" if dur is None else fmt_seconds(dur),
                   "-" if tps is None else fmt_int(tps))
    return tb


def _volunteers_table(st: Status, now: float) -> Table | Text:
    if not st.volunteers:
        return Text("no volunteers yet: they join with `crowdtrain join URL`", style="dim")
    tb = Table(title="volunteers (by tokens trained)", title_justify="left", title_style="bold")
    for col in ("#", "name", "device", "tokens", "accepted", "refused", "rounds", "tok/s",
                "last seen"):
        tb.add_column(col, justify="left" if col in ("name", "device", "last seen") else "right")
    ranked = sorted(st.volunteers, key=lambda v: (-v.tokens, v.name))
    for i, v in enumerate(ranked, 1):
        active = v.last_seen is not None and now - v.last_seen <= ACTIVE_SECONDS
        tb.add_row(str(i), Text(v.name, style="bold" if active else "dim"), v.device or "-",
                   fmt_int(v.tokens), fmt_int(v.accepted),
                   Text(str(v.refused), style="red" if v.refused else ""), fmt_int(v.rounds),
                   "-" if v.tokens_per_s is None else fmt_int(v.tokens_per_s),
                   Text(fmt_ago(v.last_seen, now), style="green" if active else "dim"))
    return tb


def _refusals(st: Status, now: float) -> Table | Text:
    if not st.refusals:
        return Text("no refused contributions", style="dim")
    tb = Table(title="recent refusals", title_justify="left", title_style="bold red",
               show_header=True)
    for col in ("round", "volunteer", "when", "reason"):
        tb.add_column(col, justify="right" if col == "round" else "left",
                      overflow="fold" if col == "reason" else "ellipsis")
    for r in st.refusals[:RECENT_REFUSALS]:
        tb.add_row(str(r.round), r.volunteer, fmt_ago(r.at, now), r.reason)
    return tb


def render_status(status: Status, now: float | None = None) -> Group:
    """Renderables for a terminal (print with a rich Console); `now` defaults to the clock."""
    now = time.time() if now is None else now
    return Group(_header(status, now), Text(), _rounds_table(status), Text(),
                 _volunteers_table(status, now), Text(), _refusals(status, now))
