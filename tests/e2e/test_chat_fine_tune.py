"""Chat fine-tuning of an open model on `messages` data, and parquet input, end to end on real
files and processes: init renders each conversation with the model's own chat template
(transformers ships none, so the family writes one: ChatML, as Qwen2's), the loss falls on the
assistant's tokens only, the masks travel to two volunteer processes with the shards, the
held-out loss on the answers falls, and the export carries the chat template unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from families import CHATML, make_family

from crowdtrain.run.data import load_masks, load_split, mask_name
from crowdtrain.run.folder import SwarmConfig, init_run

SYSTEM = "You are a helpful tutor."
QUESTIONS = ["What is {a} plus {b}?", "Add {a} and {b}.", "Tell me the sum of {a} and {b}."]
ANSWER = "The sum of {a} and {b} is {c}."


def conversations(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 17, (3 * i) % 11
        q = QUESTIONS[i % len(QUESTIONS)].format(a=a, b=b)
        msgs = [{"role": "user", "content": q},
                {"role": "assistant", "content": ANSWER.format(a=a, b=b, c=a + b)}]
        if i % 2:
            msgs.insert(0, {"role": "system", "content": SYSTEM})
        if i % 3 == 0:  # a second turn
            msgs += [{"role": "user", "content": "Thanks!"},
                     {"role": "assistant", "content": "You are welcome."}]
        out.append({"messages": msgs})
    return out


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_family("qwen2", tmp_path_factory.mktemp("chat") / "tiny-qwen2-instruct")


@pytest.mark.slow
def test_chat_fine_tuning_trains_on_the_assistant_turns_only(qwen, tmp_path):
    from swarm_helpers import run_to_end
    from transformers import AutoTokenizer

    from crowdtrain.publish.export import export_model
    from crowdtrain.run.train import evaluate

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(600)), encoding="utf-8")
    run = init_run(tmp_path / "run", [data], preset="tiny", from_pretrained=qwen,
                   progress=False, train_overrides={"lr": 3e-3, "warmup_steps": 2,
                                                    "total_steps": 40, "batch_size": 8,
                                                    "seq_len": 64},
                   swarm=SwarmConfig(warm_start=0, inner_steps=20, rounds=2,
                                     round_seconds=90, min_contributions=2))
    index = run.index
    assert index.masked and all(e.mask_sha256 for e in index.train + index.val)
    assert all((run.data_dir / mask_name(e.name)).is_file() for e in index.train)
    tok = AutoTokenizer.from_pretrained(str(qwen))
    ids = np.concatenate(load_split(run.data_dir, index, "train"))
    mask = np.concatenate(load_masks(run.data_dir, index, "train"))
    assert len(ids) == len(mask) and 0 < mask.mean() < 0.7
    # every token that carries loss is the assistant's: its answer or its end of turn
    answers = {ANSWER.format(a=i % 17, b=(3 * i) % 11, c=i % 17 + (3 * i) % 11)
               for i in range(600)} | {"You are welcome."}
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    spans = [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    assert len(spans) >= 600
    for span in spans:
        body = span.removesuffix("<|im_end|>\n").removesuffix("<|im_end|>")
        assert body in answers, span  # no user, system or role text carries loss
    unmasked = tok.decode(ids[mask == 0])
    for word in ("tutor", "Thanks!", "plus", "<|im_start|>assistant"):
        assert word in unmasked
    assert "The sum of" not in unmasked.replace("Tell me the sum of", "")

    s, _ = run_to_end(run, tmp_path)
    for name in ("ann", "ben"):  # each fetched the loss masks of its shards, sha256-checked
        cached = {p.name for p in (s.home(name) / "shards").iterdir()}
        assert {f"{e.mask_sha256}.mask" for e in index.train} & cached
    losses = [evaluate(run.load_model(r)[0], run.val_windows(), torch.device("cpu"))
              for r in (0, 2)]
    assert losses[1] < losses[0] - 0.3, losses  # the answers' loss (masked evaluation)
    out = export_model(run, tmp_path / "export", evaluate=False)
    assert (out / "chat_template.jinja").read_text() == CHATML
    exported = AutoTokenizer.from_pretrained(str(out))
    text = exported.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                        add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_parquet_documents_make_the_same_run_as_jsonl(qwen, tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = corpus.read_text(encoding="utf-8")[:80_000]
    docs = [d for d in text.split("\n\n") if d.strip()]
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}),
                   tmp_path / "docs.parquet", row_group_size=50)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs),
                                         encoding="utf-8")
    from crowdtrain.run.data import DataConfig

    runs = [init_run(tmp_path / f"run-{kind}", [tmp_path / f"docs.{kind}"], preset="tiny",
                     from_pretrained=qwen, progress=False, swarm=SwarmConfig(warm_start=0),
                     data_config=DataConfig(text_column="body"))
            for kind in ("parquet", "jsonl")]
    # the same token stream (where each source puts its train/validation cut may differ)
    a, b = (np.concatenate(load_split(r.data_dir, r.index, "train")
                           + load_split(r.data_dir, r.index, "val")) for r in runs)
    assert len(a) > 10_000 and np.array_equal(a, b)
    assert not runs[0].index.masked
    eos = runs[0].index.eot_id
    assert int((a == eos).sum()) > 0.8 * len(docs) * 0.85  # one end of sequence per document
