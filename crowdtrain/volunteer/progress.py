"""A volunteer's terminal progress: one rich bar per round (round, inner step, loss, tokens/s,
bytes sent, the coordinator's verdict), off with `join --quiet`."""

from __future__ import annotations

from crowdtrain.wire import protocol


class RoundProgress:
    """A rich progress bar per round: round, inner step, loss, tokens/s, bytes sent."""

    def __init__(self, enabled: bool, name: str):
        self.enabled, self.name = enabled, name
        self.progress = None
        self.task = None
        self.sent = 0

    def __enter__(self) -> RoundProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, lease: protocol.Lease, step: int, loss: float) -> None:
        if self.progress is None:
            return
        desc = f"{self.name} round {lease.round}"
        if self.task is None or self.progress.tasks[-1].description != desc:
            self.task = self.progress.add_task(desc, total=lease.max_steps, info="")
        self.progress.update(self.task, completed=step,
                             info=f"loss {loss:.3f}  sent {self.sent / 1e6:.1f} MB")

    def done(self, lease, st, nbytes: int, verdict: str, upload_s: float | None = None) -> None:
        """The round's line once its contribution was sent (`nbytes`, in `upload_s` seconds)."""
        self.sent += nbytes
        took = f" (this round {nbytes / 1e6:.2f} MB in {upload_s:.1f}s)" if upload_s else ""
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=st.steps, info=(
                f"loss {st.mean_loss:.3f}  {st.tokens_per_s:,.0f} tok/s  "
                f"sent {self.sent / 1e6:.1f} MB{took}  {verdict}"))
