"""THE wire format between coordinator and workers: API version, paths, JSON messages.

JSON messages are pydantic models defined here and nowhere else. Tensors travel as safetensors
bodies (see codecs.py for the codecs):
- GET  MODEL                full parameters of the current round, fp32 (for newcomers); in a
                            LoRA run "parameters" are the adapters only, everywhere below too
- GET  BASE                 a LoRA run's frozen base weights (safetensors, SHA256_HEADER; equal
                            to RunInfo.base_sha256), downloaded once and cached by workers
- GET  UPDATE.format(r)     int8 outer update u_r: theta_{r+1} = theta_r + dequant(u_r), bit-exact
- POST SUBMIT.format(id)    the compressed pseudo-gradient theta_r - theta_local of a lease; its
                            safetensors metadata holds `stats` (SubmitStats as JSON) and `codec`.
Every request carries API_HEADER; a coordinator that no longer speaks the worker's version
answers 426 with words telling the volunteer to upgrade. Errors are `{"detail": "..."}` with a
4xx status that says what was wrong.

This module imports nothing from the crowdtrain package.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# v2: int4 contributions, distillation runs, LeaseRequest.resume; v3: sparse contributions
# (SwarmSchedule.sparse_k and sparse_bits); v4: loss masks of chat data (ShardInfo.mask_sha256);
# v5: overlapped rounds (LeaseRequest.ahead, Lease.ahead, SwarmSchedule.overlap and
# stale_weight): a worker of v4 or older keeps stop-and-wait, which the coordinator still serves;
# v6: fresh leases (Lease.fresh) of runs that verify their contributions by replication;
# v7: AliveResponse.finish (an overlapped round that could not be paced ends its leases when
# its first contribution is in; a v6 worker ignores it and trains its whole lease, as before)
API_VERSION = 7
MIN_API_VERSION = 1
API_HEADER = "X-Crowdtrain-Api"
ROUND_HEADER = "X-Crowdtrain-Round"
SHA256_HEADER = "X-Crowdtrain-Sha256"

INFO = "/v1/info"
JOIN = "/v1/join"
TOKENIZER = "/v1/tokenizer"
MODEL = "/v1/model"
BASE = "/v1/base"
TEACHER = "/v1/teacher"
UPDATE = "/v1/updates/{round}"
SHARD = "/v1/shards/{sha256}"
# the immutable files of a run (checkpoints, updates, shards, masks, base, teacher) by sha256,
# from the coordinator or, with `serve --public-url`, from any web server holding its public
# folder; ARTIFACTS announces which exist (workers fetch nothing that is not announced)
BLOB = "/v1/blobs/{sha256}"
ARTIFACTS = "/v1/artifacts"
LEASE = "/v1/lease"
ALIVE = "/v1/lease/{lease_id}/alive"
HEARTBEAT_SECONDS = 5.0
HEARTBEAT_AHEAD_SECONDS = 1.0  # while a lease trained ahead waits for its round to open
LEASE_SILENCE_SECONDS = 20.0
SUBMIT = "/v1/submit/{lease_id}"
STATUS = "/v1/status"
ADMIN_VOLUNTEERS = "/v1/admin/volunteers"
ADMIN_BAN = "/v1/admin/volunteers/{who}/ban"
ADMIN_UNBAN = "/v1/admin/volunteers/{who}/unban"
ADMIN_END = "/v1/admin/end"

INT64_MAX = 2**63 - 1  # what SQLite stores; larger numbers are refused at the boundary
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._\-]{0,47}$"


def min_api_version(codec: str, teacher: bool = False, masked: bool = False,
                    sparse_ef_decay: float | None = None, fresh: bool = False) -> int:
    """The oldest worker API that can take part in a run whose contributions are in `codec`,
    that distils a `teacher` and whose shards carry loss masks (`masked`: int4 and
    distillation came with v2: a v1 worker would ignore the teacher; the sparse codec with v3;
    loss masks and the sparse codec's decayed error feedback (`sparse_ef_decay` < 1) with v4:
    an older worker would train on every token, or keep plain feedback); `fresh` leases (a
    run that replicates leases to verify them) with v6: an older worker would carry its
    AdamW state into them and its copy would not match."""
    if fresh:
        return 6
    if masked or (codec == "sparse" and sparse_ef_decay is not None and sparse_ef_decay < 1):
        return 4
    if codec == "sparse":
        return 3
    return 2 if codec == "int4" or teacher else MIN_API_VERSION


def upgrade_message(client_version: int | None, minimum: int = MIN_API_VERSION) -> str:
    """What a worker whose API version is not accepted is told."""
    return (f"this run takes workers of crowdtrain API v{minimum}..v{API_VERSION}, your "
            f"worker speaks v{client_version if client_version is not None else '?'}: upgrade "
            "with `pip install -U crowdtrain` and join again")


class ShardInfo(BaseModel):
    name: str
    sha256: str
    tokens: int
    mask_sha256: str | None = Field(None, description="a chat run's loss mask of this shard "
                                    "(one byte per token, 1: the target there carries loss), "
                                    "fetched like a shard, by its sha256")


class SwarmSchedule(BaseModel):
    inner_steps: int = Field(description="H: inner steps of the open round (budget in steps)")
    inner_steps_growth: float = Field(1.0, description="last round's H / first round's: H "
                                      "grows over the run at the same total steps")
    round_seconds: float = Field(description="budget in seconds; the round deadline")
    rounds: int = Field(description="rounds in the run (0: until stopped)")
    min_contributions: int
    codec: str
    block: int
    sparse_k: int | None = Field(None, description="sparse codec: values sent per chunk of "
                                 "`block` (a payload with another k is refused)")
    sparse_bits: int | None = Field(None, description="sparse codec: bits per value sent")
    sparse_ef_decay: float | None = Field(None, ge=0, le=1, description="sparse codec: the "
                                          "workers' error-feedback decay, e <- decay * e + "
                                          "delta (codecs.accumulate); None: 1, plain error "
                                          "feedback")
    overlap: bool = Field(False, description="the coordinator hands a volunteer that has sent "
                          "the open round's work a lease on the next round at once (Lease."
                          "ahead): it trains on while the round closes, and folds the update in "
                          "when it comes (a delayed outer step)")
    stale_weight: float = Field(0.0, ge=0, le=1, description="a contribution that arrives one "
                                "round late is applied in the next round at this share of its "
                                "weight (0: refused as stale)")


class TeacherInfo(BaseModel):
    """A distillation run's teacher: its weights (GET TEACHER, safetensors) and config."""

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int
    config_json: dict = Field(description="Hugging Face config.json of the teacher")
    alpha: float = Field(description="weight of the KL term against the text's cross-entropy")
    temperature: float


