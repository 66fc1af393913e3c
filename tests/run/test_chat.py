"""Chat data: conversations rendered with the model's own template, with loss on the
assistant's tokens only (run/chat.py, the masks of run/data.py), and the inner loop and
evaluation on masked targets (run/train.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from crowdtrain.errors import CrowdtrainError
from crowdtrain.run.data import (
    DataConfig,
    build_shards,
    eval_windows,
    folder_specials,
    get_batch,
    load_masks,
    load_split,
    load_tokenizer,
    mask_name,
)
from crowdtrain.run.train import InnerLoop, TrainConfig, evaluate, target_loss


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from families import make_family

    base = tmp_path_factory.mktemp("chat-families")
    return {n: make_family(n, base / n) for n in ("qwen2", "llama", "gemma")}


def conversation(i: int) -> tuple[list[dict], list[str]]:
    """A conversation with a system prompt and 1-3 exchanges; its assistant answers."""
    msgs = [{"role": "system", "content": f"You are helper number {i}."}]
    answers = []
    for k in range(1 + i % 3):
        msgs.append({"role": "user", "content": f"Question {k} of chat {i}: what is the swarm?"})
        answers.append(f"Answer {k}: the swarm is {i} volunteers training together.")
        msgs.append({"role": "assistant", "content": answers[-1]})
    return msgs, answers


def write_chats(path, n: int, text_every: int = 0):
    """n conversations, a text document after every `text_every`-th; the assistant answers."""
    lines, answers = [], []
    for i in range(n):
        msgs, ans = conversation(i)
        lines.append(json.dumps({"messages": msgs}))
        answers.append(ans)
        if text_every and i % text_every == 0:
            lines.append(json.dumps({"text": f"A plain document number {i}.\n"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, answers


def build(family_dirs, name, src, out, **cfg):
    d = family_dirs[name]
    tok = load_tokenizer(d, require_eot=False)
    sp = folder_specials(d, tok)
    idx = build_shards([src], tok, out, DataConfig(shard_tokens=1024, **cfg), progress=False,
                       specials=sp)
    ids = np.concatenate(load_split(out, idx, "train") + load_split(out, idx, "val"))
    masks = load_masks(out, idx, "train") + load_masks(out, idx, "val")
    return tok, sp, idx, ids, np.concatenate(masks)


def runs(ids: np.ndarray, mask: np.ndarray, value: int) -> list[list[int]]:
    """The maximal runs of tokens whose mask is `value`."""
    out, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m == value:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def test_chatml_loss_is_on_the_assistants_tokens_only(family_dirs, tmp_path):
    src, answers = write_chats(tmp_path / "chat.jsonl", 120)
    tok, sp, idx, ids, mask = build(family_dirs, "qwen2", src, tmp_path / "data")
    assert idx.masked and idx.bos_id is None
    assert all(e.mask_sha256 for e in idx.train + idx.val)
    # what carries loss, run by run, is exactly each answer and the end of its turn
    trained = [tok.decode(r, skip_special_tokens=False) for r in runs(ids, mask, 1)]
    assert trained == [f"{a}<|im_end|>\n" for conv in answers for a in conv]
    # and nothing of the system, the users or the generation prompts
    untrained = tok.decode(ids[mask == 0].tolist(), skip_special_tokens=False)
    for k in (0, 1, 119):
        msgs, _ = conversation(k)
        for m in msgs:
            if m["role"] != "assistant":
                assert m["content"] in untrained
    assert untrained.count("<|im_start|>assistant\n") == sum(map(len, answers))
    # each conversation is the template's rendering, then eos (not trained)
    eos = np.flatnonzero(ids == sp.eos_id)
    assert len(eos) == 120 and not mask[eos].any()
    first = tok.decode(ids[: eos[0]].tolist(), skip_special_tokens=False)
    assert first.startswith("<|im_start|>system\nYou are helper number 0.<|im_end|>\n")
    assert first.endswith(f"{answers[0][-1]}<|im_end|>\n")


def test_batches_of_chats_carry_no_loss_on_prompts(family_dirs, tmp_path):
    src, _ = write_chats(tmp_path / "chat.jsonl", 120)
    out = tmp_path / "data"
    tok, _, idx, _, _ = build(family_dirs, "qwen2", src, out)
    shards, masks = load_split(out, idx, "train"), load_masks(out, idx, "train")
    x, y = get_batch(shards, 8, 64, seed=0, step=5, masks=masks)
    assert (y == -100).any() and (y != -100).any()
    kept = tok.decode(y[y != -100].tolist(), skip_special_tokens=False)
    assert "Question" not in kept and "helper" not in kept and "Answer" in kept


def test_an_inst_template_with_its_own_bos_and_eos(family_dirs, tmp_path):
    src, answers = write_chats(tmp_path / "chat.jsonl", 60)
    tok, sp, idx, ids, mask = build(family_dirs, "llama", src, tmp_path / "data")
    # the template writes <s> once and </s> after each answer: nothing is added to it
    assert (ids == sp.bos_id).sum() == 60
    assert (ids == sp.eos_id).sum() == sum(map(len, answers))
    trained = [tok.decode(r, skip_special_tokens=False) for r in runs(ids, mask, 1)]
    assert trained == [f" {a}</s>" for conv in answers for a in conv]
    docs = tok.decode(ids.tolist(), skip_special_tokens=False).split("<s>")[1:]
    assert docs[0].startswith("You are helper number 0.\n[INST] Question 0")


def test_text_documents_in_a_chat_corpus_are_trained_whole(family_dirs, tmp_path):
    src, answers = write_chats(tmp_path / "mixed.jsonl", 200, text_every=10)
    tok, sp, idx, ids, mask = build(family_dirs, "qwen2", src, tmp_path / "data")
    assert len(list((tmp_path / "data").glob("*.mask"))) == len(idx.train) + len(idx.val)
    text = tok.encode("A plain document number 10.\n", add_special_tokens=False).ids
    at = next(i for i in range(len(ids)) if ids[i:i + len(text)].tolist() == text)
    assert mask[at: at + len(text) + 1].all()  # its tokens and its eos
    trained = [tok.decode(r, skip_special_tokens=False) for r in runs(ids, mask, 1)]
    assert sum(t.count("<|im_end|>") for t in trained) == sum(map(len, answers))


def test_a_chat_corpus_masks_the_shards_written_before_its_first_chat(family_dirs, tmp_path):
    src = tmp_path / "late.jsonl"
    texts = [json.dumps({"text": f"Plain text {i} about volunteers.\n" * 5}) for i in range(200)]
    msgs, _ = conversation(1)
    src.write_text("\n".join(texts + [json.dumps({"messages": msgs})] * 40) + "\n")
    _, _, idx, ids, mask = build(family_dirs, "qwen2", src, tmp_path / "data")
    assert idx.masked and len(idx.train) > 3
    first = load_masks(tmp_path / "data", idx, "train")[0]
    assert first.all() and (tmp_path / "data" / mask_name(idx.train[0].name)).is_file()
    assert not mask.all()


def test_chats_need_a_chat_template(family_dirs, tmp_path):
    src, _ = write_chats(tmp_path / "chat.jsonl", 5)
    with pytest.raises(CrowdtrainError, match=r"chat.jsonl:1: chat `messages` need the "
                                              r"model's chat template; this tokenizer has none"):
        build(family_dirs, "gemma", src, tmp_path / "data")


def test_a_template_that_rewrites_earlier_turns_cannot_be_split(family_dirs, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (d / f).write_bytes((family_dirs["qwen2"] / f).read_bytes())
    # the last message is written differently from the others
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n"
        "{% endfor %}")
    src, _ = write_chats(tmp_path / "chat.jsonl", 3)
    family_dirs = {**family_dirs, "custom": d}
    with pytest.raises(CrowdtrainError, match=r"chat.jsonl:1: the chat template cannot be split "
                                              "into turns"):
        build(family_dirs, "custom", src, tmp_path / "data")
    (d / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(CrowdtrainError, match=r"chat.jsonl:1: the chat template fails on this "
                                              r"conversation .*roles must alternate"):
        build(family_dirs, "custom", src, tmp_path / "data")


def test_masked_evaluation_counts_only_the_kept_targets(family_dirs, tmp_path):
    from crowdtrain.run.model import build_model, preset_config

    src, _ = write_chats(tmp_path / "chat.jsonl", 120)
    out = tmp_path / "data"
    tok, sp, idx, _, _ = build(family_dirs, "qwen2", src, out)
    model = build_model(preset_config("tiny", tok.get_vocab_size(), sp.eos_id), seed=0)
    val, masks = load_split(out, idx, "val"), load_masks(out, idx, "val")
    pairs = list(eval_windows(val, 32, 4096, masks=masks))
    got = evaluate(model, pairs, torch.device("cpu"), batch_size=5)
    with torch.no_grad():  # by hand: summed CE over the kept targets / their number
        total, n = 0.0, 0
        for x, y in pairs:
            logits = model(input_ids=x[None]).logits[0].float()
            keep = y != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], y[keep],
                                                             reduction="sum"))
            n += int(keep.sum())
    assert got == pytest.approx(total / n, rel=1e-5)
    plain = evaluate(model, eval_windows(val, 32, 4096), torch.device("cpu"))
    assert plain != pytest.approx(got, rel=1e-3)  # the masked targets did change the figure
    with pytest.raises(CrowdtrainError, match="no validation target carries loss"):
        evaluate(model, [(x, torch.full_like(y, -100)) for x, y in pairs[:2]],
                 torch.device("cpu"))


def test_an_all_masked_micro_batch_gives_a_finite_zero_loss(family_dirs, tmp_path):
    from crowdtrain.run.model import build_model, preset_config

    torch.manual_seed(0)
    logits = torch.randn(12, 50, requires_grad=True)
    none = torch.full((12,), -100)
    loss = target_loss(logits, none)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad and not logits.grad.any()
    y = torch.randint(0, 50, (12,))
    y[::2] = -100
    assert torch.equal(target_loss(logits, y), torch.nn.functional.cross_entropy(
        logits[y != -100], y[y != -100]))
    # a step whose first micro-batch (of 2 rows) is all prompt: finite, and the model moves
    model = build_model(preset_config("tiny", 128, 0), seed=0)
    cfg = TrainConfig(batch_size=4, seq_len=16, warmup_steps=0, total_steps=10)
    x = torch.randint(0, 128, (4, 16))
    y = torch.randint(0, 128, (4, 16))
    y[:2] = -100
    loop = InnerLoop(model, cfg, torch.device("cpu"), micro_batch=2)
    before = [p.detach().clone() for p in model.parameters()]
    stats = loop.run(lambda step: (x, y), 0, 2)
    assert math.isfinite(stats.mean_loss) and stats.mean_loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    y[:] = -100  # nothing to learn at all: a zero loss, no NaN, no divergence error
    stats = loop.run(lambda step: (x, y), 2, 1)
    assert stats.mean_loss == 0.0
