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
from crowdtrain.cli.options import CommandParser
from crowdtrain.errors import CrowdtrainError

DEVICE_HELP = "auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps"
QUIET = dict(action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The `crowdtrain` parser, one `_add_COMMAND` per subcommand. The options that are
    settings come from their config dataclasses (`add_settings`, crowdtrain.cli.options: the
    flag, type, default, help and choices are the field's); the rest (folders, --force,
    --quiet, --json, ...) are written here."""
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
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for add in (_add_init, _add_train, _add_export, _add_verify, _add_eval, _add_distill,
                _add_generate, _add_serve, _add_join, _add_status, _add_invite, _add_admin,
                _add_demo):  # in the order `crowdtrain --help` lists them
        add(sub)
    return p


def _add_init(sub) -> None:
    s = sub.add_parser("init", help="create a run: tokenizer, shards, model, initial checkpoint",
                       description="Create a run directory from a corpus: train a byte-level BPE "
                       "tokenizer, write token shards (train + held-out validation), and the "
                       "initial model checkpoint.")
    s.add_argument("run_dir", metavar="RUN_DIR", help="folder to create")
    s.add_argument("--force", action="store_true", help="replace an existing run in RUN_DIR")
    s.add_argument("-q", "--quiet", **QUIET)
    g = s.add_argument_group("the model and its data")
    g.add_argument("--data", nargs="+", metavar="FILE",
                   help="text (.txt, .md), .jsonl (a 'text' field, or chat 'messages' rendered "
                        "with the model's chat template, loss on the assistant's turns only), "
                        ".parquet files or `datasets` save_to_disk folders (the --text-column "
                        "column) (default: the bundled Tiny Shakespeare corpus)")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="use this tokenizer.json (or folder) instead of training one")
    s.add_settings(g, "crowdtrain.run.folder:RunConfig")
    s.add_settings(g, "crowdtrain.run.data:DataConfig", default_help="the preset's")
    s.add_settings(s.add_argument_group("training (the inner loop)"),
                   "crowdtrain.run.train:TrainConfig", default_help="the preset's")
    s.add_settings(s.add_argument_group("the swarm (DiLoCo rounds, when served)"),
                   "crowdtrain.run.folder:SwarmConfig")
    g = s.add_argument_group("fine-tuning a pretrained model")
    g.add_argument("--from-pretrained", metavar="DIR|ID",
                   help="start from this pretrained causal LM: a local Hugging Face folder "
                        "(config.json, weights, tokenizer.json) of any family transformers "
                        "loads (Llama, Qwen2, Mistral, Gemma, Phi-3, GPT-2, ...), or a Hub id "
                        "in the local Hugging Face cache (`huggingface-cli download ID`): its "
                        "tokenizer, special tokens, chat template, config and weights (trained "
                        "in fp32, exported in the source's dtype); --preset then only picks the "
                        "training defaults")
    g.add_argument("--download", action="store_true",
                   help="download a --from-pretrained or --teacher Hub id missing from the "
                        "local cache (the only time crowdtrain reaches the Hub)")
    g.add_argument("--lora", action="store_true",
                   help="train LoRA adapters (peft) on the frozen model: only adapter deltas "
                        "travel (implied by the --lora-* options)")
    s.add_settings(g, "crowdtrain.run.lora:LoraSettings", prefix="lora-")
    g = s.add_argument_group("distilling a teacher (the swarm trains a smaller student)")
    g.add_argument("--teacher", metavar="DIR",
                   help="a pretrained causal LM folder or cached Hub id, of any family (with "
                        "tokenizer.json): a fresh "
                        "--preset student with the teacher's tokenizer learns from the "
                        "teacher's logits in every inner step, the volunteers' included "
                        "(they fetch the teacher once, sha256-checked)")
    s.add_settings(g, "crowdtrain.run.folder:TeacherSettings", prefix="distill-")


def _add_train(sub) -> None:
    s = sub.add_parser("train", help="train a run on this machine (the one-machine baseline)",
                       description="Train the run on this machine from its latest checkpoint "
                       "and save the next checkpoint. Ctrl-C stops after the current step and "
                       "still saves.")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--steps", type=int, help="inner steps (default: the rest of the schedule)")
    s.add_argument("--minutes", type=float, help="stop after this much wall time")
    s.add_argument("--device", default="auto", help=DEVICE_HELP + " (default: auto)")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    s.add_argument("--eval-every", type=int, default=100,
                   help="steps between held-out evals (default: 100)")
    s.add_argument("-q", "--quiet", **QUIET)


def _add_export(sub) -> None:
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


def _add_verify(sub) -> None:
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


def _add_eval(sub) -> None:
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


def _add_distill(sub) -> None:
    s = sub.add_parser("distill", help="train a smaller student on a teacher's logits",
                       description="Distil an exported model (the teacher) into a fresh student "
                       "of a preset size, on this machine: each step mixes the KL divergence to "
                       "the teacher's softened next-token distribution (weight --alpha, "
                       "temperature --temperature) with cross-entropy on the text. The student "
                       "uses the teacher's tokenizer; the last 10% of the text is held out to "
                       "report student and teacher bits per byte. The student is exported like "
                       "any model (Hugging Face folder, model card, provenance.json).")
    s.add_argument("teacher_dir", metavar="TEACHER_DIR", help="a folder from `crowdtrain export`")
    s.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="text (.txt, .md) or .jsonl ('text' field) files to distil on")
    s.add_argument("--out", required=True, metavar="OUT_DIR", help="folder for the student")
    s.add_argument("--no-teacher", action="store_true",
                   help="train the same student on the text alone (alpha 0): the baseline")
    s.add_argument("--device", default="cpu", help=DEVICE_HELP + " (default: cpu)")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    s.add_argument("--force", action="store_true", help="replace an existing student in OUT_DIR")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    s.add_settings(s.add_argument_group("the student and its training"),
                   "crowdtrain.publish.distill:DistillConfig")


def _add_generate(sub) -> None:
    s = sub.add_parser("generate", help="sample text from an exported model",
                       description="Sample a continuation of PROMPT from an exported model.")
    s.add_argument("model_dir", metavar="MODEL_DIR")
    s.add_argument("prompt", metavar="PROMPT")
    s.add_argument("--max-tokens", type=int, default=200, help="tokens to generate")
    s.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    s.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest (0: all)")
    s.add_argument("--seed", type=int, default=0, help="random seed")


def _add_serve(sub) -> None:
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
    s.add_argument("--public-url", metavar="URL",
                   help="volunteers download the run's immutable files (checkpoints, updates, "
                        "shards, base, teacher) as URL/<sha256> from a web server or CDN serving "
                        "RUN_DIR/public/ (see docs/DEPLOY.md); each file is sha256-checked. "
                        "Default: this coordinator serves them")


def _add_join(sub) -> None:
    s = sub.add_parser("join", help="volunteer this machine to a run",
                       description="Join the run at URL and train until it ends. Your identity "
                       "is saved in your config folder (or $CROWDTRAIN_HOME) so credits survive "
                       "restarts. Ctrl-C finishes the current round early and sends its work; "
                       "Ctrl-C twice abandons it.")
    s.add_argument("url", metavar="URL", help="coordinator address, e.g. http://host:8470")
    s.add_argument("-q", "--quiet", **QUIET)
    s.add_settings(s.add_argument_group("the volunteer"),
                   "crowdtrain.volunteer.config:WorkerConfig")


def _add_status(sub) -> None:
    s = sub.add_parser("status", help="show a run's progress: rounds, volunteers, refusals",
                       description="Print the state of the run at URL: recent rounds (loss, "
                       "contributions, bytes), the volunteer leaderboard and refused "
                       "contributions. The same picture is on the dashboard at URL/.")
    s.add_argument("url", metavar="URL", help="coordinator address, e.g. http://host:8470")
    s.add_argument("--json", action="store_true", help="machine-readable JSON (protocol.Status)")


def _add_invite(sub) -> None:
    s = sub.add_parser("invite", help="create an invite key for an invite-only run",
                       description="Create an invite key (stored only as a hash) that lets "
                       "volunteers join a run made with `--access invite`. Run it on the "
                       "coordinator's machine.")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--uses", type=int, default=1, help="how many volunteers may use it")


def _add_admin(sub) -> None:
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


def _add_demo(sub) -> None:
    s = sub.add_parser("demo", help="a whole swarm on this machine (coordinator + workers)",
                       description="Create a run on the bundled corpus, start a coordinator and "
                       "several worker processes on loopback, train a few DiLoCo rounds, export "
                       "the model and print generated text.")
    s.add_settings(s, "crowdtrain.cli.demo:DemoConfig")


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