class RunInfo(BaseModel):
    api_version: int
    run_name: str
    preset: str
    model_config_json: dict = Field(description="Hugging Face config.json of the model")
    train: dict = Field(description="inner-loop settings (TrainConfig)")
    schedule: SwarmSchedule
    dtype: str = Field(description="token dtype of the shards")
    train_shards: list[ShardInfo]
    round: int = Field(description="the round now open")
    finished: bool
    params: int
    lora: dict | None = Field(None, description="LoRA settings (rank, alpha, dropout, "
                              "targets) when the run trains adapters on a frozen base")
    base_sha256: str | None = Field(None, description="sha256 of the base weights (GET BASE) "
                                    "of a LoRA run")
    base_bytes: int | None = Field(None, description="size of the base weights file")
    teacher: TeacherInfo | None = Field(None, description="a distillation run's teacher: "
                                        "every inner step learns from its logits")
    public_url: str | None = Field(None, description="where the run's immutable files are "
                                   "served by sha256 (`{public_url}/{sha256}`): a web server or "
                                   "CDN holding the coordinator's public folder; None: "
                                   "GET BLOB from the coordinator")


class Artifacts(BaseModel):
    """The files a worker may fetch now, by sha256: the open round's checkpoint and the
    updates of the rounds before it that are kept (round -> sha256)."""

    round: int = Field(description="the round now open; the model is its checkpoint")
    model_sha256: str
    model_bytes: int
    updates: dict[int, str] = Field(default_factory=dict)


class JoinRequest(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="display name on the leaderboard")
    device: str = Field(max_length=64)
    api_version: int
    invite: str | None = Field(None, max_length=128, description="key for an invite-only run")
    anonymous: bool = Field(False, description="credit this volunteer as 'anonymous' in the "
                                               "published model card and provenance")


class JoinResponse(BaseModel):
    volunteer_id: int
    name: str
    token: str = Field(description="bearer token; shown once, stored hashed by the coordinator")


class LeaseRequest(BaseModel):
    have_round: int | None = Field(None, description="round of the parameters the worker holds")
    device: str = Field("cpu", max_length=64)
    tokens_per_s: float | None = Field(None, ge=0)
    resume: int | None = Field(None, ge=0, le=INT64_MAX, description=(
        "a lease this worker was training when it stopped (crash, reboot): handed back, with "
        "the same batches and budget, if its round is still open"))
    ahead: bool = Field(False, description=(
        "the worker can train a round that is not open yet from its own parameters (it sent "
        "the open round's work) and fold the open round's update in when it is published"))
    sending: int | None = Field(None, ge=0, le=INT64_MAX, description=(
        "the lease whose contribution this worker is uploading now (in the background): with "
        "`ahead`, it counts as sent"))


