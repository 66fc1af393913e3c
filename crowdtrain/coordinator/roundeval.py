"""The coordinator's held-out evaluation of each new round's model, in a background thread with
one torch thread, so evaluating never holds a round open. Rounds are evaluated in order; one
overtaken by a newer round before its turn is skipped. The loss goes to the ledger
(`rounds.val_loss`), where the dashboard, `crowdtrain status` and the model card read it."""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from crowdtrain.run.checkpoint import load_checkpoint
from crowdtrain.run.folder import Run
from crowdtrain.run.ledger import Ledger
from crowdtrain.run.model import load_into
from crowdtrain.run.train import evaluate

log = logging.getLogger(__name__)


class RoundEvaluator:
    """Evaluates checkpoints of `run` on its held-out windows with `model` (a model of the
    run's shape that nothing else uses while this runs)."""

    def __init__(self, run: Run, ledger: Ledger, model: torch.nn.Module):
        self.run, self.ledger, self.model = run, ledger, model
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="crowdtrain-eval")
        self._thread.start()

    def submit(self, rnd: int) -> None:
        """Evaluate checkpoint `rnd` when the thread gets to it."""
        self._queue.put(rnd)

    def wait(self, timeout: float = 60.0) -> None:
        """Block until the queued evaluations are done (for tests and the demo's summary)."""
        end = time.time() + timeout
        while not self._queue.empty() and time.time() < end:
            time.sleep(0.05)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while (rnd := self._queue.get()) is not None:
            if not self._queue.empty():
                continue  # a newer round is waiting: evaluate that one instead
            try:
                load_into(self.model, load_checkpoint(self.run.ckpt_dir, rnd).tensors)
                loss = evaluate(self.model, self.run.val_windows(), torch.device("cpu"))
                self.ledger.set_val_loss(rnd, loss)
                log.info("round %d: held-out loss %.4f", rnd, loss)
            except Exception as e:  # evaluation must never take the coordinator down
                log.warning("evaluation of round %d failed: %s", rnd, e)
