"""The `crowdtrain` command: argument parsing and one-line errors; the work lives in modules.

Every subcommand has `--help`. A CrowdtrainError (bad input, broken run) or an OS error (missing
file, full disk) prints `error: ...` on one line and exits 2; Ctrl-C exits 130; anything else is
a bug and prints a one-line summary (the traceback with --debug).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from crowdtrain import __version__
from crowdtrain.errors import CrowdtrainError

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(fn: Callable[[argparse.Namespace], int | None]):
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


# --------------------------------------------------------------------------- commands


@command
def cmd_init(a: argparse.Namespace) -> None:
    from crowdtrain.data import default_corpus
    from crowdtrain.lora import LoraSettings
    from crowdtrain.rundir import SwarmConfig, init_run

    swarm = SwarmConfig(**{k: v for k, v in (
        ("rounds", a.rounds), ("inner_steps", a.inner_steps),
        ("inner_steps_growth", a.inner_steps_growth), ("round_seconds", a.round_seconds),
        ("min_contributions", a.min_contributions), ("outer_lr", a.outer_lr),
        ("outer_momentum", a.outer_momentum), ("access", a.access),
        ("warm_start", a.warm_start), ("codec", a.codec)) if v is not None})
    steps = a.steps if a.steps is not None else (
        swarm.total_steps() if a.rounds or a.inner_steps else None)
    overrides = {k: v for k, v in (("total_steps", steps), ("batch_size", a.batch_size),
                                   ("seq_len", a.seq_len), ("lr", a.lr)) if v is not None}
    lora = None
    opts = {k: v for k, v in (("rank", a.lora_rank), ("alpha", a.lora_alpha),
                              ("dropout", a.lora_dropout)) if v is not None}
    if a.lora_targets is not None:
        opts["targets"] = LoraSettings.parse_targets(a.lora_targets)
    if a.lora or opts:
        lora = LoraSettings(**opts)
    run = init_run(a.run_dir, a.data or [default_corpus()], preset=a.preset,
                   vocab_size=a.vocab_size, tokenizer=a.tokenizer, seed=a.seed, force=a.force,
                   progress=not a.quiet, train_overrides=overrides, swarm=swarm,
                   from_pretrained=a.from_pretrained, lora=lora)
    idx = run.index
    what = (f"from {run.config.base_model}" if run.config.base_model else
            f"preset {run.config.preset}")
    print(f"created run {run.dir}: {what}, vocab {idx.vocab_size}, "
          f"{idx.train_tokens:,} train + {idx.val_tokens:,} val tokens in "
          f"{len(idx.train) + len(idx.val)} shards")
    if lora is not None:
        from crowdtrain.checkpoint import load_checkpoint
        from crowdtrain.compress import payload_bytes

        ck = load_checkpoint(run.ckpt_dir, 0)
        n, codec = sum(t.numel() for t in ck.tensors.values()), run.config.swarm.codec
        print(f"LoRA r={lora.rank} alpha={lora.alpha:g} on {','.join(lora.targets)}: "
              f"{n:,} adapter parameters travel (~{payload_bytes(n, codec):,} bytes per {codec} "
              f"upload) instead of {ck.meta['params']:,} "
              f"(~{payload_bytes(ck.meta['params'], codec):,} bytes)")
    print(f"next: crowdtrain serve {run.dir}   (host it)   or   crowdtrain train {run.dir}   "
          "(one machine)")


@command
def cmd_train(a: argparse.Namespace) -> None:
    from crowdtrain.local import set_threads, train_local
    from crowdtrain.rundir import Run

    set_threads(a.threads)
    run = Run(a.run_dir)
    r = train_local(run, steps=a.steps, minutes=a.minutes, device=a.device,
                    eval_every=a.eval_every, progress=not a.quiet)
    print(f"{'stopped early' if r.interrupted else 'done'}: {r.steps} steps, {r.tokens:,} tokens "
          f"in {r.seconds:.0f}s ({r.tokens_per_s:,.0f} tok/s); train loss {r.train_loss:.3f}, "
          f"held-out loss {r.val_loss:.3f} (unigram baseline {r.unigram_loss:.3f}, "
          f"{1 - r.val_loss / r.unigram_loss:.0%} below)")
    print(f"saved checkpoint round {r.round}; next: crowdtrain export {run.dir} OUT_DIR")


@command
def cmd_export(a: argparse.Namespace) -> None:
    import json

    from crowdtrain.export import export_model

    out = export_model(a.run_dir, a.out_dir, rnd=a.round, force=a.force, fmt=a.format,
                       quant=a.quant, eval_data=a.eval_data, evaluate=not a.no_eval)
    prov = json.loads((out / "provenance.json").read_text())
    ev = prov.get("evaluation")
    if ev and ev.get("bits_per_byte") is not None:
        print(f"held-out: loss {ev['loss']:.4f} nats/token, perplexity {ev['perplexity']:.2f}, "
              f"{ev['bits_per_byte']:.4f} bits/byte ({ev['bytes']:,} bytes of {ev['data']})")
    if a.format == "gguf":
        g = prov["gguf"]
        gev = g.get("evaluation")
        bpb = f", {gev['bits_per_byte']:.4f} bits/byte" if gev else ""
        print(f"wrote {out / g['file']}: {g['quant']}, {g['bytes']:,} bytes (float32 weights "
              f"{g['original_fp32_bytes']:,}){bpb}")
        print(f"try: llama-cli -m {out / g['file']} -p \"ROMEO:\"")
    else:
        chain = prov.get("chain") or {}
        if chain.get("head"):
            print(f"provenance chain head {chain['head'][:16]}...; check it with: "
                  f"crowdtrain verify {out} {a.run_dir}")
        print(f"exported to {out}; try: crowdtrain generate {out} \"ROMEO:\"")


@command
def cmd_verify(a: argparse.Namespace) -> int:
    from crowdtrain.verify import verify_model

    rep = verify_model(a.model_dir, a.run_dir, on_line=None if a.quiet else print)
    if rep.ok:
        print(f"verified: {a.model_dir} is exactly the replay of {rep.rounds} round(s) of "
              f"{a.run_dir}")
        return 0
    print(f"FAILED: {rep.failure}")
    return 1


@command
def cmd_eval(a: argparse.Namespace) -> None:
    import json

    from crowdtrain.evaluate import evaluate_model

    if a.max_bytes is not None and a.max_bytes < 1:
        raise CrowdtrainError("--max-bytes must be at least 1")
    r = evaluate_model(a.model, a.data, max_bytes=a.max_bytes)
    if a.json:
        print(json.dumps(r.to_dict(), indent=1))
        return
    print(f"{a.model}: {r.tokens:,} tokens, {r.bytes:,} bytes; loss {r.loss:.4f} nats/token, "
          f"perplexity {r.perplexity:.2f}, {r.bits_per_byte:.4f} bits per byte")


@command
def cmd_distill(a: argparse.Namespace) -> None:
    from crowdtrain.distill import DistillConfig, distill
    from crowdtrain.local import set_threads

    set_threads(a.threads)
    cfg = DistillConfig(preset=a.preset, steps=a.steps, alpha=0.0 if a.no_teacher else a.alpha,
                        temperature=a.temperature, lr=a.lr, batch_size=a.batch_size,
                        seq_len=a.seq_len, seed=a.seed)
    def on_step(step: int, loss: float) -> None:
        if not a.quiet and (step + 1) % max(a.steps // 10, 1) == 0:
            print(f"step {step + 1}/{a.steps}: loss {loss:.4f}", flush=True)

    r = distill(a.teacher_dir, a.data, cfg, out_dir=a.out, device=a.device, force=a.force,
                on_step=on_step)
    print(f"trained {r.steps} steps ({r.tokens:,} tokens) in {r.seconds:.0f}s")
    print(f"teacher: {r.teacher_params:,} parameters, {r.teacher_bytes:,} bytes, "
          f"{r.teacher.bits_per_byte:.4f} bits/byte held-out")
    print(f"student: {r.student_params:,} parameters, {r.student_bytes:,} bytes, "
          f"{r.student.bits_per_byte:.4f} bits/byte held-out "
          f"({r.student_bytes / r.teacher_bytes:.1%} of the teacher's size)")
    print(f"exported to {r.out_dir}; try: crowdtrain generate {r.out_dir} \"ROMEO:\"")


@command
def cmd_generate(a: argparse.Namespace) -> None:
    from crowdtrain.generate import generate_text

    print(generate_text(a.model_dir, a.prompt, max_new_tokens=a.max_tokens,
                        temperature=a.temperature, top_k=a.top_k, seed=a.seed))


@command
def cmd_serve(a: argparse.Namespace) -> None:
    import torch

    from crowdtrain import owner
    from crowdtrain.coordinator import Coordinator
    from crowdtrain.rundir import Run
    from crowdtrain.server import serve

    torch.set_num_threads(a.threads)
    if bool(a.tls_cert) != bool(a.tls_key):
        raise CrowdtrainError("--tls-cert and --tls-key go together")
    coord = Coordinator(Run(a.run_dir))
    token = owner.new_admin_token(coord.ledger, rotate=a.new_admin_token)
    if token:
        print(f"admin token (shown once, stored only as a hash; keep it to manage the run "
              f"with `crowdtrain admin URL --token ...`): {token}", flush=True)
    scheme = "https" if a.tls_cert else "http"
    print(f"serving run {coord.run.config.name} (round {coord.round}) at "
          f"{scheme}://{a.host}:{a.port}  status: {protocol_path('STATUS')}  docs: /docs",
          flush=True)
    serve(coord, a.host, a.port, ssl_certfile=a.tls_cert, ssl_keyfile=a.tls_key)


def protocol_path(name: str) -> str:
    from crowdtrain import protocol

    return getattr(protocol, name)


@command
def cmd_join(a: argparse.Namespace) -> int:
    from crowdtrain.worker import WorkerConfig, run_worker

    cfg = WorkerConfig(url=a.url, name=a.name, invite=a.invite, device=a.device,
                       threads=a.threads, anonymous=a.anonymous,
                       max_rounds=a.max_rounds, max_hours=a.max_hours, max_memory=a.max_memory,
                       error_feedback=not a.no_error_feedback, progress=not a.quiet,
                       nproc=a.nproc, compile=a.compile)
    s = run_worker(cfg)
    if s.reason.startswith("rank "):  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"{s.reason or 'stopped'}: {s.rounds} rounds, {s.accepted} accepted, {s.refused} "
          f"refused, {s.tokens:,} tokens trained, sent {s.bytes_sent / 1e6:.1f} MB, received "
          f"{s.bytes_received / 1e6:.1f} MB")
    return 0


@command
def cmd_invite(a: argparse.Namespace) -> None:
    from crowdtrain.ledger import Ledger
    from crowdtrain.rundir import Run

    run = Run(a.run_dir)
    if a.uses < 1:
        raise CrowdtrainError("--uses must be at least 1")
    key = Ledger(run.dir / "ledger.sqlite").add_invite(a.uses)
    note = "" if run.config.swarm.access == "invite" else (
        " (note: this run is open to anyone; invite keys matter for runs made with "
        "`crowdtrain init --access invite`)")
    print(f"invite key for {a.uses} volunteer(s): {key}{note}")
    print(f"they join with: crowdtrain join URL --invite {key}")


@command
def cmd_admin(a: argparse.Namespace) -> None:
    from crowdtrain.admin import run_admin

    print(run_admin(a.target, a.action, a.who, token=a.token))


@command
def cmd_demo(a: argparse.Namespace) -> None:
    from crowdtrain.demo import run_demo

    r = run_demo(a.out, workers=a.workers, rounds=a.rounds, inner_steps=a.inner_steps,
                 preset=a.preset)
    st = r.status
    first, last = st.initial_val_loss, st.rounds[-1].val_loss
    print(f"\ndone in {r.seconds:.0f}s: {len(st.volunteers)} volunteers, "
          f"{sum(v.tokens for v in st.volunteers):,} tokens; held-out loss "
          f"{first or float('nan'):.3f} -> {last or float('nan'):.3f}; "
          f"{st.payload_bytes / st.params:.2f} bytes/parameter per upload")
    print(f"model exported to {r.model_dir}\n\n--- sample ---\n{r.sample}\n--------------")
    print(f"try: crowdtrain generate {r.model_dir} \"ROMEO:\"")


@command
def cmd_status(a: argparse.Namespace) -> None:
    from rich.console import Console

    from crowdtrain.statusview import fetch_status, render_status

    st = fetch_status(a.url)
    if a.json:
        print(st.model_dump_json(indent=1))
    else:
        Console().print(render_status(st))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crowdtrain",
        description="Train open language models together on volunteer hardware.",
        epilog="Start with `crowdtrain init RUN_DIR` then `crowdtrain train RUN_DIR`; "
               "`crowdtrain COMMAND --help` explains each command.",
    )
    p.add_argument("--version", action="version", version=f"crowdtrain {__version__}")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"], help="logging verbosity")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("init", help="create a run: tokenizer, shards, model, initial checkpoint",
                       description="Create a run directory from a corpus: train a byte-level BPE "
                       "tokenizer, write token shards (train + held-out validation), and the "
                       "initial model checkpoint.")
    s.add_argument("run_dir", metavar="RUN_DIR", help="folder to create")
    s.add_argument("--data", nargs="+", metavar="FILE",
                   help="text (.txt, .md) or .jsonl ('text' field) files; default: the bundled "
                        "Tiny Shakespeare corpus")
    s.add_argument("--preset", default="small", help="model size: tiny, small (default), base")
    s.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default: the preset's)")
    s.add_argument("--tokenizer", metavar="PATH",
                   help="use this tokenizer.json (or folder) instead of training one")
    s.add_argument("--steps", type=int, help="total inner steps of the schedule")
    s.add_argument("--batch-size", type=int, help="sequences per step")
    s.add_argument("--seq-len", type=int, help="tokens per sequence")
    s.add_argument("--lr", type=float, help="peak AdamW learning rate")
    s.add_argument("--rounds", type=int,
                   help="DiLoCo rounds when served (default 10; 0: until stopped)")
    s.add_argument("--inner-steps", type=int, help="H: inner steps per round (default 50)")
    s.add_argument("--inner-steps-growth", type=float, metavar="RATIO",
                   help="grow H over the run: last round's H / first round's, at the same "
                        "total steps (default 1: fixed H)")
    s.add_argument("--round-seconds", type=float,
                   help="time budget and deadline of a round (default 120)")
    s.add_argument("--min-contributions", type=int,
                   help="contributions a round needs before it closes (default 1)")
    s.add_argument("--outer-lr", type=float, help="outer SGD learning rate (default 0.7)")
    s.add_argument("--outer-momentum", type=float,
                   help="outer Nesterov momentum (default 0.9; 0 for plain averaging)")
    s.add_argument("--codec", choices=["int8", "int4", "fp16", "fp32"],
                   help="how volunteers' contributions travel: int8 (default, ~1 byte per "
                        "parameter), int4 (~0.56 bytes: half the upload, same quality in "
                        "BENCHMARKS.md; needs workers of crowdtrain API v2), fp16 or fp32")
    s.add_argument("--warm-start", type=float, metavar="FRACTION",
                   help="this share of the run's steps (at most 1,000) is trained here, on 4x "
                        "the batch, before anyone joins (default 0.2; 0 to skip): the swarm "
                        "then keeps data parallelism's quality at large H (BENCHMARKS.md)")
    s.add_argument("--access", choices=["open", "invite"],
                   help="open: anyone may join (default); invite: joining needs a key from "
                        "`crowdtrain invite`")
    s.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batches")
    s.add_argument("--force", action="store_true", help="replace an existing run in RUN_DIR")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    f = s.add_argument_group("fine-tuning a pretrained model")
    f.add_argument("--from-pretrained", metavar="DIR",
                   help="start from this local Hugging Face Llama folder (config.json, weights, "
                        "tokenizer.json): its tokenizer, config and weights; --preset then only "
                        "picks the training defaults")
    f.add_argument("--lora", action="store_true",
                   help="train LoRA adapters (peft) on the frozen model: only adapter deltas "
                        "travel (implied by the --lora-* options)")
    f.add_argument("--lora-rank", type=int, help="adapter rank r (default 8)")
    f.add_argument("--lora-alpha", type=float, help="adapter scale alpha; scaling alpha/r "
                                                    "(default 16)")
    f.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0)")
    f.add_argument("--lora-targets", metavar="NAMES",
                   help="comma-separated layers to adapt, from q_proj,k_proj,v_proj,o_proj,"
                        "gate_proj,up_proj,down_proj, or 'all' (default q_proj,v_proj)")

    s = sub.add_parser("train", help="train a run on this machine (the one-machine baseline)",
                       description="Train the run on this machine from its latest checkpoint "
                       "and save the next checkpoint. Ctrl-C stops after the current step and "
                       "still saves.")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--steps", type=int, help="inner steps (default: the rest of the schedule)")
    s.add_argument("--minutes", type=float, help="stop after this much wall time")
    s.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    s.add_argument("--eval-every", type=int, default=100, help="steps between held-out evals")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("export", help="write a checkpoint as a model folder (Hugging Face or "
                       "GGUF) with model card and provenance",
                       description="Write a run's checkpoint as a Hugging Face folder (config, "
                       "safetensors weights, tokenizer, generation config) or a GGUF file, with "
                       "provenance.json (data and shard hashes, contributors and their share of "
                       "tokens, rounds and their hash chain, hyperparameters, held-out loss "
                       "curve, refused contributions by reason, total compute) and a README.md "
                       "model card (Hugging Face metadata header) that includes the held-out "
                       "loss, perplexity and bits per byte.")
    s.add_argument("run_dir", metavar="RUN_DIR",
                   help="the run (or, with --format gguf, an exported model folder)")
    s.add_argument("out_dir", metavar="OUT_DIR")
    s.add_argument("--round", type=int, help="checkpoint round to export (default: latest)")
    s.add_argument("--force", action="store_true", help="replace an existing export in OUT_DIR")
    s.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: Hugging Face folder (default); gguf: one GGUF file for llama.cpp "
                        "and ollama (RUN_DIR may then also be an exported model folder, e.g. a "
                        "distilled student)")
    s.add_argument("--quant", choices=["q8_0", "f16"], default="q8_0",
                   help="GGUF weight type: q8_0 (8-bit blocks, default) or f16")
    s.add_argument("--eval-data", nargs="+", metavar="FILE",
                   help="evaluate on these text files instead of the run's held-out split")
    s.add_argument("--no-eval", action="store_true",
                   help="skip the held-out evaluation (the model card then has none)")

    s = sub.add_parser("verify", help="replay a swarm run and check an exported model",
                       description="Replay the run in RUN_DIR from its initial checkpoint: "
                       "re-apply every published int8 update with the same function the "
                       "workers use, check each round's update, contributions and resulting "
                       "checkpoint against the ledger's hash chain and the model's "
                       "provenance.json, and check that MODEL_DIR/model.safetensors is exactly "
                       "what the replay gives. Names the first bad link; exits 0 when "
                       "verified, 1 when a check fails, 2 when the inputs cannot be used.")
    s.add_argument("model_dir", metavar="MODEL_DIR", help="a folder from `crowdtrain export`")
    s.add_argument("run_dir", metavar="RUN_DIR", help="the swarm run it was exported from")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the verdict")

    s = sub.add_parser("eval", help="held-out loss, perplexity and bits per byte on text",
                       description="Evaluate a model on text files: loss (nats/token), "
                       "perplexity, and bits per byte (total nats / (ln 2 x UTF-8 bytes)), "
                       "which compares models with different tokenizers.")
    s.add_argument("model", metavar="MODEL",
                   help="an exported model folder, or a .gguf file (or a folder holding one)")
    s.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="text (.txt, .md) or .jsonl ('text' field) files")
    s.add_argument("--max-bytes", type=int, help="evaluate only the first N bytes of text")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("distill", help="train a smaller student on a teacher's logits",
                       description="Distil an exported model (the teacher) into a fresh student "
                       "of a preset size, on this machine: each step mixes the KL divergence to "
                       "the teacher's softened next-token distribution (weight --alpha, "
                       "temperature --temperature) with cross-entropy on the text. The student "
                       "uses the teacher's tokenizer; the last 10% of the text is held out to "
                       "report student and teacher bits per byte. The student is exported like "
                       "any model (Hugging Face folder, model card, provenance.json).")
    s.add_argument("teacher_dir", metavar="TEACHER_DIR", help="a folder from `crowdtrain export`")
    s.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"],
                   help="student size (default tiny)")
    s.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="text (.txt, .md) or .jsonl ('text' field) files to distil on")
    s.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for the student")
    s.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    s.add_argument("--alpha", type=float, default=0.9,
                   help="weight of the teacher (KL) term; 1 - alpha weighs the text's "
                        "cross-entropy (default 0.9)")
    s.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature of the KL term (default 1)")
    s.add_argument("--no-teacher", action="store_true",
                   help="train the same student on the text alone (alpha 0): the baseline")
    s.add_argument("--lr", type=float, help="peak AdamW learning rate (default: the preset's)")
    s.add_argument("--batch-size", type=int, help="sequences per step (default: the preset's)")
    s.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    s.add_argument("--seed", type=int, default=0, help="seed of the student and the batches")
    s.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, mps")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    s.add_argument("--force", action="store_true", help="replace an existing student in OUT_DIR")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    s = sub.add_parser("generate", help="sample text from an exported model",
                       description="Sample a continuation of PROMPT from an exported model.")
    s.add_argument("model_dir", metavar="MODEL_DIR")
    s.add_argument("prompt", metavar="PROMPT")
    s.add_argument("--max-tokens", type=int, default=200, help="tokens to generate")
    s.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    s.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest (0: all)")
    s.add_argument("--seed", type=int, default=0, help="random seed")

    s = sub.add_parser("serve", help="host a run: the coordinator volunteers join",
                       description="Serve a run created by `crowdtrain init` over HTTP: "
                       "volunteers join, lease rounds, and send compressed pseudo-gradients; "
                       "the coordinator merges them (DiLoCo) and checkpoints every round. "
                       "Restarting resumes from the last complete round.")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8470, help="TCP port (default 8470)")
    s.add_argument("--threads", type=int, default=1,
                   help="torch threads for evaluating each round's model (default 1)")
    s.add_argument("--tls-cert", metavar="PEM", help="TLS certificate (serve HTTPS)")
    s.add_argument("--tls-key", metavar="PEM", help="TLS private key")
    s.add_argument("--new-admin-token", action="store_true",
                   help="replace the owner's admin token with a new one (printed once)")

    s = sub.add_parser("join", help="volunteer this machine to a run",
                       description="Join the run at URL and train until it ends. Your identity "
                       "is saved in your config folder (or $CROWDTRAIN_HOME) so credits survive "
                       "restarts. Ctrl-C finishes the current round early and sends its work; "
                       "Ctrl-C twice abandons it.")
    s.add_argument("url", metavar="URL", help="coordinator address, e.g. http://host:8470")
    s.add_argument("--name", help="display name on the leaderboard (default: volunteer-HOST)")
    s.add_argument("--invite", metavar="KEY", help="invite key, for an invite-only run")
    s.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    s.add_argument("--max-rounds", type=int, help="leave after this many rounds")
    s.add_argument("--max-hours", type=float, help="leave after this many hours")
    s.add_argument("--max-memory", type=float, metavar="FRACTION",
                   help="cap on the GPU memory fraction this worker may use")
    s.add_argument("--no-error-feedback", action="store_true",
                   help="do not carry int8 rounding errors over to the next round")
    s.add_argument("--anonymous", action="store_true",
                   help="appear as 'anonymous' in the published model card and provenance "
                        "(decided when this machine first joins the run)")
    s.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train as N processes of one volunteer (one per GPU, or CPU cores): "
                        "DDP inside the worker, rank 0 talks to the coordinator; the same as "
                        "`torchrun --nproc-per-node N -m crowdtrain.worker URL`")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model (inductor; faster steps on most GPUs, a "
                        "minute of compiling first; needs a C++ compiler on CPU)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("status", help="show a run's progress: rounds, volunteers, refusals",
                       description="Print the state of the run at URL: recent rounds (loss, "
                       "contributions, bytes), the volunteer leaderboard and refused "
                       "contributions. The same picture is on the dashboard at URL/.")
    s.add_argument("url", metavar="URL", help="coordinator address, e.g. http://host:8470")
    s.add_argument("--json", action="store_true", help="machine-readable JSON (protocol.Status)")

    s = sub.add_parser("invite", help="create an invite key for an invite-only run",
                       description="Create an invite key (stored only as a hash) that lets "
                       "volunteers join a run made with `--access invite`. Run it on the "
                       "coordinator's machine.")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--uses", type=int, default=1, help="how many volunteers may use it")

    s = sub.add_parser("admin", help="owner commands: list, ban, unban volunteers; end the run",
                       description="Manage a run as its owner. TARGET is the run directory "
                       "(on the coordinator's machine) or the coordinator's URL together with "
                       "--token (the admin token `crowdtrain serve` printed on first start). "
                       "`end` stops handing out work: workers are told the run is over and "
                       "exit.")
    s.add_argument("target", metavar="TARGET", help="RUN_DIR or URL")
    s.add_argument("action", choices=["list", "ban", "unban", "end"])
    s.add_argument("who", nargs="?", metavar="VOLUNTEER", help="id or name (ban, unban)")
    s.add_argument("--token", help="admin token (with a URL target)")

    s = sub.add_parser("demo", help="a whole swarm on this machine (coordinator + workers)",
                       description="Create a run on the bundled corpus, start a coordinator and "
                       "several worker processes on loopback, train a few DiLoCo rounds, export "
                       "the model and print generated text.")
    s.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    s.add_argument("--rounds", type=int, default=5, help="DiLoCo rounds (default 5)")
    s.add_argument("--inner-steps", type=int, default=30, help="inner steps per round (H)")
    s.add_argument("--preset", default="small", help="model size (default small)")
    s.add_argument("--out", metavar="DIR", help="keep everything here (default: a temp folder)")
    return p


def quiet_libraries() -> None:
    """transformers' own progress bars and advice are noise in our output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for name in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    quiet_libraries()
    try:
        return COMMANDS[a.command](a) or 0
    except CrowdtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}",
              file=sys.stderr)
        return 2
    except Exception as e:  # a bug: say so in one line unless asked for the traceback
        if a.debug or os.environ.get("CROWDTRAIN_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback "
              "and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
