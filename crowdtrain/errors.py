"""User-facing errors: raised for bad input or a broken run, printed by the CLI as one line."""


class CrowdtrainError(Exception):
    """An error the user can act on; the message says what happened and what to do."""


class CorruptDataError(CrowdtrainError):
    """A shard, checkpoint or payload failed its integrity check (hash, size, header)."""


def check_settings(what: str, checks: dict[str, bool], config: object) -> None:
    """Raise one CrowdtrainError naming every setting of `config` whose check failed."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise CrowdtrainError(f"invalid {what} setting(s): {', '.join(bad)} ({config})")
