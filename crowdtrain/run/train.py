"""The inner training loop: parameters + batches -> N AdamW steps -> loss and throughput.

Pure torch, no I/O: the same `InnerLoop` runs as `crowdtrain train` (one machine) and inside a
volunteer worker (DiLoCo inner steps), where its AdamW state persists across rounds. The learning
rate follows a warmup + cosine schedule indexed by a global step, so a worker resuming at any
point of the run uses the same schedule as a single machine would. Targets of -100 (positions a
loss mask leaves out, crowdtrain.run.data) carry no loss, in training and in `evaluate`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from crowdtrain.errors import CrowdtrainError, check_settings

Batch = tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Inner-optimizer settings; stored in the run's config so every machine uses the same.
    The fields with a "help" are `crowdtrain init` options (crowdtrain.cli.options)."""

    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate"})
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    total_steps: int = field(default=3000, metadata={
        "flag": "steps", "help": "total inner steps of the schedule; --rounds or --inner-steps "
        "make it the warm start's plus rounds x H"})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "batch_size": self.batch_size >= 1,
            "seq_len": self.seq_len >= 8,
            "lr": 0 < self.lr < 1,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "total_steps": self.total_steps >= 1,
            "weight_decay": self.weight_decay >= 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "grad_clip": self.grad_clip >= 0,
        }
        check_settings("training", checks, self)


PRESET_TRAINING: dict[str, TrainConfig] = {
    "tiny": TrainConfig(batch_size=8, seq_len=64, lr=3e-3, warmup_steps=20, total_steps=400),
    "small": TrainConfig(batch_size=16, seq_len=128, lr=3e-3, warmup_steps=50, total_steps=500),
    "base": TrainConfig(batch_size=32, seq_len=512, lr=6e-4, warmup_steps=1000, total_steps=50000),
}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * frac))


def pick_device(preference: str = "auto") -> torch.device:
    """cuda > mps > cpu for "auto"; an explicit choice that is not available is an error."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(preference)
    except RuntimeError:
        raise CrowdtrainError(
            f"unknown device {preference!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CrowdtrainError("--device cuda was asked for but torch sees no CUDA GPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CrowdtrainError("--device mps was asked for but this machine has no MPS")
    return dev


@dataclass
class StepStats:
    steps: int
    tokens: int
    mean_loss: float
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Snapshots(Protocol):
    """Something that saves the training in progress now and then (crowdtrain.volunteer.resume)."""

    def due(self) -> bool: ...

    def save(self, stats: StepStats) -> None: ...


@dataclass(frozen=True)
class Teacher:
    """A frozen model the student learns from (distillation): its softened distribution at
    `temperature`, weighted `alpha` against the text's cross-entropy (1 - alpha)."""

    model: torch.nn.Module
    alpha: float
    temperature: float


def target_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (tokens, vocab) `logits` on the (tokens,) targets that are not
    -100; a zero that still has a graph when every target is -100 (a micro-batch of prompt
    tokens only), where F.cross_entropy's mean would be NaN. Without any -100 it equals
    F.cross_entropy(logits, y) bit for bit (the same op)."""
    ce = F.cross_entropy(logits, y)
    return torch.where((y != -100).any(), ce, logits[:0].sum())


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE.

    `logits` and `teacher_logits` are (tokens, vocab) float32, `y` the (tokens,) targets; the
    CE leaves out targets of -100 (`target_loss`), the KL takes every position."""
    ce = target_loss(logits, y)
    t = temperature
    kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                  log_target=True, reduction="batchmean") * t * t
    return alpha * kl + (1 - alpha) * ce


def check_batch_splits(batch_size: int, ranks: int) -> None:
    """CrowdtrainError unless the run's batch splits evenly across `ranks` processes, as the
    inner loop requires (each rank takes its contiguous 1/ranks of every batch)."""
    if batch_size % ranks:
        raise CrowdtrainError(f"the run's batch size {batch_size} does not split across "
                              f"{ranks} processes: use a divisor of it (--nproc)")


