"""The run's public status (`GET /v1/status`: the dashboard, `/metrics` and `crowdtrain status`
read it), assembled from the ledger: rounds, volunteers (by display name, or "anonymous"),
the latest refusals and the open round's deadline."""

from __future__ import annotations

from crowdtrain.ledger import Ledger
from crowdtrain.protocol import API_VERSION, Refusal, RoundSummary, Status, VolunteerSummary


def run_status(ledger: Ledger, *, run_name: str, round: int, finished: bool, params: int,
               payload_bytes: int) -> Status:
    """`round` is the open round; `params` the model's parameters; `payload_bytes` one
    contribution's size on the wire."""
    rounds = [RoundSummary(
        round=r["round"], state=r["state"], opened_at=r["opened_at"],
        closed_at=r["closed_at"], contributions=r["contributions"], refused=r["refused"],
        tokens=r["tokens"], train_loss=r["train_loss"], val_loss=r["val_loss"],
        bytes_in=r["bytes_in"], bytes_out=r["bytes_out"]) for r in ledger.rounds()]
    vols = [VolunteerSummary(
        name="anonymous" if v["anonymous"] else v["name"], device=v["device"],
        last_seen=v["last_seen"], rounds=v["rounds"],
        tokens=int(v["credit_tokens"]), accepted=v["accepted"], refused=v["refused"],
        tokens_per_s=v["tokens_per_s"]) for v in ledger.volunteers()]
    first = ledger.round_row(0)
    refusals = [Refusal(round=r["round"], volunteer=r["name"], reason=r["reason"],
                        at=r["received_at"]) for r in ledger.query(
        "SELECT c.round, c.reason, c.received_at, v.name FROM contributions c JOIN "
        "volunteers v ON v.id = c.volunteer_id WHERE c.status = 'refused' "
        "ORDER BY c.id DESC LIMIT 50")]
    current = ledger.round_row(round)
    return Status(
        api_version=API_VERSION, run_name=run_name, round=round, finished=finished,
        params=params, payload_bytes=payload_bytes, full_model_bytes=4 * params, rounds=rounds,
        volunteers=vols, initial_val_loss=first["val_loss"] if first else None,
        refusals=refusals,
        round_deadline=None if finished or current is None else current["deadline"])
