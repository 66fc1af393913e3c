"""`crowdtrain verify MODEL_DIR RUN_DIR`: replay a swarm run and check the published weights.

Hash comparison alone is not verification, so this recomputes everything it checks:
1. the chain's genesis: the checkpoint the chain starts from (round 0 normally) is read from
   RUN_DIR and its sha256 must be the one the ledger (and the model's provenance) recorded;
2. for every round r up to the exported checkpoint, in order:
   - link_r is recomputed from link_{r-1} and the ledger's rows (the update's sha256, the
     sha256s of the contributions aggregated, the resulting checkpoint's sha256) and must equal
     the link the ledger stored when the round closed and the one in the model's provenance;
   - `updates/update-r` must hash to the ledger's update sha256 (and the contribution files
     still on disk to theirs);
   - the update is dequantised and applied with `outer.apply_update`, the very function the
     coordinator and every worker use (bit-exact), and the resulting parameters, serialised as a
     checkpoint, must hash to the checkpoint sha256 in the chain;
3. the model's `model.safetensors` must equal the replayed parameters exactly (`torch.equal`,
   tensor by tensor), and the provenance's chain head must be the replay's.
The first failure stops the replay and is named (round, link, what differed).

Runs trained on one machine (`crowdtrain train`) record no updates: there is nothing to replay,
and verify says so.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from crowdtrain.errors import CorruptDataError, CrowdtrainError
from crowdtrain.publish.provenance import Provenance, RoundRecord, read_provenance
from crowdtrain.run.checkpoint import decode_tensors, tensor_path
from crowdtrain.run.folder import Run
from crowdtrain.run.ledger import Ledger, chain_genesis, chain_link
from crowdtrain.wire import codecs
from crowdtrain.wire.outer import apply_update


@dataclass
class VerifyReport:
    ok: bool = False
    lines: list[str] = field(default_factory=list)  # what was checked, in order
    failure: str | None = None  # the first bad link, in words
    rounds: int = 0  # rounds replayed

    def fail(self, what: str) -> VerifyReport:
        self.ok, self.failure = False, what
        return self


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the parameters serialised exactly as `checkpoint.save_checkpoint` writes them."""
    return sha256(st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}))


