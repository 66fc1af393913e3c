"""User-facing errors: raised for bad input or a broken run, printed by the CLI as one line;
and the coordinator's refusals, answered as a 4xx/503 with their reason."""

from __future__ import annotations


class CrowdtrainError(Exception):
    """An error the user can act on; the message says what happened and what to do."""


class Refused(Exception):
    """A request the coordinator turns down; `status` is the HTTP status to answer with and
    `reason` the words the caller gets (and the ledger records)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason

    @classmethod
    def cannot_store(cls, e: OSError) -> Refused:
        """503 for an upload the coordinator cannot write (a full disk): not the volunteer's
        fault, and its worker retries."""
        return cls(503, f"the coordinator cannot store contributions right now "
                        f"({e.strerror or e}); your worker will retry")


class CorruptDataError(CrowdtrainError):
    """A shard, checkpoint or payload failed its integrity check (hash, size, header)."""


def check_settings(what: str, checks: dict[str, bool], config: object) -> None:
    """Raise one CrowdtrainError naming every setting of `config` whose check failed."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise CrowdtrainError(f"invalid {what} setting(s): {', '.join(bad)} ({config})")
