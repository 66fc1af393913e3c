"""The run owner's controls, as rules over the ledger: the admin token, the volunteer list, ban
and unban, ending the run. The coordinator (`Coordinator.check_admin`, `.set_banned`, ..., behind
its admin endpoints) and `crowdtrain admin RUN_DIR` (on the owner's machine, with the coordinator
serving or not) both call these, so one rule holds whichever way the owner acts; the serving
coordinator reads the ledger on every request."""

from __future__ import annotations

import logging

from crowdtrain.errors import Refused
from crowdtrain.run.ledger import Ledger
from crowdtrain.wire.protocol import AdminAck, AdminVolunteer

log = logging.getLogger(__name__)

ADMIN_TOKEN = "admin_token"


def new_admin_token(ledger: Ledger, rotate: bool = False) -> str | None:
    """Create the owner's admin token (returned once; only its hash is kept), or None if one
    exists and `rotate` is False."""
    if ledger.get_meta(ADMIN_TOKEN) is not None and not rotate:
        return None
    return ledger.new_secret(ADMIN_TOKEN)


def check_admin(ledger: Ledger, token: str) -> None:
    """Refuse (403) anything but the owner's admin token (compared in constant time)."""
    if not ledger.check_secret(ADMIN_TOKEN, token):
        raise Refused(403, "not the run owner's admin token")


def volunteers(ledger: Ledger) -> list[AdminVolunteer]:
    return [AdminVolunteer(id=v["id"], name=v["name"], banned=bool(v["banned"]),
                           device=v["device"], last_seen=v["last_seen"],
                           tokens=int(v["credit_tokens"]), accepted=v["accepted"],
                           refused=v["refused"], left_out=v["left_out"],
                           provisional=v["provisional"], trust_streak=v["trust_streak"],
                           trust_valid=v["trust_valid"], trust_failures=v["trust_failures"],
                           trust_replicas=v["trust_replicas"], revoked=v["revoked"],
                           caught=bool(v["trust_caught"]), last_flag=v["last_flag"])
            for v in ledger.volunteers()]


def set_banned(ledger: Ledger, who: str, banned: bool) -> AdminAck:
    """Ban or unban a volunteer by id or name; a banned volunteer's token gets 403."""
    row = ledger.find_volunteer(who)
    if row is None:
        raise Refused(404, f"no volunteer with id or name {who!r}")
    ledger.set_banned(row["id"], banned)
    what = "banned" if banned else "unbanned"
    log.info("owner %s volunteer %d (%s)", what, row["id"], row["name"])
    return AdminAck(ok=True, message=f"volunteer {row['id']} ({row['name']}) {what}")


def end_run(ledger: Ledger, reason: str = "the owner ended the run") -> AdminAck:
    """Stop handing out work: workers asking for a lease are told the run is over and exit."""
    ledger.set_meta("ended", reason)
    rows = ledger.rounds()
    at = f" at round {rows[-1]['round']}" if rows else ""
    log.info("run ended%s: %s", at, reason)
    return AdminAck(ok=True, message=f"run ended{at}; workers are told so at their next lease "
                                     "and exit")