def _first_difference(replay: dict[str, torch.Tensor], published: dict[str, torch.Tensor]
                      ) -> str | None:
    missing = sorted(set(replay) - set(published))
    extra = sorted(set(published) - set(replay))
    if missing or extra:
        return f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}"
    for k in sorted(replay):
        a, b = replay[k], published[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"tensor {k} is {b.dtype}{list(b.shape)}, the replay gives " \
                   f"{a.dtype}{list(a.shape)}"
        if not torch.equal(a, b):
            bad = (a != b) | (a.isnan() != b.isnan())
            diff = float((a.double() - b.double()).abs().nan_to_num(float("inf")).max())
            return (f"tensor {k} differs in {int(bad.sum()):,} of {a.numel():,} elements "
                    f"(max |difference| {diff:.3g})")
    return None


def verify_model(model_dir: str | os.PathLike, run_dir: str | os.PathLike,
                 on_line: Callable[[str], None] | None = None) -> VerifyReport:
    """Replay the run in `run_dir` up to the checkpoint exported in `model_dir` and check that
    the exported weights are exactly the replay's. Unusable inputs raise CrowdtrainError; a
    failed check returns a report with `ok` False and `failure` naming the first bad link."""
    model_dir, rep = Path(model_dir), VerifyReport()

    def say(line: str) -> None:
        rep.lines.append(line)
        if on_line is not None:
            on_line(line)

    prov = read_provenance(model_dir)
    weights = model_dir / "model.safetensors"
    if not weights.is_file() and (model_dir / "model.safetensors.index.json").is_file():
        weights = model_dir / "model.safetensors.index.json"  # a sharded export
    if prov.format_exported == "gguf" or not weights.is_file():
        raise CrowdtrainError(f"{model_dir} has no model.safetensors: verify checks a Hugging "
                              "Face export (a GGUF file is a lossy conversion of one)")
    if prov.run.trained_by != "swarm" or not prov.chain:
        raise CrowdtrainError(f"{model_dir} was trained on one machine (`crowdtrain train`): "
                              "only swarm runs record the updates that verify replays")
    source = prov.model.checkpoint_source
    if source not in (None, "swarm"):
        raise CrowdtrainError(f"{model_dir} is checkpoint {prov.model.checkpoint_round}"
                              f", made by `crowdtrain {'train' if source == 'local' else source}`"
                              " rather than by a swarm round: there is no update to replay for "
                              "it; export a checkpoint the swarm produced (--round)")
    run = Run(run_dir)
    if not run.ledger_path.is_file():
        raise CrowdtrainError(f"{run.dir} has no {run.ledger_path.name}: it never served a swarm "
                              "run, so it cannot be the run this model came from")
    target = int(prov.model.checkpoint_round)
    ledger = Ledger(run.ledger_path)
    try:
        return _replay(run, ledger, prov, weights, target, rep, say)
    finally:
        ledger.close()


class _Broken(Exception):
    """A check of the replay failed: its words are the report's failure (the first bad
    link)."""


def _replay(run: Run, ledger: Ledger, prov: Provenance, weights: Path, target: int,
            rep: VerifyReport, say: Callable[[str], None]) -> VerifyReport:
    """From the chain's start to checkpoint `target`: the genesis, every round in order, the
    chain's head, then the published weights. The first check that fails ends it."""
    try:
        r0, base_sha, theta = _genesis(run, ledger, prov)
        say(f"ok  genesis: checkpoint {r0} sha256 {base_sha[:12]}... matches the chain's start")
        if target < r0:
            raise _Broken(f"the model is checkpoint {target}, before the chain's start ({r0})")
        shapes = {k: tuple(v.shape) for k, v in theta.items()}
        rows = {r["round"]: r for r in ledger.rounds()}
        published = {r.round: r for r in prov.rounds}
        link = chain_genesis(base_sha)
        for rnd in range(r0, target):
            link, theta = _replay_round(run, ledger, rnd, rows.get(rnd), published.get(rnd),
                                        link, theta, shapes, say)
            rep.rounds += 1
        if target > r0:
            _check_head(prov, link)
    except _Broken as e:
        return rep.fail(str(e))
    return _check_published(run, theta, weights, target, rep, say)


def _genesis(run: Run, ledger: Ledger, prov: Provenance
             ) -> tuple[int, str, dict[str, torch.Tensor]]:
    """Where the chain starts: the checkpoint the ledger names, which must be the one the
    model's provenance names and must hash, on disk, to the sha256 the chain starts from.
    Returns (its round, its sha256, its parameters)."""
    genesis = ledger.chain_genesis()
    if genesis is None:
        raise _Broken("the run's ledger records no chain (no round was closed by a "
                      "coordinator that records provenance)")
    r0, base_sha = int(genesis["round"]), genesis["checkpoint_sha256"]
    pub = prov.chain.genesis
    if pub is None or pub.checkpoint_sha256 != base_sha or pub.round != r0:
        at, sha = (pub.round, pub.checkpoint_sha256) if pub else (None, None)
        raise _Broken(f"genesis: the model's provenance starts its chain at checkpoint {at} "
                      f"({str(sha)[:12]}...), this run's ledger at checkpoint {r0} "
                      f"({base_sha[:12]}...): not this run")
    p = tensor_path(run.ckpt_dir, r0)
    if not p.is_file():
        raise _Broken(f"genesis: checkpoint {r0}, where the chain starts, is missing from "
                      f"{run.ckpt_dir}; nothing to replay from")
    blob = p.read_bytes()
    if sha256(blob) != base_sha:
        raise _Broken(f"genesis (link before round {r0}): checkpoint {r0} on disk has sha256 "
                      f"{sha256(blob)[:12]}..., the chain starts from {base_sha[:12]}...: "
                      "the initial weights were altered")
    return r0, base_sha, decode_tensors(blob, f"checkpoint {p.name}")


def _replay_round(run: Run, ledger: Ledger, rnd: int, row: sqlite3.Row | None,
                  pub_row: RoundRecord | None, prev: str, theta: dict[str, torch.Tensor],
                  shapes: dict[str, tuple[int, ...]], say: Callable[[str], None]
                  ) -> tuple[str, dict[str, torch.Tensor]]:
    """Round `rnd` (ledger row `row`, provenance row `pub_row`) after link `prev`: its link,
    its contribution files, its update, and the checkpoint the update gives applied to
    `theta`. Returns (the round's link, the parameters after it)."""
    try:
        link, contributions = _round_link(ledger, rnd, row, prev)
        recorded = pub_row.chain_link if pub_row is not None else None
        if recorded != link:
            raise _Broken(f"the model's provenance records link {str(recorded)[:12]}..., the "
                          f"ledger {link[:12]}...")
        _check_contribution_files(run, ledger, rnd)
        theta = apply_update(theta, _round_update(run, rnd, row, shapes))
        got = checkpoint_sha256(theta)
        if got != row["checkpoint_sha256"]:
            raise _Broken(f"replaying update {rnd} gives checkpoint {rnd + 1} with sha256 "
                          f"{got[:12]}..., the chain records {row['checkpoint_sha256'][:12]}...")
    except _Broken as e:
        raise _Broken(f"round {rnd} (link {rnd}): {e}") from None
    say(f"ok  round {rnd}: update {row['update_sha256'][:12]}... and {contributions} "
        f"contribution(s) chain to link {link[:12]}...; replay gives checkpoint {rnd + 1} "
        f"{got[:12]}...")
    return link, theta


def _round_link(ledger: Ledger, rnd: int, row: sqlite3.Row | None, prev: str
                ) -> tuple[str, int]:
    """The link of closed round `rnd`, recomputed from `prev` and the ledger's rows (the
    update's sha256, the contributions aggregated, the checkpoint's sha256): it must be the one
    the ledger stored when the round closed. Returns (the link, how many contributions)."""
    if row is None or row["state"] != "closed":
        raise _Broken(f"the ledger has no closed round {rnd}")
    if not row["chain_link"]:
        raise _Broken(f"the ledger has no chain link for round {rnd} (closed by a crowdtrain "
                      "that did not record provenance, or by crash recovery with no later "
                      "round to complete it)")
    contributions = ledger.aggregated_sha256s(rnd)
    link = chain_link(prev, row["update_sha256"] or "", contributions,
                      row["checkpoint_sha256"] or "")
    if link != row["chain_link"]:
        raise _Broken(f"the ledger's rows do not hash to its stored link "
                      f"({row['chain_link'][:12]}... recorded, {link[:12]}... recomputed): the "
                      "round's update hash, contribution rows or checkpoint hash were altered "
                      "after it closed")
    return link, len(contributions)


def _check_contribution_files(run: Run, ledger: Ledger, rnd: int) -> None:
    """The contribution files of round `rnd` still on disk hash to their ledger rows."""
    for c in ledger.aggregated_files(rnd):
        path = run.dir / c["path"]
        if path.is_file() and sha256(path.read_bytes()) != c["sha256"]:
            raise _Broken(f"contribution file {c['path']} does not hash to its ledger row")


def _round_update(run: Run, rnd: int, row: sqlite3.Row, shapes: dict[str, tuple[int, ...]]
                  ) -> dict[str, torch.Tensor]:
    """The update round `rnd` published, read from the run: it must hash to the sha256 in the
    chain. Returns it dequantised."""
    up = run.update_path(rnd)
    if not up.is_file():
        raise _Broken(f"the update file {up.name} is missing from {up.parent}; the replay "
                      "needs every update")
    blob = up.read_bytes()
    if sha256(blob) != row["update_sha256"]:
        raise _Broken(f"{up.name} has sha256 {sha256(blob)[:12]}..., the chain records "
                      f"{row['update_sha256'][:12]}...: the update was altered")
    try:
        update, _ = codecs.from_bytes(blob, shapes)
    except codecs.CodecError as e:
        raise _Broken(f"{up.name} is not a valid update ({e})") from None
    return update


def _check_head(prov: Provenance, replayed: str) -> None:
    """The model's provenance names as the chain's head the link the replay ends at."""
    head = prov.chain.head
    if head != replayed:
        raise _Broken(f"chain head: the model's provenance names head {str(head)[:12]}..., "
                      f"the replay ends at {replayed[:12]}...")


def _check_published(run: Run, theta: dict[str, torch.Tensor], weights: Path, target: int,
                     rep: VerifyReport, say: Callable[[str], None]) -> VerifyReport:
    """The published weights are exactly the replay's (a LoRA run: `_check_lora`)."""
    pub_weights = _read_weights(weights)
    if getattr(run.config, "lora", None) is not None:
        return _check_lora(run, theta, weights.parent, pub_weights, target, rep, say)
    dtype = _published_dtype(run)
    theta = {k: v.to(dtype) for k, v in theta.items()}  # fp32 -> bf16 rounds one way only
    diff = _first_difference(theta, pub_weights)
    if diff:
        return rep.fail(f"published weights (checkpoint {target}, after link {target - 1}): "
                        f"not what the replay gives: {diff}")
    say(f"ok  published weights: all {len(theta)} tensors of model.safetensors equal the "
        f"replay of {rep.rounds} round(s) exactly")
    rep.ok = True
    return rep


def _published_dtype(run: Run) -> torch.dtype:
    """The dtype the export wrote the weights in: a fine-tuned model's source dtype."""
    from crowdtrain.run.model import DTYPES

    source = getattr(run.config, "source", None)
    return DTYPES[source.dtype] if source is not None else torch.float32


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of every shard a `*.index.json` names."""
    if path.name.endswith(".index.json"):
        import json

        try:
            files = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptDataError(f"{path} is not a weights index ({e})") from None
        out: dict[str, torch.Tensor] = {}
        for name in files:
            out.update(_read_weights(path.parent / Path(name).name))
        return out
    if not path.is_file():
        raise CrowdtrainError(f"{path} is missing")
    try:
        return st_load(path.read_bytes())
    except Exception as e:  # safetensors raises several types on a bad file
        raise CorruptDataError(f"{path} is not valid safetensors ({e})") from None


def _check_lora(run: Run, theta: dict[str, torch.Tensor], model_dir: Path,
                merged_pub: dict[str, torch.Tensor], target: int, rep: VerifyReport,
                say: Callable[[str], None]) -> VerifyReport:
    """A LoRA run's chain carries the adapters only: the published adapter (peft's format)
    must equal the replayed adapters exactly, and the merged model.safetensors must be the
    frozen base (sha256-checked against run.json) with those adapters folded in."""
    from crowdtrain.run.lora import ADAPTER_DIR, merge
    from crowdtrain.run.model import load_into, state_dict_for_save

    where = f"published adapter (checkpoint {target}, after link {target - 1})"
    adapter = _read_weights(model_dir / ADAPTER_DIR / "adapter_model.safetensors")
    # peft saves the adapter's tensors without the adapter's name (".default")
    named = {k.replace(".default.", "."): v for k, v in theta.items()}
    diff = _first_difference(named, adapter)
    if diff:
        return rep.fail(f"{where}: not what the replay gives: {diff}")
    say(f"ok  published adapter: all {len(theta)} LoRA tensors equal the replay of "
        f"{rep.rounds} round(s) exactly")
    try:
        model = run.build_model()  # the frozen base, checked against its sha256 in run.json
    except CrowdtrainError as e:
        return rep.fail(f"base weights: {e}")
    load_into(model, theta)
    dtype = _published_dtype(run)
    expected = {k: v.to(dtype) for k, v in state_dict_for_save(merge(model)).items()}
    diff = _first_difference(expected, merged_pub)
    if diff is None:
        say("ok  published weights: model.safetensors is exactly the base with the replayed "
            "adapters merged")
    else:
        # the merge is a matmul (W + scale * B @ A): another machine may round differently
        # (in bf16 or fp16 a rounding may land on the neighbouring value)
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else \
            {"rtol": 1e-2, "atol": 1e-5}
        close = set(expected) == set(merged_pub) and all(
            expected[k].shape == merged_pub[k].shape
            and torch.allclose(expected[k].float(), merged_pub[k].float(), **tol)
            for k in expected)
        if not close:
            return rep.fail(f"published weights (checkpoint {target}): not the base with the "
                            f"replayed adapters merged: {diff}")
        say("ok  published weights: model.safetensors equals the base with the replayed "
            "adapters merged, to float rounding (the merge is a matrix product)")
    rep.ok = True
    return rep

