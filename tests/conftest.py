"""Shared fixtures: a small corpus cut from the bundled one and a tiny run built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crowdtrain.run.data import default_corpus

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first ~300 kB of the bundled corpus, cut at a line end."""
    text = default_corpus().read_text(encoding="utf-8")[:300_000]
    text = text[: text.rfind("\n") + 1]
    p = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus):
    """A run with the tiny preset, created once per session; treat it as read-only."""
    from crowdtrain.run.folder import SwarmConfig, init_run

    # no warm start: the tests reason about a fresh model (test_warmstart.py covers it)
    return init_run(tmp_path_factory.mktemp("runs") / "tiny", [corpus], preset="tiny",
                    progress=False, swarm=SwarmConfig(warm_start=0.0))
