"""Overlapped rounds on the volunteer's side: the worker never waits for a round to close.

Stop-and-wait, a volunteer uploads round r's contribution, waits for the slower volunteers and
for the coordinator's close, downloads the update, and only then trains round r+1. Overlapped
(the default where the run allows it), it asks for round r+1's lease while round r's upload is
still going (`LeaseRequest.ahead` + `sending`) and trains on at once: the upload, the wait, the
close and the download all happen behind its compute.

The rule, a one-round-delayed outer step (INTELLECT-1's and PCCL's asynchronous DiLoCo): a
lease ahead on round R starts from the worker's own parameters p0, where round R-1's training
left them, and keeps them as its *anchor* A. When theta_R is published (round R-1 closed), the
worker adds theta_R - A to its parameters between two inner steps and makes theta_R the anchor
(`Anchor.fold`): the parameters become theta_R plus the progress made since p0, so the merged
model replaces the worker's own unmerged work, and the contribution A - p is still exactly
this lease's progress, measured against theta_R as the coordinator expects.

If theta_R has not come by the end of the lease, the contribution is A - p all the same (the
lease's progress), and its anchor is kept (`Anchors.unfolded`) and
the next lease folds theta_R in as soon as it can (it is published by then: the next lease is
ahead on round R+1 only while round R is open), moving its own anchor along so that its
contribution stays its own progress. So a worker is never more than about a round away from
the merged model, however quickly its rounds go.

Here: `Anchors` (what a contribution is measured against, and the folds), `PendingTheta`
(theta fetched by a background thread) and `Uploader` (one contribution uploading in the
background at a time).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from crowdtrain.run.model import add_into

log = logging.getLogger(__name__)


class Anchors:
    """What the lease in progress measures its contribution against, and the folds.

    `current` is theta of the lease's round when the worker started from it, or (a lease
    ahead, `local`) the worker's own parameters when the lease began. `unfolded` keeps the
    local anchors of this and earlier leases whose round's theta has not been folded in yet
    (round -> anchor): a fold uses the latest of them whose theta is published, since that
    theta holds every earlier round's merged work."""

    def __init__(self, tensors: dict[str, torch.Tensor], rnd: int, local: bool,
                 unfolded: dict[int, dict[str, torch.Tensor]] | None = None):
        self.current, self.round, self.local = tensors, rnd, local
        self.unfolded = dict(unfolded or {})
        if local:
            self.unfolded[rnd] = tensors

    def delta(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The contribution: the anchor minus the parameters now (the lease's progress)."""
        return {k: self.current[k] - params[k].float() for k in self.current}

    def fold(self, model: torch.nn.Module, theta: dict[str, torch.Tensor], rnd: int) -> None:
        """The delayed outer step with theta of round `rnd` (one of `unfolded`): move the
        model's parameters by c = theta - anchor_rnd in place (between two steps; AdamW's state
        is left as it is), and the later anchors by c too, so the lease's contribution stays
        its own progress; from the lease's own round on, it is measured from theta."""
        c = {k: theta[k] - self.unfolded[rnd][k] for k in theta}
        add_into(model, c)
        for r in [r for r in self.unfolded if r > rnd]:
            for k, v in self.unfolded[r].items():
                v.add_(c[k])
        self.unfolded = {r: t for r, t in self.unfolded.items() if r > rnd}
        if rnd == self.round:
            self.current, self.local = theta, False


class PendingTheta:
    """theta of round `target`, made by `fetch()` on a background thread (it waits for the
    round before to close, then replays the published updates); `result()` is None until it
    is there, and stays None if the fetch failed (the lease then ends unfolded)."""

    def __init__(self, fetch: Callable[[threading.Event], tuple[dict, int] | None], target: int):
        self.target = target
        self._fetch = fetch
        self._result: tuple[dict, int] | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"theta-{target}")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._fetch(self._cancel)
        except Exception as e:  # noqa: BLE001 - a failed fetch leaves the lease unfolded
            log.warning("could not fetch the parameters of round %d in the background (%s); "
                        "this lease's work is sent unfolded", self.target, e)

    def result(self) -> tuple[dict, int] | None:
        """(theta, round) once fetched, else None (never blocks)."""
        return None if self._thread.is_alive() else self._result

    def cancel(self) -> None:
        self._cancel.set()


class Uploader:
    """Sends contributions on a background thread, one at a time: `send` waits for the upload
    before to finish (so a link slower than a round's compute holds training back by the
    difference, never more), then starts this one; `in_flight` is the lease being uploaded."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self.in_flight: int | None = None
        self.failure: BaseException | None = None

    def send(self, lease_id: int, upload: Callable[[], None]) -> None:
        self.wait()
        self.in_flight = lease_id

        def run() -> None:
            try:
                upload()
            except BaseException as e:  # noqa: BLE001 - re-raised by wait(), on the main thread
                self.failure = e
            finally:
                self.in_flight = None

        self._thread = threading.Thread(target=run, daemon=True, name=f"upload-{lease_id}")
        self._thread.start()

    def wait(self) -> None:
        """Block until the upload in flight (if any) is done; re-raise what stopped it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
