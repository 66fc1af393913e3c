"""One definition per setting: every `crowdtrain` option that is a setting takes its flag, type,
default, help and choices from its config dataclass's field (crowdtrain.cli.options), parsing
the flags builds the same dataclass as constructing it directly, and the commands hand the
settings the user gave to the library as before."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing

import pytest

from crowdtrain.cli import options
from crowdtrain.cli.demo import DemoConfig
from crowdtrain.cli.main import build_parser, main
from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.distill import DistillConfig
from crowdtrain.run.data import DataConfig
from crowdtrain.run.folder import RunConfig, SwarmConfig, TeacherSettings
from crowdtrain.run.lora import LoraSettings
from crowdtrain.run.train import TrainConfig
from crowdtrain.volunteer.config import WorkerConfig

# the config dataclasses whose settings are options of a subcommand, with their flags' prefix
SETTINGS: dict[str, dict[type, str]] = {
    "init": {RunConfig: "", DataConfig: "", TrainConfig: "", SwarmConfig: "",
             LoraSettings: "lora-", TeacherSettings: "distill-"},
    "distill": {DistillConfig: ""},
    "join": {WorkerConfig: ""},
    "demo": {DemoConfig: ""},
}
# the arguments a subcommand needs besides the settings
REQUIRED = {"init": ["RUN"], "join": ["http://host:1"],
            "distill": ["T", "--data", "D", "--out", "O"], "demo": []}
# fields that are not options, as the commands fill them in
FIXED: dict[type, dict] = {RunConfig: {"name": "RUN"}, WorkerConfig: {"url": "http://host:1"},
                           TeacherSettings: {"name": "t", "sha256": "0" * 64}}
# where the generic non-default value below is not a valid one
SAMPLES = {(RunConfig, "preset"): "tiny", (DemoConfig, "preset"): "tiny",
           (DistillConfig, "seq_len"): 16, (LoraSettings, "targets"): ("q_proj", "v_proj")}

# every flag of every subcommand (none may go away: scripts and docs use them)
FLAGS = {
    "init": "--data --preset --vocab-size --tokenizer --steps --batch-size --seq-len --lr "
            "--rounds --inner-steps --inner-steps-growth --round-seconds --min-contributions "
            "--max-extensions --outer-lr --outer-momentum --codec --warm-start --access --seed "
            "--force --quiet -q --from-pretrained --lora --lora-rank --lora-alpha "
            "--lora-dropout --lora-targets --teacher --distill-alpha --distill-temperature",
    "train": "--steps --minutes --device --threads --eval-every --quiet -q",
    "export": "--round --force --format --quant --eval-data --no-eval",
    "verify": "--quiet -q",
    "eval": "--data --max-bytes --json",
    "distill": "--preset --data --out --steps --alpha --temperature --no-teacher --lr "
               "--batch-size --seq-len --seed --device --threads --force --quiet -q",
    "generate": "--max-tokens --temperature --top-k --seed",
    "serve": "--host --port --threads --tls-cert --tls-key --new-admin-token",
    "join": "--name --invite --device --threads --max-rounds --max-hours --max-memory "
            "--no-error-feedback --anonymous --nproc --compile --quiet -q",
    "status": "--json",
    "invite": "--uses",
    "admin": "--token",
    "demo": "--workers --rounds --inner-steps --preset --out",
}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sp.complete() for name, sp in sub.choices.items()}


def shown(f: dataclasses.Field, prefix: str, default_help: str | None) -> str | None:
    """How the help must show the field's default."""
    if default_help or "default_help" in f.metadata:
        return default_help or f.metadata["default_help"]
    d = f.default
    if d is True:
        return "--" + prefix + f.name.replace("_", "-")
    if d is None or d is False:
        return None
    if isinstance(d, float):
        return f"{d:g}"
    return ",".join(d) if isinstance(d, tuple) else str(d)


def flag(f: dataclasses.Field, prefix: str) -> str:
    return "--" + prefix + f.metadata.get("flag", f.name.replace("_", "-"))


