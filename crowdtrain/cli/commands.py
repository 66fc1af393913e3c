"""What each `crowdtrain` subcommand does, given its parsed arguments (main.py owns the parsers,
`main` and the one-line errors; options.py turns the options that are settings back into their
config dataclasses). Each command imports its modules when it runs, so that
`crowdtrain --help` and light commands start fast."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from crowdtrain.cli import options
from crowdtrain.errors import CrowdtrainError

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}


def command(fn: Callable[[argparse.Namespace], int | None]):
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


@command
def cmd_init(a: argparse.Namespace) -> None:
    from crowdtrain.run.data import DataConfig, default_corpus
    from crowdtrain.run.folder import RunConfig, SwarmConfig, TeacherSettings, init_run
    from crowdtrain.run.lora import LoraSettings
    from crowdtrain.run.train import TrainConfig

    given = options.given(a, SwarmConfig)
    swarm = SwarmConfig(**given)
    train = options.given(a, TrainConfig)  # over the preset's
    if "total_steps" not in train and (given.get("rounds") or given.get("inner_steps")):
        train["total_steps"] = swarm.total_steps()
    given = options.given(a, LoraSettings)
    lora = LoraSettings(**given) if a.lora or given else None
    distill = {f"distill_{k}": v for k, v in options.given(a, TeacherSettings).items()}
    data = options.given(a, DataConfig)  # vocab_size is init_run's own; the rest a DataConfig
    extra = {"vocab_size": data.pop("vocab_size")} if "vocab_size" in data else {}
    if data:
        extra["data_config"] = DataConfig(**data)
    if a.download:
        extra["download"] = True
    run = init_run(a.run_dir, a.data or [default_corpus()], **options.given(a, RunConfig),
                   **extra, tokenizer=a.tokenizer, force=a.force, progress=not a.quiet,
                   train_overrides=train, swarm=swarm, from_pretrained=a.from_pretrained,
                   lora=lora, teacher=a.teacher, **distill)
    idx = run.index
    what = (f"from {run.config.base_model}" if run.config.base_model else
            f"preset {run.config.preset}")
    print(f"created run {run.dir}: {what}, vocab {idx.vocab_size}, "
          f"{idx.train_tokens:,} train + {idx.val_tokens:,} val tokens in "
          f"{len(idx.train) + len(idx.val)} shards")
    sw, t = run.config.swarm, run.config.teacher
    print(f"swarm: {sw.rounds or 'open-ended'} rounds of {sw.inner_steps} inner steps, "
          f"{sw.codec} contributions, {sw.aggregation} aggregation, {sw.access} access"
          + (f"; distilling {t.name} (alpha {t.alpha:g}, temperature {t.temperature:g})"
             if t else ""))
    from crowdtrain.run.checkpoint import load_checkpoint
    from crowdtrain.wire.codecs import payload_bytes

    ck = load_checkpoint(run.ckpt_dir, 0)
    print(contribution_line(sw, [t.numel() for t in ck.tensors.values()]))
    if run.config.lora is not None:
        lora = run.config.lora
        n, codec, opts = sum(t.numel() for t in ck.tensors.values()), sw.codec, sw.codec_options()
        print(f"LoRA r={lora.rank} alpha={lora.alpha:g} on {','.join(lora.targets)}: "
              f"{n:,} adapter parameters travel (~{payload_bytes(n, codec, **opts):,} bytes per "
              f"{codec} upload) instead of {ck.meta['params']:,} "
              f"(~{payload_bytes(ck.meta['params'], codec, **opts):,} bytes)")
    print(f"next: crowdtrain serve {run.dir}   (host it)   or   crowdtrain train {run.dir}   "
          "(one machine)")


UPLINK_MBIT = 10  # a home connection's upload, for the time a contribution takes


def contribution_line(sw, numels: list[int]) -> str:
    """What one volunteer uploads each round with swarm settings `sw` for parameters of these
    sizes (as the coordinator counts it: parameter by parameter), and what int8 would."""
    from crowdtrain.cli.status import fmt_bytes
    from crowdtrain.wire.codecs import payload_bytes

    size = sum(payload_bytes(n, sw.codec, **sw.codec_options()) for n in numels)
    int8 = sum(payload_bytes(n, "int8") for n in numels)
    what = (f"sparse {sw.sparse_density * 100:.3g}%, {sw.sparse_bits} bits"
            if sw.codec == "sparse" else sw.codec)
    secs = size * 8 / (UPLINK_MBIT * 1e6)
    took = f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.1f}s"
    line = (f"each round every volunteer uploads ~{fmt_bytes(size)} ({what}: ~{took} at "
            f"{UPLINK_MBIT} Mbit/s up)")
    if sw.codec != "int8":
        line += f", int8 would be ~{fmt_bytes(int8)} ({int8 / size:.2g}x)"
    return line


@command
def cmd_train(a: argparse.Namespace) -> None:
    from crowdtrain.run.folder import Run
    from crowdtrain.run.solo import set_threads, train_local

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

    from crowdtrain.publish.export import export_model

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
    from crowdtrain.publish.verify import verify_model

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

    from crowdtrain.publish.evaluate import evaluate_model

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
    from crowdtrain.publish.distill import DistillConfig, distill
    from crowdtrain.run.solo import set_threads

    set_threads(a.threads)
    cfg = options.build(a, DistillConfig, **({"alpha": 0.0} if a.no_teacher else {}))

    def on_step(step: int, loss: float) -> None:
        if not a.quiet and (step + 1) % max(cfg.steps // 10, 1) == 0:
            print(f"step {step + 1}/{cfg.steps}: loss {loss:.4f}", flush=True)

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
    from crowdtrain.publish.generate import generate_text

    print(generate_text(a.model_dir, a.prompt, max_new_tokens=a.max_tokens,
                        temperature=a.temperature, top_k=a.top_k, seed=a.seed))


@command
def cmd_serve(a: argparse.Namespace) -> None:
    import torch

    from crowdtrain.coordinator.rules import Coordinator
    from crowdtrain.coordinator.server import serve
    from crowdtrain.run.folder import Run

    torch.set_num_threads(a.threads)
    if bool(a.tls_cert) != bool(a.tls_key):
        raise CrowdtrainError("--tls-cert and --tls-key go together")
    public_url = a.public_url
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise CrowdtrainError(f"--public-url must start with http:// or https://, got "
                              f"{public_url!r}")
    coord = Coordinator(Run(a.run_dir), public_url=public_url)
    token = coord.new_admin_token(rotate=a.new_admin_token)
    if token:
        print(f"admin token (shown once, stored only as a hash; keep it to manage the run "
              f"with `crowdtrain admin URL --token ...`): {token}", flush=True)
    scheme = "https" if a.tls_cert else "http"
    print(f"serving run {coord.run.config.name} (round {coord.round}) at "
          f"{scheme}://{a.host}:{a.port}  status: {protocol_path('STATUS')}  docs: /docs",
          flush=True)
    serve(coord, a.host, a.port, ssl_certfile=a.tls_cert, ssl_keyfile=a.tls_key)


def protocol_path(name: str) -> str:
    from crowdtrain.wire import protocol

    return getattr(protocol, name)


@command
def cmd_join(a: argparse.Namespace) -> int:
    from crowdtrain.volunteer.config import WorkerConfig
    from crowdtrain.volunteer.launch import run_worker

    s = run_worker(options.build(a, WorkerConfig, url=a.url, progress=not a.quiet))
    if s.reason.startswith("rank "):  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"{s.reason or 'stopped'}: {s.rounds} rounds, {s.accepted} accepted, {s.refused} "
          f"refused, {s.tokens:,} tokens trained, sent {s.bytes_sent / 1e6:.1f} MB, received "
          f"{s.bytes_received / 1e6:.1f} MB")
    return 0


@command
def cmd_invite(a: argparse.Namespace) -> None:
    from crowdtrain.run.folder import Run
    from crowdtrain.run.ledger import Ledger

    run = Run(a.run_dir)
    if a.uses < 1:
        raise CrowdtrainError("--uses must be at least 1")
    key = Ledger(run.ledger_path).add_invite(a.uses)
    note = "" if run.config.swarm.access == "invite" else (
        " (note: this run is open to anyone; invite keys matter for runs made with "
        "`crowdtrain init --access invite`)")
    print(f"invite key for {a.uses} volunteer(s): {key}{note}")
    print(f"they join with: crowdtrain join URL --invite {key}")


@command
def cmd_admin(a: argparse.Namespace) -> None:
    from crowdtrain.cli.admin import run_admin

    print(run_admin(a.target, a.action, a.who, token=a.token))


@command
def cmd_demo(a: argparse.Namespace) -> None:
    from crowdtrain.cli.demo import DemoConfig, run_demo

    r = run_demo(options.build(a, DemoConfig))
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

    from crowdtrain.cli.status import fetch_status, render_status

    st = fetch_status(a.url)
    if a.json:
        print(st.model_dump_json(indent=1))
    else:
        Console().print(render_status(st))