class Lease(BaseModel):
    lease_id: int
    round: int
    shards: list[str] = Field(description="names of the train shards to sample from")
    seed: int = Field(description="batch seed: batch of step s = get_batch(shards, seed, s)")
    start_step: int = Field(description="global schedule position of the first inner step")
    max_steps: int
    seconds: float = Field(description="time budget for training, from now")
    deadline_in: float = Field(description="seconds until the round closes without this lease")
    ahead: bool = Field(False, description="a lease on the round after the open one: train from "
                        "the parameters at hand; theta of this round (the open round's update) "
                        "is published when the open round closes")
    fresh: bool = Field(False, description="start from this round's parameters with new AdamW "
                        "state and send this lease's delta alone, without error feedback: any "
                        "lease of a run that verifies may be given to a second volunteer too, "
                        "and the two deltas compared")


class LeaseResponse(BaseModel):
    status: Literal["lease", "wait", "done"]
    lease: Lease | None = None
    retry_after: float = 0.0
    message: str = ""


class Alive(BaseModel):
    """A worker's heartbeat while it trains a lease (every `HEARTBEAT_SECONDS`): a lease whose
    worker has said it is alive and then goes silent for `LEASE_SILENCE_SECONDS` is given up,
    so the round closes on the others' reports instead of waiting for its deadline."""

    step: int = Field(ge=0, description="inner steps of the lease done so far")


class AliveResponse(BaseModel):
    ok: bool = Field(description="false: the lease is no longer open (round closed, or given "
                                 "up); finish or drop the work and ask for a new lease")
    round: int | None = Field(None, description="the round now open: a worker training a lease "
                              "ahead learns from it that the update it waits for is published")
    finish: bool = Field(False, description="true: stop training this lease and send the steps "
                         "done (an overlapped round the coordinator could not pace, its first "
                         "round, whose fastest volunteer has already sent its work)")


class SubmitStats(BaseModel):
    """Self-reported figures of a contribution (never trusted beyond what the lease allowed)."""

    lease_id: int = Field(ge=0, le=INT64_MAX)
    round: int = Field(ge=0, le=INT64_MAX)
    steps: int = Field(ge=0, le=INT64_MAX)
    tokens: int = Field(ge=0, le=INT64_MAX)
    mean_loss: float = Field(allow_inf_nan=False)
    seconds: float = Field(ge=0, allow_inf_nan=False)
    device: str = Field("cpu", max_length=64)


class SubmitResponse(BaseModel):
    accepted: bool
    contribution_id: int
    round: int
    message: str


class RoundSummary(BaseModel):
    round: int
    state: str
    opened_at: float
    closed_at: float | None
    contributions: int
    refused: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    bytes_in: int
    bytes_out: int


class VolunteerSummary(BaseModel):
    name: str
    device: str | None
    last_seen: float | None
    rounds: int
    tokens: int
    accepted: int
    refused: int
    tokens_per_s: float | None
    left_out: int = Field(0, description=(
        "accepted contributions left out of their round (robust aggregation or the "
        "verification): no credit"))
    provisional: int = Field(0, description=(
        "credited contributions the verification could not decide on (too few in the round "
        "for its reference): credited provisionally"))


class Refusal(BaseModel):
    round: int
    volunteer: str
    reason: str
    at: float
    left_out: bool = Field(False, description=(
        "accepted, then left out of its round (robust aggregation or the verification); "
        "False: refused on arrival"))


class AdminVolunteer(BaseModel):
    id: int
    name: str
    banned: bool
    device: str | None
    last_seen: float | None
    tokens: int
    accepted: int
    refused: int
    left_out: int = 0
    provisional: int = 0
    # the verification's record (coordinator/verification.py TrustState): its current
    # streak of valid contributions, all valid ones, all failures, the copies of its leases
    # that confirmed its work (by volunteers not caught since: what the replication draws
    # on); the contributions whose credit a catch revoked (or withholds), and whether a copy
    # caught it and none has confirmed its work since
    trust_streak: int = 0
    trust_valid: int = 0
    trust_failures: int = 0
    trust_replicas: int = 0
    revoked: int = 0
    caught: bool = False
    # why its latest contribution refused, left out or without credit was so ("round N: ...")
    last_flag: str | None = None


class AdminAck(BaseModel):
    ok: bool
    message: str


class Status(BaseModel):
    api_version: int
    run_name: str
    round: int
    finished: bool
    params: int
    payload_bytes: int = Field(description="bytes of one int8 delta or update payload")
    full_model_bytes: int
    rounds: list[RoundSummary]
    volunteers: list[VolunteerSummary]
    initial_val_loss: float | None
    refusals: list[Refusal] = Field(default_factory=list,
                                    description="the most recent refused contributions")
    round_deadline: float | None = Field(None, description="unix time the open round closes")
    round_extensions: int = Field(0, description="times the open round's deadline was extended")
    round_waiting: str | None = Field(None, description=(
        "why the open round has not closed yet, when it is short of contributions"))
    bytes_served: dict[str, int] = Field(default_factory=dict, description=(
        "response bytes this coordinator process has sent, per route"))
    close_failing: str | None = Field(None, description=(
        "why the last attempt to close the open round failed, until one succeeds (the "
        "coordinator retries every 10 s; its log has the details)"))
