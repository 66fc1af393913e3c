"""Durable run state in SQLite (WAL): volunteers, rounds, leases, contributions, credits.

The ledger is the coordinator's memory: every accepted contribution is committed here (after
its payload is on disk) before the worker hears OK, so nothing acknowledged is ever lost.
Volunteer tokens are stored only as SHA-256 hashes. One connection guarded by a lock: the
coordinator's threads share it; SQLite serialises writers anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS volunteers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    last_seen REAL,
    device TEXT,
    tokens_per_s REAL,
    banned INTEGER NOT NULL DEFAULT 0,
    anonymous INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    closed_at REAL,
    contributions INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    train_loss REAL,
    val_loss REAL,
    update_sha256 TEXT,
    bytes_in INTEGER NOT NULL DEFAULT 0,
    bytes_out INTEGER NOT NULL DEFAULT 0,
    checkpoint_sha256 TEXT,
    chain_link TEXT
);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    volunteer_id INTEGER NOT NULL REFERENCES volunteers(id),
    round INTEGER NOT NULL,
    issued_at REAL NOT NULL,
    deadline REAL NOT NULL,
    start_step INTEGER NOT NULL,
    max_steps INTEGER NOT NULL,
    max_tokens INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    shards TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'submitted', 'expired'))
);
CREATE INDEX IF NOT EXISTS leases_round ON leases(round, state);
CREATE TABLE IF NOT EXISTS contributions (
    id INTEGER PRIMARY KEY,
    lease_id INTEGER,
    volunteer_id INTEGER NOT NULL,
    round INTEGER NOT NULL,
    received_at REAL NOT NULL,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    steps INTEGER,
    tokens INTEGER,
    weight REAL,
    mean_loss REAL,
    seconds REAL,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'refused')),
    reason TEXT,
    path TEXT,
    excluded INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS one_accepted_per_lease
    ON contributions(lease_id) WHERE status = 'accepted';
CREATE INDEX IF NOT EXISTS contributions_round ON contributions(round, status);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS invites (
    key_hash TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    uses_left INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS trust (
    volunteer_id INTEGER PRIMARY KEY REFERENCES volunteers(id),
    streak INTEGER NOT NULL DEFAULT 0,
    valid INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0
);
"""
# credit: aggregated (accepted, not left out) and not revoked; made anew on every open, so a
# ledger of an older crowdtrain gets this definition too
CREDITS_VIEW = """
DROP VIEW IF EXISTS credits;
CREATE VIEW credits AS
    SELECT volunteer_id, SUM(weight) AS tokens, COUNT(*) AS accepted
    FROM contributions WHERE status = 'accepted' AND excluded = 0 AND revoked = 0
    GROUP BY volunteer_id;
"""


# columns added after the first release: a ledger written by an older crowdtrain gets them on open
ADDED_COLUMNS = (
    ("volunteers", "anonymous", "INTEGER NOT NULL DEFAULT 0"),
    ("rounds", "checkpoint_sha256", "TEXT"),
    ("rounds", "chain_link", "TEXT"),
    ("leases", "alive_at", "REAL"),  # the worker's last heartbeat (NULL: none yet)
    # a refusal the volunteer did not cause (its lease was voided, replaced or outlived by
    # its round): it may lease again in the same round
    ("contributions", "blameless", "INTEGER NOT NULL DEFAULT 0"),
    ("rounds", "extensions", "INTEGER NOT NULL DEFAULT 0"),  # deadline extensions so far
    # a lease still open when its round closed (expired then, not for silence or a newer
    # lease): its late contribution may still be applied in the next round (stale_weight)
    ("leases", "outlived", "INTEGER NOT NULL DEFAULT 0"),
    # the verification's outcome (coordinator/verification.py): 'valid', 'failed' (left out,
    # no credit), 'provisional' (credited, the check could not decide); NULL: not checked
    ("contributions", "verified", "TEXT"),
    # replication (issue 21): a fresh lease (from theta_r, new AdamW state, no error feedback),
    # one whose copy is wanted (`replicate`), a copy (`replica_of` the original lease's id);
    # credit revoked when its volunteer was caught by a replica; confirmations by a replica
    ("leases", "fresh", "INTEGER NOT NULL DEFAULT 0"),
    ("leases", "replicate", "INTEGER NOT NULL DEFAULT 0"),
    ("leases", "replica_of", "INTEGER"),
    ("contributions", "revoked", "INTEGER NOT NULL DEFAULT 0"),
    ("trust", "replicas", "INTEGER NOT NULL DEFAULT 0"),
    # caught by a replica and not confirmed by one since: its credit is withheld
    ("trust", "caught", "INTEGER NOT NULL DEFAULT 0"),
    # the volunteer whose copy of this contribution's lease agreed with it: a confirmation,
    # which counts only while that volunteer is not caught itself (`confirmations`)
    ("contributions", "confirmed_by", "INTEGER"),
)