def test_every_flag_is_still_there():
    for name, parser in subparsers().items():
        have = {s for a in parser._actions for s in a.option_strings}
        assert set(FLAGS[name].split()) <= have, (name, set(FLAGS[name].split()) - have)


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_setting_options_come_from_their_fields(command):
    parser = subparsers()[command]
    classes = SETTINGS.get(command, {})
    seen = set()
    for a in parser._actions:
        setting = getattr(a, "setting", None)
        if setting is None:  # written by hand: it must not be a setting typed a second time
            for cls, prefix in classes.items():
                for f in options.settings_of(cls):
                    assert flag(f, prefix) not in a.option_strings, (command, a.option_strings)
                    assert a.dest != f.name, (command, a.dest)
            continue
        cls, f = setting.cls, setting.field
        assert cls in classes, (command, cls)
        prefix, md = classes[cls], f.metadata
        seen.add((cls, f.name))
        assert flag(f, prefix) in a.option_strings
        # the default is the field's (None where the command's defaults are elsewhere, e.g.
        # the preset's), and what the help shows
        assert a.default == (None if setting.default_help else f.default), (cls, f.name)
        assert "(default" not in md["help"], \
            f"{cls.__name__}.{f.name}: the help repeats a default"
        text = shown(f, prefix, setting.default_help)
        assert a.help == (md["help"] + (f" (default: {text})" if text else "")).replace("%", "%%")
        assert a.choices == md.get("choices")
        if a.choices is not None:
            assert f.default in a.choices
    expected = {(cls, f.name) for cls in classes for f in options.settings_of(cls)}
    assert seen == expected, expected ^ seen
    parser.format_help()  # renders


def sample(cls: type, f: dataclasses.Field):
    """A valid value of the field other than its default."""
    if (cls, f.name) in SAMPLES:
        return SAMPLES[cls, f.name]
    d, md = f.default, f.metadata
    kind = options._value_type(typing.get_type_hints(cls)[f.name])
    if "choices" in md:
        return next(c for c in md["choices"] if c != d)
    if kind is bool:
        return not d
    if isinstance(d, tuple):
        return d[::-1]
    if kind is int:
        return 2 if d is None else d + 1
    if kind is float:
        return 0.5 if not d else d / 2 if d < 1 else d * 1.5
    return "x"


def argv_for(cls: type, prefix: str) -> tuple[list[str], dict]:
    argv, values = [], {}
    for f in options.settings_of(cls):
        v = values[f.name] = sample(cls, f)
        if isinstance(v, bool):
            argv.append(flag(f, prefix) if v else "--no-" + flag(f, prefix)[2:])
        elif isinstance(v, tuple):
            argv += [flag(f, prefix), ",".join(v)]
        else:
            argv += [flag(f, prefix), str(v)]
    return argv, values


@pytest.mark.parametrize("command, cls", [(c, k) for c in SETTINGS for k in SETTINGS[c]])
def test_parsed_flags_build_the_dataclass(command, cls):
    parser = subparsers()[command]
    none = parser.parse_args(REQUIRED[command])
    assert options.given(none, cls) == {}  # nothing given: the dataclass's defaults apply
    for f in options.settings_of(cls):  # and the namespace holds them, as argparse's do
        dest = (SETTINGS[command][cls] + f.metadata.get("flag", f.name)).replace("-", "_")
        assert getattr(none, dest) == (None if command == "init" and cls in (TrainConfig,
                                                                            DataConfig)
                                       else f.default)
    assert options.build(none, cls, **FIXED.get(cls, {})) == cls(**FIXED.get(cls, {}))
    argv, values = argv_for(cls, SETTINGS[command][cls])
    a = parser.parse_args(REQUIRED[command] + argv)
    assert options.given(a, cls) == values
    built = options.build(a, cls, **FIXED.get(cls, {}))
    assert built == cls(**FIXED.get(cls, {}), **values)
    assert all(getattr(built, k) != getattr(cls(**FIXED.get(cls, {})), k) for k in values)


