"""The `crowdtrain` command: argument parsing and one-line errors; what each subcommand does
is in commands.py, and the work itself in the library modules.

Every subcommand has `--help`. A CrowdtrainError (bad input, broken run) or an OS error (missing
file, full disk) prints `error: ...` on one line and exits 2; Ctrl-C exits 130; anything else is
a bug and prints a one-line summary (the traceback with --debug).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from crowdtrain import __version__
from crowdtrain.cli.commands import COMMANDS
from crowdtrain.errors import CrowdtrainError


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
    s.add_argument("--max-extensions", type=int,
                   help="times a round short of --min-contributions has its deadline extended "
                        "by --round-seconds before it closes with what it has; a round with "
                        "no contribution then leaves the model unchanged (default 3)")
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
    d = s.add_argument_group("distilling a teacher (the swarm trains a smaller student)")
    d.add_argument("--teacher", metavar="DIR",
                   help="a local Hugging Face Llama folder (with tokenizer.json): a fresh "
                        "--preset student with the teacher's tokenizer learns from the "
                        "teacher's logits in every inner step, the volunteers' included "
                        "(they fetch the teacher once, sha256-checked)")
    d.add_argument("--distill-alpha", type=float, default=0.9, metavar="A",
                   help="weight of the KL term against the text's cross-entropy (default 0.9)")
    d.add_argument("--distill-temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature of both models (default 1)")

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
                        "`torchrun --nproc-per-node N -m crowdtrain.volunteer.worker URL`")
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
