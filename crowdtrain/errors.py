"""User-facing errors: raised for bad input or a broken run, printed by the CLI as one line."""


class CrowdtrainError(Exception):
    """An error the user can act on; the message says what happened and what to do."""


class CorruptDataError(CrowdtrainError):
    """A shard, checkpoint or payload failed its integrity check (hash, size, header)."""