def test_light_commands_do_not_import_the_settings():
    """The settings' modules import torch: `crowdtrain --help` and `status` must not."""
    code = ("import sys; from crowdtrain.cli.main import build_parser; "
            "build_parser().parse_args(['status', 'http://h:1']); "
            "print(sorted(m for m in ('torch', 'crowdtrain.run.folder') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


class Stop(CrowdtrainError):
    pass


def called(monkeypatch, capsys, target: str, argv: list[str]) -> dict:
    """The arguments `crowdtrain ARGV` passes to the library function `target` (stubbed)."""
    module, name = target.rsplit(".", 1)
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise Stop("stubbed")

    monkeypatch.setattr(f"{module}.{name}", fake)
    assert main(argv) == 2
    assert "stubbed" in capsys.readouterr().err
    return seen


def test_init_passes_only_the_settings_given(monkeypatch, capsys):
    init = "crowdtrain.run.folder.init_run"
    k = called(monkeypatch, capsys, init, ["init", "r"])
    assert k["swarm"] == SwarmConfig() and k["train_overrides"] == {} and k["lora"] is None
    assert not {"preset", "seed", "vocab_size", "distill_alpha"} & set(k)  # init_run's own
    k = called(monkeypatch, capsys, init, ["init", "r", "--rounds", "3", "--inner-steps", "7",
                                           "--lr", "0.01", "--preset", "tiny", "--seed", "5",
                                           "--vocab-size", "300", "--distill-alpha", "0.5"])
    assert k["swarm"] == SwarmConfig(rounds=3, inner_steps=7)
    assert k["train_overrides"] == {"lr": 0.01,
                                    "total_steps": SwarmConfig(rounds=3, inner_steps=7)
                                    .total_steps()}
    assert (k["preset"], k["seed"], k["vocab_size"], k["distill_alpha"]) == ("tiny", 5, 300, 0.5)
    assert "distill_temperature" not in k
    k = called(monkeypatch, capsys, init, ["init", "r", "--rounds", "3", "--steps", "99"])
    assert k["train_overrides"] == {"total_steps": 99}
    assert called(monkeypatch, capsys, init, ["init", "r", "--lora"])["lora"] == LoraSettings()
    k = called(monkeypatch, capsys, init, ["init", "r", "--lora-targets", "all",
                                           "--lora-rank", "4"])
    assert k["lora"] == LoraSettings(rank=4, targets=("all-linear",))


def test_a_bad_setting_is_a_one_line_error(capsys):
    assert main(["init", "r", "--lora-targets", "q_proj,attn!"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid LoRA targets") and err.count("\n") == 1
    assert main(["join", "http://h:1", "--max-memory", "2"]) == 2
    assert "--max-memory" in capsys.readouterr().err
    assert main(["demo", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_join_distill_and_demo_build_their_configs(monkeypatch, capsys):
    k = called(monkeypatch, capsys, "crowdtrain.volunteer.launch.run_worker",
               ["join", "http://h:1", "--no-error-feedback", "-q", "--nproc", "2"])
    assert k["args"][0] == WorkerConfig(url="http://h:1", error_feedback=False, progress=False,
                                        nproc=2)
    k = called(monkeypatch, capsys, "crowdtrain.publish.distill.distill",
               ["distill", "T", "--data", "D", "--out", "O", "--no-teacher", "--steps", "7"])
    assert k["args"][2] == DistillConfig(alpha=0.0, steps=7)
    k = called(monkeypatch, capsys, "crowdtrain.publish.distill.distill",
               ["distill", "T", "--data", "D", "--out", "O"])
    assert k["args"][2] == DistillConfig()
    assert (DistillConfig().alpha, DistillConfig().temperature) == (0.9, 1.0)  # as ever
    k = called(monkeypatch, capsys, "crowdtrain.cli.demo.run_demo", ["demo", "--workers", "2"])
    assert k["args"][0] == DemoConfig(workers=2)
