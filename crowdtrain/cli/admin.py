"""Owner commands (`crowdtrain admin TARGET list|ban|unban|end`), locally on the run directory
(the owner's machine: the ledger is the authority, and the serving coordinator reads it on every
request) or remotely through the coordinator's admin endpoints with the admin token."""

from __future__ import annotations

from textwrap import shorten

import httpx

from crowdtrain.errors import CrowdtrainError
from crowdtrain.wire import protocol


def _remote(url: str, action: str, who: str | None, token: str | None) -> list | dict:
    if not token:
        raise CrowdtrainError("a URL target needs --token (the admin token `crowdtrain serve` "
                              "printed on first start; `serve --new-admin-token` makes another)")
    headers = {"Authorization": f"Bearer {token}",
               protocol.API_HEADER: str(protocol.API_VERSION)}
    method, path = {
        "list": ("GET", protocol.ADMIN_VOLUNTEERS),
        "ban": ("POST", protocol.ADMIN_BAN.format(who=who)),
        "unban": ("POST", protocol.ADMIN_UNBAN.format(who=who)),
        "end": ("POST", protocol.ADMIN_END),
    }[action]
    try:
        r = httpx.request(method, url.rstrip("/") + path, headers=headers, timeout=30)
    except httpx.TransportError as e:
        raise CrowdtrainError(
            f"cannot reach the coordinator at {url} ({type(e).__name__})") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise CrowdtrainError(f"coordinator refused ({r.status_code}): {detail}")
    return r.json()


def _local(run_dir: str, action: str, who: str | None) -> list | dict:
    from crowdtrain.coordinator import owner
    from crowdtrain.errors import Refused
    from crowdtrain.run.folder import Run
    from crowdtrain.run.ledger import Ledger

    ledger = Ledger(Run(run_dir).ledger_path)
    try:
        if action == "list":
            return [v.model_dump() for v in owner.volunteers(ledger)]
        if action == "end":
            return owner.end_run(ledger).model_dump()
        return owner.set_banned(ledger, who, action == "ban").model_dump()
    except Refused as e:
        raise CrowdtrainError(e.reason) from None
    finally:
        ledger.close()


def run_admin(target: str, action: str, who: str | None = None,
              token: str | None = None) -> str:
    """Carry out an owner action and return what to print."""
    if action in ("ban", "unban") and not who:
        raise CrowdtrainError(f"`{action}` needs a volunteer id or name")
    remote = target.startswith(("http://", "https://"))
    out = _remote(target, action, who, token) if remote else _local(target, action, who)
    if action != "list":
        return out["message"]
    # trust: the verification's record, current streak of valid contributions / failures
    lines = [f"{'id':>4}  {'name':<24} {'device':<8} {'tokens':>12} {'accepted':>8} "
             f"{'refused':>7} {'left out':>8} {'trust':>9} {'copies ok':>9} {'revoked':>7}  "
             "caught  banned"]
    for v in out:
        trust = f"{v.get('trust_streak', 0)}/{v.get('trust_failures', 0)}"
        lines.append(f"{v['id']:>4}  {v['name']:<24} {v['device'] or '-':<8} {v['tokens']:>12,} "
                     f"{v['accepted']:>8} {v['refused']:>7} {v.get('left_out', 0):>8} "
                     f"{trust:>9} {v.get('trust_replicas', 0):>9} {v.get('revoked', 0):>7}  "
                     f"{'yes' if v.get('caught') else '':<6}  {'yes' if v['banned'] else ''}")
    flagged = [v for v in out if v.get("last_flag")]
    if flagged:
        lines.append("latest refused, left out or uncredited contribution:")
        lines += [f"  {v['name']}: {shorten(v['last_flag'], 160)}" for v in flagged]
    lines.append("trust: streak of valid contributions / failed checks; copies ok: copies of its "
                 "leases by another volunteer that agreed; revoked: contributions whose credit a "
                 "catch took back or withholds; caught: a copy disagreed and none has agreed "
                 "since")
    return "\n".join(lines)
