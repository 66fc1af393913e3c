"""A volunteer's settings (`WorkerConfig`, from which `crowdtrain join`'s options are derived:
crowdtrain.cli.options) and what it reports when it stops (`WorkerSummary`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crowdtrain.errors import CrowdtrainError
from crowdtrain.volunteer.files import user_home


@dataclass(frozen=True)
class WorkerConfig:
    """A volunteer's settings; the fields with a "help" are `crowdtrain join` options
    (crowdtrain.cli.options)."""

    url: str
    name: str | None = field(default=None, metadata={
        "help": "display name on the leaderboard", "default_help": "volunteer-HOST"})
    invite: str | None = field(default=None, metadata={
        "metavar": "KEY", "help": "invite key, for an invite-only run"})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads", "default_help": "all cores"})
    max_rounds: int | None = field(default=None, metadata={
        "help": "leave after this many rounds"})
    max_hours: float | None = field(default=None, metadata={
        "help": "leave after this many hours"})
    max_memory: float | None = field(default=None, metadata={
        "metavar": "FRACTION", "help": "cap on the GPU memory fraction this worker may use"})
    home: Path = field(default_factory=user_home)
    error_feedback: bool = field(default=True, metadata={
        "help": "carry the codec's rounding errors over to the next round"})
    retry_for: float = 600.0
    progress: bool = True
    # processes (ranks) of this one volunteer: see crowdtrain.volunteer.ranks
    nproc: int = field(default=1, metadata={
        "metavar": "N", "help": "train as N processes of one volunteer (one per GPU, or CPU "
        "cores): DDP inside the worker, rank 0 talks to the coordinator; the same as "
        "`torchrun --nproc-per-node N -m crowdtrain.volunteer.worker URL`"})
    anonymous: bool = field(default=False, metadata={  # in published provenance
        "help": "appear as 'anonymous' in the published model card and provenance (decided "
                "when this machine first joins the run)"})
    overlap: bool = field(default=True, metadata={
        "help": "train the next round while this round's work uploads and the round closes, "
                "where the run allows it (one process only); --no-overlap: stop and wait"})
    step_pause: float = field(default=0.0, metadata={
        "metavar": "SECONDS", "help": "pause after every inner step, to leave this machine "
                                      "room for other work (a CPU throttle)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the model (inductor; faster steps on most GPUs, a minute of "
                "compiling first; needs a C++ compiler on CPU)"})

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise CrowdtrainError(f"coordinator URL must start with http:// or https://, "
                                  f"got {self.url!r}")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise CrowdtrainError("--max-rounds must be at least 1")
        if self.max_hours is not None and self.max_hours <= 0:
            raise CrowdtrainError("--max-hours must be positive")
        if self.max_memory is not None and not 0 < self.max_memory <= 1:
            raise CrowdtrainError("--max-memory is a fraction of GPU memory in (0, 1]")
        if self.threads is not None and self.threads < 1:
            raise CrowdtrainError("--threads must be at least 1")
        if self.nproc < 1:
            raise CrowdtrainError("--nproc must be at least 1")
        if not 0 <= self.step_pause <= 60:
            raise CrowdtrainError("--step-pause is 0 to 60 seconds")


@dataclass
class WorkerSummary:
    rounds: int = 0
    accepted: int = 0
    refused: int = 0
    tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    last_round: int | None = None
    reason: str = ""
    train_seconds: float = 0.0  # inside the inner loop (step pauses included)
    wall_seconds: float = 0.0

    @property
    def train_share(self) -> float:
        """The share of its time this worker spent training."""
        return self.train_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
