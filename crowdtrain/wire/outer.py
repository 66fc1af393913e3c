"""The coordinator's DiLoCo outer step, as pure functions on dicts of tensors.

This module owns the math that turns the workers' pseudo-gradients (theta_old - theta_local)
into a change of the global model: a token-weighted mean of the pseudo-gradients, then SGD
with (Nesterov) momentum on that mean, with torch.optim.SGD semantics (dampening 0). Nothing
here does I/O or keeps state; the caller owns the parameters and the momentum buffers. It
imports only torch and the standard library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OuterConfig:
    """Outer optimizer settings (DiLoCo defaults: lr 0.7, Nesterov momentum 0.9)."""

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.lr, numbers.Real) or not 0 < self.lr <= 10:
            raise ValueError(f"lr must be in (0, 10], got {self.lr!r}")
        if not isinstance(self.momentum, numbers.Real) or not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be a bool, got {self.nesterov!r}")


def _check_same(ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                what: str) -> None:
    """ValueError unless `other` has exactly the names and shapes of `ref`."""
    if set(ref) != set(other):
        missing = sorted(set(ref) - set(other))[:3]
        extra = sorted(set(other) - set(ref))[:3]
        raise ValueError(f"{what} names do not match: missing {missing}, unexpected {extra}")
    for name, t in ref.items():
        if tuple(other[name].shape) != tuple(t.shape):
            raise ValueError(f"{what} tensor {name} has shape {tuple(other[name].shape)}, "
                             f"expected {tuple(t.shape)}")


def weighted_mean(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted mean (e.g. by tokens trained) of pseudo-gradients, as new float32 tensors.

    `deltas` is a non-empty list of dicts with the same names and shapes; `weights` are
    positive and finite, one per delta. Weights are normalised first (w_i / sum(w)), then
    sum(w_i * d_i) is accumulated in float32 in list order, so the result is deterministic.
    """
    if len(deltas) == 0:
        raise ValueError("weighted_mean needs at least one delta")
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(deltas)} deltas but {len(weights)} weights")
    ws = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) \
                or not w > 0:
            raise ValueError(f"weight {i} must be positive and finite, got {w!r}")
        ws.append(float(w))
    total = math.fsum(ws)
    if not math.isfinite(total):
        raise ValueError("sum of weights is not finite")
    norm = [w / total for w in ws]
    first = deltas[0]
    for i, d in enumerate(deltas[1:], start=1):
        _check_same(first, d, f"delta {i}")
    out: dict[str, torch.Tensor] = {}
    for name in first:
        acc = deltas[0][name].detach().to(torch.float32) * norm[0]
        for d, w in zip(deltas[1:], norm[1:], strict=True):
            acc = acc + d[name].detach().to(torch.float32) * w
        out[name] = acc
    return out


def outer_step(
    params: Mapping[str, torch.Tensor],
    grad: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor] | None,
    cfg: OuterConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One outer SGD step on the pseudo-gradient `grad`, torch.optim.SGD semantics.

    buf = momentum * buf + grad (buf = grad on the first step, `momentum is None`);
    step = grad + momentum * buf if nesterov else buf; update = -lr * step.
    Returns (update, new momentum buffers), float32; the caller applies params += update.
    `params` is only used to check names and shapes; no input is modified.
    """
    _check_same(params, grad, "grad")
    if momentum is not None:
        _check_same(params, momentum, "momentum")
    update: dict[str, torch.Tensor] = {}
    new_buf: dict[str, torch.Tensor] = {}
    for name in params:
        g = grad[name].detach().to(torch.float32)
        if momentum is None:
            buf = g.clone()
        else:
            buf = momentum[name].detach().to(torch.float32) * cfg.momentum + g
        step = g + buf * cfg.momentum if cfg.nesterov else buf
        update[name] = step * (-cfg.lr)
        new_buf[name] = buf
    return update, new_buf


def delta_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors of `delta`, accumulated in float64."""
    total = math.fsum(float(t.detach().to(torch.float64).pow(2).sum()) for t in delta.values())
    return math.sqrt(total)


def apply_update(
    theta: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """theta + update, elementwise in fp32 on CPU: the one definition of how a published
    (dequantised) update is applied, shared by the coordinator and every worker, so both get
    identical bits (a single IEEE add per element, no fused ops)."""
    return {k: theta[k].to("cpu", torch.float32) + update[k].to("cpu", torch.float32)
            for k in theta}