CHAIN_VERSION = "crowdtrain-chain-v1"

# a volunteer's confirmations that still count: its contributions a copy by another volunteer
# agreed with, that volunteer not caught since (parameter: the volunteer's id, or v.id)
CONFIRMATIONS = ("(SELECT COUNT(*) FROM contributions cf LEFT JOIN trust ct ON ct.volunteer_id "
                 "= cf.confirmed_by WHERE cf.volunteer_id = {who} AND cf.confirmed_by IS NOT "
                 "NULL AND COALESCE(ct.caught, 0) = 0)")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def chain_genesis(checkpoint_sha256: str) -> str:
    """The link before a run's first chained round: a hash of the checkpoint it started from."""
    return hashlib.sha256(f"{CHAIN_VERSION}\ngenesis\n{checkpoint_sha256}".encode()).hexdigest()


def chain_link(prev: str, update_sha256: str, contributions: Iterable[str],
               checkpoint_sha256: str) -> str:
    """link_r = sha256(link_{r-1}, sha256 of the published update u_r, the sorted sha256s of the
    contributions aggregated in round r, sha256 of checkpoint r+1), newline-separated."""
    parts = [CHAIN_VERSION, prev, update_sha256, *sorted(contributions), checkpoint_sha256]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class Ledger:
    """The SQLite ledger of one run (`RUN_DIR/ledger.sqlite`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.RLock()
        self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns a ledger from an older crowdtrain lacks (defaults fill old rows)."""
        with self._lock:
            for table, column, decl in ADDED_COLUMNS:
                have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            self.db.executescript(CREDITS_VIEW)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; commits on success, rolls back on error."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """Ad-hoc read-only SQL, for tests and the bench scripts that inspect a ledger.
        crowdtrain's own code asks through the named methods below: the SQL lives here."""
        return self._rows(sql, args)

    # ----------------------------------------------------------------- volunteers

    def add_volunteer(self, name: str, device: str, anonymous: bool = False) -> tuple[int, str]:
        """Register a volunteer; returns (id, token). The token is not stored, only its hash.
        `anonymous`: the volunteer opted out of being named in published provenance."""
        token = secrets.token_urlsafe(32)
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO volunteers (name, token_hash, created_at, last_seen, device, "
                "anonymous) VALUES (?, ?, ?, ?, ?, ?)",
                (name, hash_token(token), time.time(), time.time(), device, int(anonymous)))
        return int(cur.lastrowid), token

    def volunteer_by_token(self, token: str) -> sqlite3.Row | None:
        """Look the token up by its hash, then compare in constant time."""
        h = hash_token(token)
        rows = self._rows("SELECT * FROM volunteers WHERE token_hash = ?", (h,))
        if rows and hmac.compare_digest(rows[0]["token_hash"], h):
            return rows[0]
        return None

    def find_volunteer(self, who: str) -> sqlite3.Row | None:
        """A volunteer by numeric id or by display name (the most recent with that name)."""
        if re.fullmatch(r"[0-9]{1,18}", who):
            rows = self._rows("SELECT * FROM volunteers WHERE id = ?", (int(who),))
        else:
            rows = self._rows("SELECT * FROM volunteers WHERE name = ? ORDER BY id DESC", (who,))
        return rows[0] if rows else None

    def set_banned(self, volunteer_id: int, banned: bool) -> None:
        with self.tx() as db:
            db.execute("UPDATE volunteers SET banned = ? WHERE id = ?", (int(banned), volunteer_id))

    # ----------------------------------------------------------------- secrets and settings

    def get_meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                       "SET value = excluded.value", (key, value))

    def secret_value(self, key: str) -> str:
        """A random value kept under `key` (made on first use): the coordinator's own secrets
        that are never sent anywhere, such as the verification's seed."""
        with self.tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return row["value"]
            value = secrets.token_hex(16)
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        return value

    def new_secret(self, key: str) -> str:
        """A fresh random secret whose hash is stored under `key`; the secret is returned once."""
        secret = secrets.token_urlsafe(32)
        self.set_meta(key, hash_token(secret))
        return secret

    def check_secret(self, key: str, secret: str) -> bool:
        stored = self.get_meta(key)
        return stored is not None and hmac.compare_digest(stored, hash_token(secret))

    def add_invite(self, uses: int = 1) -> str:
        key = secrets.token_urlsafe(24)
        with self.tx() as db:
            db.execute("INSERT INTO invites (key_hash, created_at, uses_left) VALUES (?, ?, ?)",
                       (hash_token(key), time.time(), uses))
        return key

    def use_invite(self, key: str) -> bool:
        """Spend one use of an invite key; False if unknown or used up."""
        h = hash_token(key)
        with self.tx() as db:
            row = db.execute("SELECT key_hash, uses_left FROM invites WHERE key_hash = ?",
                             (h,)).fetchone()
            if row is None or not hmac.compare_digest(row["key_hash"], h) or row["uses_left"] < 1:
                return False
            db.execute("UPDATE invites SET uses_left = uses_left - 1 WHERE key_hash = ?", (h,))
        return True

    def touch(self, volunteer_id: int, device: str | None = None,
              tokens_per_s: float | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE volunteers SET last_seen = ?, device = COALESCE(?, device), "
                       "tokens_per_s = COALESCE(?, tokens_per_s) WHERE id = ?",
                       (time.time(), device, tokens_per_s, volunteer_id))

    def seen_since(self, volunteer_ids: Iterable[int], since: float) -> set[int]:
        """Those of `volunteer_ids` whose last request (a join or lease) came after `since`."""
        ids = list(volunteer_ids)
        if not ids:
            return set()
        rows = self._rows(f"SELECT id FROM volunteers WHERE last_seen > ? AND id IN "
                          f"({','.join('?' * len(ids))})", (since, *ids))
        return {r["id"] for r in rows}

    # ----------------------------------------------------------------- rounds

    def open_round(self, rnd: int, deadline: float) -> None:
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO rounds (round, state, opened_at, deadline) "
                       "VALUES (?, 'open', ?, ?)", (rnd, time.time(), deadline))

    def round_row(self, rnd: int) -> sqlite3.Row | None:
        rows = self._rows("SELECT * FROM rounds WHERE round = ?", (rnd,))
        return rows[0] if rows else None

    def extend_round(self, rnd: int, deadline: float) -> int:
        """Move the open round's deadline; returns how often it has been extended now."""
        with self.tx() as db:
            db.execute("UPDATE rounds SET deadline = ?, extensions = extensions + 1 "
                       "WHERE round = ?", (deadline, rnd))
            return int(db.execute("SELECT extensions FROM rounds WHERE round = ?",
                                  (rnd,)).fetchone()["extensions"])

    def close_round(self, rnd: int, update_sha256: str, checkpoint_sha256: str | None = None,
                    base_sha256: str | None = None) -> None:
        """Mark `rnd` closed with its aggregate figures; expire its unreported leases.

        With `checkpoint_sha256` (checkpoint rnd+1) and `base_sha256` (checkpoint rnd, the
        parameters the round started from) the round's chain link is recorded in the same
        transaction; a previous round that crash recovery closed without its link gets it too
        (`base_sha256` is its resulting checkpoint)."""
        with self.tx() as db:
            agg = db.execute(
                "SELECT COUNT(*) n, COALESCE(SUM(weight), 0) t, SUM(mean_loss * weight) l, "
                "(SELECT COALESCE(SUM(bytes), 0) FROM contributions WHERE round = ?1 AND "
                "status = 'accepted') b FROM contributions "
                "WHERE round = ?1 AND status = 'accepted' AND excluded = 0", (rnd,)).fetchone()
            loss = agg["l"] / agg["t"] if agg["t"] else None
            db.execute("UPDATE rounds SET state = 'closed', closed_at = ?, contributions = ?, "
                       "tokens = ?, train_loss = ?, update_sha256 = ?, bytes_in = ? "
                       "WHERE round = ?",
                       (time.time(), agg["n"], int(agg["t"]), loss, update_sha256, agg["b"], rnd))
            db.execute("UPDATE leases SET state = 'expired', outlived = 1 WHERE round = ? AND "
                       "state = 'open'", (rnd,))
            if checkpoint_sha256 is not None:
                before = db.execute("SELECT state, chain_link, update_sha256 FROM rounds "
                                    "WHERE round = ?", (rnd - 1,)).fetchone()
                if (before is not None and base_sha256 and before["state"] == "closed"
                        and before["chain_link"] is None and before["update_sha256"]):
                    self._record_link(db, rnd - 1, base_sha256, None)
                self._record_link(db, rnd, checkpoint_sha256, base_sha256)

    def aggregated_sha256s(self, rnd: int, db: sqlite3.Connection | None = None) -> list[str]:
        """sha256 of every contribution aggregated in round `rnd` (accepted, not left out)."""
        sql = ("SELECT sha256 FROM contributions WHERE round = ? AND status = 'accepted' "
               "AND excluded = 0 ORDER BY sha256")
        if db is not None:
            return [r["sha256"] for r in db.execute(sql, (rnd,))]
        return [r["sha256"] for r in self._rows(sql, (rnd,))]

    def _record_link(self, db: sqlite3.Connection, rnd: int, checkpoint_sha256: str,
                     base_sha256: str | None) -> None:
        """Chain round `rnd` to the round before it (or, for the ledger's first round, to
        the checkpoint it started from); no link when the round before has none."""
        before = db.execute("SELECT chain_link FROM rounds WHERE round = ?",
                            (rnd - 1,)).fetchone()
        if before is None:
            if not base_sha256:
                return
            prev = chain_genesis(base_sha256)
            db.execute("INSERT INTO meta (key, value) VALUES ('chain_genesis', ?) ON CONFLICT"
                       "(key) DO UPDATE SET value = excluded.value",
                       (json.dumps({"round": rnd, "checkpoint_sha256": base_sha256}),))
        elif before["chain_link"] is None:
            return
        else:
            prev = before["chain_link"]
        row = db.execute("SELECT update_sha256 FROM rounds WHERE round = ?", (rnd,)).fetchone()
        link = chain_link(prev, row["update_sha256"], self.aggregated_sha256s(rnd, db),
                          checkpoint_sha256)
        db.execute("UPDATE rounds SET checkpoint_sha256 = ?, chain_link = ? WHERE round = ?",
                   (checkpoint_sha256, link, rnd))

    def chain_genesis(self) -> dict | None:
        """{"round", "checkpoint_sha256"}: where the chain starts, or None (no chained round)."""
        raw = self.get_meta("chain_genesis")
        return json.loads(raw) if raw else None

    def set_val_loss(self, rnd: int, val_loss: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE rounds SET val_loss = ? WHERE round = ?", (val_loss, rnd))

    def add_bytes_out(self, rnd: int, n: int) -> None:
        with self.tx() as db:
            db.execute("UPDATE rounds SET bytes_out = bytes_out + ? WHERE round = ?", (n, rnd))

    # ----------------------------------------------------------------- leases

    def add_lease(self, volunteer_id: int, rnd: int, deadline: float, start_step: int,
                  max_steps: int, max_tokens: int, seed: int, shards: list[str],
                  fresh: bool = False, replicate: bool = False,
                  replica_of: int | None = None) -> int:
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO leases (volunteer_id, round, issued_at, deadline, start_step, "
                "max_steps, max_tokens, seed, shards, state, fresh, replicate, replica_of) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, ?)",
                (volunteer_id, rnd, time.time(), deadline, start_step, max_steps, max_tokens,
                 seed, json.dumps(shards), int(fresh), int(replicate), replica_of))
        return int(cur.lastrowid)

    def wanted_copy(self, rnd: int, volunteer_id: int) -> sqlite3.Row | None:
        """The first lease of round `rnd` whose copy is wanted and that has none (a copy
        voided with its worker can be made again) held by another volunteer than
        `volunteer_id`; None if there is no such lease."""
        rows = self._rows(
            "SELECT * FROM leases l WHERE round = ?1 AND replicate = 1 AND state != 'expired' "
            "AND volunteer_id != ?2 AND NOT EXISTS (SELECT 1 FROM leases c WHERE "
            "c.replica_of = l.id AND c.state != 'expired') ORDER BY id LIMIT 1",
            (rnd, volunteer_id))
        return rows[0] if rows else None

    def expire_leases(self, rnd: int, volunteer_id: int | None = None) -> None:
        """Void the open leases of a round (all, or one volunteer's)."""
        with self.tx() as db:
            db.execute("UPDATE leases SET state = 'expired' WHERE round = ? AND state = 'open' "
                       "AND (? IS NULL OR volunteer_id = ?)", (rnd, volunteer_id, volunteer_id))

    def revive_lease(self, lease_id: int, now: float) -> None:
        """Open a lease again for the worker that held it (restarted within its round)."""
        with self.tx() as db:
            db.execute("UPDATE leases SET state = 'open', alive_at = ? WHERE id = ? AND "
                       "state != 'submitted'", (now, lease_id))

    def lease_alive(self, lease_id: int, now: float) -> bool:
        """Record a heartbeat of an open lease; False if the lease is not open."""
        with self.tx() as db:
            cur = db.execute("UPDATE leases SET alive_at = ? WHERE id = ? AND state = 'open'",
                             (now, lease_id))
            return cur.rowcount == 1

    def expire_silent_leases(self, rnd: int, before: float) -> list[int]:
        """Expire the open leases of round `rnd` whose worker sent heartbeats and then fell
        silent (last one before `before`); returns their ids. A lease that never sent one
        (an older worker) runs to the round's deadline as before."""
        with self.tx() as db:
            ids = [r["id"] for r in db.execute(
                "SELECT id FROM leases WHERE round = ? AND state = 'open' AND alive_at IS NOT "
                "NULL AND alive_at < ?", (rnd, before))]
            db.executemany("UPDATE leases SET state = 'expired' WHERE id = ?",
                           [(i,) for i in ids])
        return ids

    def lease(self, lease_id: int) -> sqlite3.Row | None:
        rows = self._rows("SELECT * FROM leases WHERE id = ?", (lease_id,))
        return rows[0] if rows else None

    def leases_of_round(self, rnd: int, state: str | None = None) -> list[sqlite3.Row]:
        if state:
            return self._rows("SELECT * FROM leases WHERE round = ? AND state = ?", (rnd, state))
        return self._rows("SELECT * FROM leases WHERE round = ?", (rnd,))

    def count_leases(self) -> int:
        """How many leases the run has issued, in every round and state."""
        return int(self._rows("SELECT COUNT(*) n FROM leases")[0]["n"])

    # ----------------------------------------------------------------- contributions

    def accept(self, lease_id: int, volunteer_id: int, rnd: int, sha256: str, nbytes: int,
               steps: int, tokens: int, weight: float, mean_loss: float, seconds: float,
               path: str, note: str | None = None) -> int:
        """Record an accepted contribution and close its lease, in one transaction."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO contributions (lease_id, volunteer_id, round, received_at, sha256, "
                "bytes, steps, tokens, weight, mean_loss, seconds, status, path, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'accepted', ?, ?)",
                (lease_id, volunteer_id, rnd, time.time(), sha256, nbytes, steps, tokens, weight,
                 mean_loss, seconds, path, note))
            db.execute("UPDATE leases SET state = 'submitted' WHERE id = ?", (lease_id,))
        return int(cur.lastrowid)

    def refuse(self, lease_id: int | None, volunteer_id: int, rnd: int, sha256: str,
               nbytes: int, reason: str, blameless: bool = False) -> int:
        """Record a refused upload; `blameless` when the volunteer did not cause it (its
        lease was voided or replaced, or its round closed first)."""
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO contributions (lease_id, volunteer_id, round, received_at, sha256, "
                "bytes, status, reason, blameless) VALUES (?, ?, ?, ?, ?, ?, 'refused', ?, ?)",
                (lease_id, volunteer_id, rnd, time.time(), sha256, nbytes, reason,
                 int(blameless)))
        return int(cur.lastrowid)

    def was_accepted(self, sha256: str) -> bool:
        """Whether a contribution with this sha256 was accepted before (a replay)."""
        return bool(self._rows("SELECT 1 FROM contributions WHERE sha256 = ? AND "
                               "status = 'accepted' LIMIT 1", (sha256,)))

    def best_throughput(self, volunteer_id: int) -> tuple[float | None, int]:
        """(best tokens/s, how many) over the volunteer's accepted contributions that report
        their seconds; best is None when there are none."""
        row = self._rows(
            "SELECT MAX(tokens / seconds) best, COUNT(*) n FROM contributions WHERE "
            "volunteer_id = ? AND status = 'accepted' AND seconds > 0", (volunteer_id,))[0]
        return row["best"], int(row["n"])

    def refused_for_cause(self, volunteer_id: int, rnd: int) -> bool:
        """Whether the volunteer sent round `rnd` a payload refused through its own fault."""
        return bool(self._rows(
            "SELECT 1 FROM contributions WHERE volunteer_id = ? AND round = ? AND "
            "status = 'refused' AND blameless = 0 LIMIT 1", (volunteer_id, rnd)))

    def annotate(self, contribution_id: int, note: str, excluded: bool = False) -> None:
        """Record why aggregation clipped a contribution, or left it out (no credit then),
        after any note it has (a late one's).
        The weight stays as it was, so a round closed again after a crash screens the same."""
        with self.tx() as db:
            db.execute("UPDATE contributions SET reason = CASE WHEN reason IS NULL THEN ?1 "
                       "WHEN instr(reason, ?1) THEN reason ELSE reason || '; ' || ?1 END, "
                       "excluded = ?2 WHERE id = ?3", (note, int(excluded), contribution_id))

    def trust(self, volunteer_id: int) -> tuple[int, int, int, int]:
        """(streak, valid, failures, replicas): the volunteer's record with the verification
        (`verification.TrustState`)."""
        rows = self._rows("SELECT streak, valid, failures, replicas FROM trust WHERE "
                          "volunteer_id = ?", (volunteer_id,))
        return tuple(rows[0]) if rows else (0, 0, 0, 0)

    def caught(self, volunteer_id: int) -> bool:
        """Whether a replica caught this volunteer and none has confirmed its work since."""
        rows = self._rows("SELECT caught FROM trust WHERE volunteer_id = ?", (volunteer_id,))
        return bool(rows and rows[0]["caught"])

    def confirmations(self, volunteer_id: int) -> int:
        """How many of the volunteer's contributions a copy by another volunteer confirmed,
        counting only the confirmers not caught since (two cheaters doing the same half work
        agree with each other: once one is caught, what it confirmed counts no more)."""
        return int(self._rows("SELECT " + CONFIRMATIONS.format(who="?"),
                              (volunteer_id,))[0][0])

    def set_caught(self, volunteer_id: int, caught: bool) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO trust (volunteer_id, caught) VALUES (?1, ?2) ON CONFLICT"
                       "(volunteer_id) DO UPDATE SET caught = ?2", (volunteer_id, int(caught)))

    def last_verification(self, volunteer_id: int) -> sqlite3.Row | None:
        """verified and reason of the volunteer's latest checked contribution (None: none)."""
        rows = self._rows("SELECT verified, reason FROM contributions WHERE volunteer_id = ? "
                          "AND verified IS NOT NULL ORDER BY id DESC LIMIT 1", (volunteer_id,))
        return rows[0] if rows else None

    def revoke_credit(self, volunteer_id: int, note: str) -> int:
        """Revoke the credit of every contribution of a volunteer caught cheating by a replica
        (they stay in the model and the provenance chain; `note` joins their reason); returns
        how many lost their credit."""
        with self.tx() as db:
            return db.execute(
                "UPDATE contributions SET revoked = 1, reason = CASE WHEN reason IS NULL THEN "
                "?2 ELSE reason || '; ' || ?2 END WHERE volunteer_id = ?1 AND status = "
                "'accepted' AND revoked = 0", (volunteer_id, note)).rowcount

    def record_verification(self, contribution_id: int, outcome: str, note: str | None,
                            trust: tuple[int, int, int, int] | None = None,
                            confirmed_by: int | None = None) -> None:
        """The verification's outcome of a contribution ('valid', 'failed': left out, no
        credit; 'provisional'), its note after any it has, the volunteer whose copy of its
        lease agreed with it (`confirmed_by`), and its volunteer's new trust (streak, valid,
        failures, replicas) when the outcome counts, in one transaction."""
        if outcome not in ("valid", "failed", "provisional"):
            raise ValueError(f"unknown verification outcome {outcome!r}")
        with self.tx() as db:
            db.execute("UPDATE contributions SET verified = ?2, excluded = CASE WHEN ?2 = "
                       "'failed' THEN 1 ELSE excluded END, reason = CASE WHEN ?1 IS NULL "
                       "THEN reason WHEN reason IS NULL THEN ?1 WHEN instr(reason, ?1) THEN "
                       "reason ELSE reason || '; ' || ?1 END, confirmed_by = COALESCE(?4, "
                       "confirmed_by) WHERE id = ?3",
                       (note, outcome, contribution_id, confirmed_by))
            if trust is not None:
                vid = db.execute("SELECT volunteer_id FROM contributions WHERE id = ?",
                                 (contribution_id,)).fetchone()["volunteer_id"]
                db.execute("INSERT INTO trust (volunteer_id, streak, valid, failures, replicas) "
                           "VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(volunteer_id) DO UPDATE SET "
                           "streak = ?2, valid = ?3, failures = ?4, replicas = ?5",
                           (vid, *trust))

    def accepted(self, rnd: int) -> list[sqlite3.Row]:
        return self._rows("SELECT * FROM contributions WHERE round = ? AND status = 'accepted' "
                          "ORDER BY id", (rnd,))

    def contributions(self) -> list[sqlite3.Row]:
        return self._rows("SELECT * FROM contributions ORDER BY id")

    # ----------------------------------------------------------------- reports

    def rounds(self) -> list[sqlite3.Row]:
        return self._rows(
            "SELECT r.*, (SELECT COUNT(*) FROM contributions c WHERE c.round = r.round "
            "AND c.status = 'refused') AS refused FROM rounds r ORDER BY round")

    def latest_refusals(self, limit: int = 50) -> list[sqlite3.Row]:
        """The latest refused uploads and contributions left out of their round (by robust
        aggregation or the verification: accepted, then excluded), newest first: round,
        reason, received_at, the volunteer's name, its anonymity and left_out."""
        return self._rows(
            "SELECT c.round, c.reason, c.received_at, v.name, v.anonymous, "
            "c.status = 'accepted' AS left_out FROM contributions c JOIN volunteers v "
            "ON v.id = c.volunteer_id WHERE c.status = 'refused' OR c.excluded = 1 "
            "ORDER BY c.id DESC LIMIT ?", (limit,))

    def volunteers(self) -> list[sqlite3.Row]:
        return self._rows(
            "SELECT v.*, COALESCE(c.tokens, 0) AS credit_tokens, COALESCE(c.accepted, 0) AS "
            "accepted, (SELECT COUNT(*) FROM contributions x WHERE x.volunteer_id = v.id AND "
            "x.status = 'refused') AS refused, (SELECT COUNT(DISTINCT round) FROM contributions y "
            "WHERE y.volunteer_id = v.id AND y.status = 'accepted' AND y.excluded = 0 AND "
            "y.revoked = 0) AS rounds, "
            "(SELECT COUNT(*) FROM contributions w WHERE w.volunteer_id = v.id AND "
            "w.revoked = 1) AS revoked, "
            "(SELECT COUNT(*) FROM contributions z WHERE z.volunteer_id = v.id AND "
            "z.status = 'accepted' AND z.excluded = 1) AS left_out, "
            "(SELECT COUNT(*) FROM contributions p WHERE p.volunteer_id = v.id AND "
            "p.verified = 'provisional' AND p.excluded = 0) AS provisional, "
            "COALESCE(t.streak, 0) AS trust_streak, COALESCE(t.valid, 0) AS trust_valid, "
            "COALESCE(t.failures, 0) AS trust_failures, "
            f"{CONFIRMATIONS.format(who='v.id')} AS trust_replicas, "
            "COALESCE(t.caught, 0) AS trust_caught, "
            "(SELECT 'round ' || f.round || ': ' || COALESCE(f.reason, f.status) FROM "
            "contributions f WHERE f.volunteer_id = v.id AND (f.status = 'refused' OR "
            "f.excluded = 1 OR f.revoked = 1) ORDER BY f.id DESC LIMIT 1) AS last_flag "
            "FROM volunteers v LEFT JOIN credits c ON c.volunteer_id = v.id "
            "LEFT JOIN trust t ON t.volunteer_id = v.id ORDER BY v.id")

    # ---- reads for publishing

    def contributor_totals(self, before_round: int) -> list[sqlite3.Row]:
        """Each volunteer with a contribution in the rounds before `before_round`, most tokens
        first: id, name, anonymous, tokens (the weight of their contributions that were
        aggregated), rounds (in which one was), accepted (aggregated), refused (refused or left
        out by robust aggregation) and seconds (trained in the accepted ones)."""
        return self.query(
            "SELECT v.id, v.name, v.anonymous, "
            "SUM(CASE WHEN c.status = 'accepted' AND c.excluded = 0 AND c.revoked = 0 THEN "
            "c.weight ELSE 0 END) AS tokens, COUNT(DISTINCT CASE WHEN c.status = 'accepted' "
            "AND c.excluded = 0 AND c.revoked = 0 THEN c.round END) AS rounds, "
            "SUM(c.status = 'accepted' AND c.excluded = 0) AS accepted, "
            "SUM(c.status = 'refused' OR c.excluded = 1) AS refused, "
            "SUM(CASE WHEN c.status = 'accepted' THEN COALESCE(c.seconds, 0) ELSE 0 END) AS "
            "seconds FROM volunteers v JOIN contributions c ON c.volunteer_id = v.id "
            "WHERE c.round < ? GROUP BY v.id ORDER BY tokens DESC, v.id", (before_round,))

    def verification_totals(self, before_round: int) -> dict[str, int]:
        """The verification's outcomes of the contributions accepted in the rounds before
        `before_round` ('valid', 'provisional', 'failed', 'unchecked': by outcome), 'revoked'
        (credit revoked) and 'copies' (leases given to a second volunteer to compare)."""
        out = {r["k"]: int(r["n"]) for r in self.query(
            "SELECT COALESCE(verified, 'unchecked') k, COUNT(*) n FROM contributions WHERE "
            "round < ? AND status = 'accepted' GROUP BY k", (before_round,))}
        out["revoked"] = int(self.query(
            "SELECT COUNT(*) n FROM contributions WHERE round < ? AND revoked = 1",
            (before_round,))[0]["n"])
        out["copies"] = int(self.query(
            "SELECT COUNT(*) n FROM leases WHERE round < ? AND replica_of IS NOT NULL",
            (before_round,))[0]["n"])
        return out

    def refused_or_left_out(self, before_round: int) -> list[sqlite3.Row]:
        """status, reason and excluded of each contribution in the rounds before
        `before_round` that was refused, or accepted and then left out by robust
        aggregation."""
        return self.query(
            "SELECT status, reason, excluded FROM contributions WHERE round < ? "
            "AND (status = 'refused' OR excluded = 1)", (before_round,))

    def accepted_totals(self, before_round: int) -> tuple[int, float]:
        """(how many, seconds trained in all) of the contributions accepted in the rounds
        before `before_round`."""
        row = self.query("SELECT COUNT(*) n, COALESCE(SUM(seconds), 0) s FROM contributions "
                         "WHERE round < ? AND status = 'accepted'", (before_round,))[0]
        return int(row["n"]), float(row["s"])

    def aggregated_files(self, rnd: int) -> list[sqlite3.Row]:
        """sha256 and path (relative to the run directory) of each contribution aggregated in
        round `rnd` (accepted, not left out) whose file the ledger records."""
        return self.query(
            "SELECT sha256, path FROM contributions WHERE round = ? AND status = 'accepted' "
            "AND excluded = 0 AND path IS NOT NULL", (rnd,))
