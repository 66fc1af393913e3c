"""Shared fixtures: a small corpus cut from the bundled one, a tiny run built from it, a small
pretrained Hugging Face folder with new text to fine-tune it on, and a teacher to distil."""

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

    # no warm start: the tests reason about a fresh model (test_warmstart.py covers it); no
    # verification: most tests send random deltas, which it rightly leaves out (the tests of
    # the verification turn it on: tests/coordinator/test_verify_close.py, e2e/test_freeloader.py)
    return init_run(tmp_path_factory.mktemp("runs") / "tiny", [corpus], preset="tiny",
                    progress=False, swarm=SwarmConfig(warm_start=0.0, verify=False))


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, corpus) -> Path:
    """A tiny Llama trained for a few steps on Shakespeare, saved as a Hugging Face folder."""
    import numpy as np

    from crowdtrain.run.data import DataConfig, get_batch, train_tokenizer
    from crowdtrain.run.model import build_model, preset_config
    from crowdtrain.run.train import InnerLoop, TrainConfig

    d = tmp_path_factory.mktemp("pretrained") / "tiny-shakespeare"
    tok = train_tokenizer([corpus], DataConfig(vocab_size=512))
    eot = tok.token_to_id("<|endoftext|>")
    model = build_model(preset_config("tiny", tok.get_vocab_size(), eot), seed=1)
    ids = np.asarray(tok.encode(corpus.read_text(encoding="utf-8")[:60_000]).ids, np.uint16)
    tcfg = TrainConfig(batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, total_steps=60)
    InnerLoop(model, tcfg, torch.device("cpu")).run(
        lambda step: get_batch([ids], 8, 64, 0, step), 0, 60)
    model.save_pretrained(str(d))
    tok.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="session")
def new_text(tmp_path_factory) -> Path:
    """Different text from the pretraining data: Python source (~120 kB)."""
    src = Path(__file__).resolve().parents[1] / "crowdtrain"
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(src.rglob("*.py")))[:120_000]
    p = tmp_path_factory.mktemp("newdata") / "code.txt"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def teacher(tiny_run, tmp_path_factory):
    from publish_helpers import train_briefly

    from crowdtrain.publish.export import export_model

    base = tmp_path_factory.mktemp("distill")
    run = train_briefly(tiny_run, base / "run", steps=200)
    return export_model(run, base / "teacher", evaluate=False)