class InnerLoop:
    """AdamW on a model, with schedule, clipping and bf16 autocast on CUDA."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                 micro_batch: int | None = None, ranks: int = 1, rank: int = 0,
                 compile_backend: str | None = None, teacher: Teacher | None = None):
        """`micro_batch`: rows per forward/backward (gradient accumulation up to the batch;
        default: the whole batch; halved automatically on out-of-memory). `ranks > 1`: this
        process is rank `rank` of a torch.distributed group (already initialised): each rank
        takes its contiguous 1/ranks of every batch and DDP averages the gradients, so the
        update equals one process on the whole batch. `compile_backend` (e.g. "inductor"): the
        forward runs through `torch.compile` with that backend; the parameters (checkpoints,
        deltas, optimizer state) are the model's own either way. `teacher`: the loss is
        `distillation_loss` against its logits instead of the text's cross-entropy alone."""
        self.cfg = cfg
        self.device = device
        self.model = model.to(device)
        check_batch_splits(cfg.batch_size, ranks)
        self.ranks, self.rank = ranks, rank
        self.local_batch = cfg.batch_size // ranks
        self.micro_batch = min(micro_batch or self.local_batch, self.local_batch)
        self.net: torch.nn.Module = self.model
        if ranks > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.net = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if compile_backend:
            self.net = torch.compile(self.net, backend=compile_backend)
        decay, no_decay = [], []
        for p in model.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            fused=device.type == "cuda",
        )
        self.autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
        self.teacher = teacher
        if teacher is not None:
            teacher.model.to(device).eval().requires_grad_(False)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW state as named CPU tensors (saved with safetensors, never pickled)."""
        out = {}
        for name, p in self.model.named_parameters():
            for key, v in self.optimizer.state.get(p, {}).items():
                t = v if torch.is_tensor(v) else torch.tensor(float(v))
                out[f"{name}:{key}"] = t.detach().to("cpu").contiguous()
        return out

    def reset_optimizer(self) -> None:
        """New AdamW state (step 0): a fresh lease starts from it, so that two volunteers
        given the same lease train the same steps alike."""
        self.optimizer.state.clear()

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `optimizer_tensors` saved; a mismatch is a CrowdtrainError."""
        params = dict(self.model.named_parameters())
        state: dict = {}
        for key, t in tensors.items():
            name, _, field = key.rpartition(":")
            if name not in params:
                raise CrowdtrainError(f"optimizer state names unknown parameter {name}")
            p = params[name]
            if field != "step" and t.shape != p.shape:
                raise CrowdtrainError(f"optimizer state {key} has shape {list(t.shape)}, "
                                      f"expected {list(p.shape)}")
            dev = p.device if field != "step" or self.device.type == "cuda" else "cpu"
            state.setdefault(p, {})[field] = t.to(dev, torch.float32)
        for p, st in state.items():
            self.optimizer.state[p] = st

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                  enabled=self.autocast_dtype is not None)
        with autocast:
            logits = self.net(input_ids=x).logits
        logits = logits.float().view(-1, logits.size(-1))
        if self.teacher is None:
            return target_loss(logits, y.reshape(-1))
        with torch.no_grad(), autocast:
            t = self.teacher.model(input_ids=x).logits
        return distillation_loss(logits, t.float().view(-1, t.size(-1)), y.reshape(-1),
                                 self.teacher.alpha, self.teacher.temperature)

    def _gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of the mean loss over the rows of (x, y), accumulated `micro_batch` rows
        at a time; on out-of-memory the micro-batch halves and the step restarts (one process
        only: ranks would disagree). Returns the detached mean loss."""
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            try:
                total = torch.zeros((), device=self.device)
                n = x.size(0)
                starts = range(0, n, self.micro_batch)
                for j, a in enumerate(starts):
                    xa, ya = x[a: a + self.micro_batch], y[a: a + self.micro_batch]
                    last = j == len(starts) - 1
                    sync = contextlib.nullcontext() if last or self.ranks == 1 else \
                        self.net.no_sync()
                    with sync:
                        loss = self.loss(xa, ya) * (xa.size(0) / n)
                        loss.backward()
                    total += loss.detach()
                return total
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
                    raise  # MPS reports OOM as a plain RuntimeError
                if self.ranks > 1 or self.micro_batch == 1:
                    raise CrowdtrainError(
                        f"out of {self.device.type} memory even at micro-batch "
                        f"{self.micro_batch}: use a smaller preset or --device cpu") from None
                self.optimizer.zero_grad(set_to_none=True)
                self.micro_batch //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("out of memory: micro-batch halved to %d rows (gradient "
                            "accumulation keeps the batch at %d)", self.micro_batch,
                            self.cfg.batch_size)

    def run(
        self,
        batches: Callable[[int], Batch],
        start_step: int,
        n_steps: int,
        deadline: float | None = None,
        on_step: Callable[[int, float], None] | None = None,
        report_every: int = 10,
        stop: Callable[[], bool] | None = None,
        snapshots: Snapshots | None = None,
        between_steps: Callable[[int], None] | None = None,
        step_pause: float = 0.0,
    ) -> StepStats:
        """Train up to `n_steps`, stopping early at `deadline` (a time.monotonic() value) or
        when `stop()` turns true (checked between steps).

        `snapshots` (one process only) is asked between steps whether a snapshot is due and
        given the statistics so far when it is (see crowdtrain.volunteer.resume).
        `between_steps(done)` is called before each step with the steps done so far (an
        overlapped worker folds a delayed outer update in there: crowdtrain.volunteer.overlap).
        `step_pause` seconds are slept after each step (a volunteer's CPU throttle; how
        benchmarks make one slower), counted as training time.

        `batches(step)` gives the batch of global step `step`; `on_step(step, loss)` is called
        every `report_every` steps with the latest loss (a sync point on GPU, so not every step).
        """
        self.model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        tokens = done = 0
        for i in range(n_steps):
            halt = (deadline is not None and time.monotonic() >= deadline and done > 0) or (
                stop is not None and stop())
            if self.ranks > 1:  # every rank must take the same number of steps
                import torch.distributed as dist
                flag = torch.tensor([float(halt)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                halt = bool(flag.item())
            if halt:
                break
            if between_steps is not None:
                between_steps(done)
            step = start_step + i
            x, y = batches(step)
            if self.ranks > 1:
                lo = self.rank * self.local_batch
                x, y = x[lo: lo + self.local_batch], y[lo: lo + self.local_batch]
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            for g in self.optimizer.param_groups:
                g["lr"] = lr_at(step, self.cfg)
            loss = self._gradients(x, y)
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            loss_sum += loss
            tokens += y.numel() * self.ranks
            done += 1
            if step_pause > 0:
                time.sleep(step_pause)
            if on_step is not None and (done % report_every == 0 or i == n_steps - 1):
                on_step(step, float(loss))
            if snapshots is not None and snapshots.due():
                snapshots.save(StepStats(done, tokens, float(loss_sum) / done,
                                         time.perf_counter() - t0))
        if self.ranks > 1:  # the whole batch's mean loss, the same on every rank
            import torch.distributed as dist
            dist.all_reduce(loss_sum)
            loss_sum /= self.ranks
        mean = float(loss_sum) / max(done, 1)
        if not math.isfinite(mean):
            raise CrowdtrainError(
                "training diverged (loss is not finite): lower the learning rate in run.json"
            )
        return StepStats(done, tokens, mean, time.perf_counter() - t0)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, windows: Iterable[torch.Tensor | Batch], device: torch.device,
    batch_size: int = 16,
) -> float:
    """Mean next-token cross-entropy (nats/token) over the given windows: (seq_len + 1)-token
    tensors, or (input, target) pairs whose targets of -100 are left out (data.eval_windows
    with masks): the sum over the targets that count, divided by their number."""
    was_training = model.training
    model.eval()
    total, count, windows_seen = 0.0, 0, 0
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal total, count
        x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
        logits = model(input_ids=x).logits.float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                       reduction="sum"))
        count += int((y != -100).sum())
        xs.clear()
        ys.clear()

    for w in windows:
        x, y = w if isinstance(w, tuple | list) else (w[:-1], w[1:])
        xs.append(x)
        ys.append(y)
        windows_seen += 1
        if len(xs) == batch_size:
            flush()
    if xs:
        flush()
    model.train(was_training)
    if windows_seen == 0:
        raise CrowdtrainError("no validation windows: the validation split is shorter than seq_len")
    if count == 0:
        raise CrowdtrainError("no validation target carries loss: the loss mask leaves out every "
                              "token of the validation split; give more assistant turns")
    return total / count
