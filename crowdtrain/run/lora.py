"""LoRA fine-tuning of a pretrained model with peft: the settings, which layers get adapters
on any architecture, the wrapped model, what travels, and the export in peft's own format.

In a LoRA run the pretrained weights are frozen and stored once in the run directory
(`model/base.safetensors`, its sha256 in run.json); workers download them once
(`GET /v1/base`, content-addressed and sha256-checked). Everything the swarm moves per round
(checkpoints, payloads, updates: "theta") is the adapter tensors only, because
`model.state_dict_for_save` and `model.load_into` see just the trainable parameters of a peft
model. So the coordinator, the codecs, robust aggregation and the hash chain work unchanged.
The frozen base is kept in float32 like every model here (not in its source dtype).

Which layers: `LoraSettings.targets` is "default" (peft's choice for the architecture),
"all-linear" (every linear layer but the output head), or module-name suffixes.
`resolve_targets` turns them into the concrete suffixes of one model (sorted), which init
records in run.json, so every worker adapts exactly the same layers whatever its peft version.
A linear layer is a `torch.nn.Linear` or transformers' `Conv1D` (GPT-2's; adapted with
peft's `fan_in_fan_out`).

peft is imported only when a LoRA model is built or exported (it is slow to import).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from crowdtrain.errors import CrowdtrainError, check_settings
from crowdtrain.run.model import build_model, load_into

BASE_FILE = "base.safetensors"  # in the run's model/ folder
ADAPTER_DIR = "adapter"  # in an exported folder

DEFAULT = "default"  # peft's per-architecture targets
ALL_LINEAR = "all-linear"  # every linear layer but the output head
SPECIAL = (DEFAULT, ALL_LINEAR)
# the default targets of architectures peft's table lacks, in peft's spirit (the attention's
# query and value projections; a fused one where the model has it, as peft has for codegen)
EXTRA_DEFAULTS: dict[str, tuple[str, ...]] = {"phi3": ("qkv_proj",)}
# Llama's linear layers ("all-linear" on a Llama resolves to these)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def targets_problem(targets: object) -> str | None:
    """What is wrong with `targets` as LoraSettings.targets, or None when it is fine."""
    if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
        return "not a list of names"
    if not targets:
        return "none given"
    if not all(isinstance(t, str) for t in targets):
        return "not all names are text"
    if len(set(targets)) != len(targets):
        return "a name is repeated"
    special = [t for t in targets if t in SPECIAL]
    if special and len(targets) > 1:
        return f"{special[0]!r} stands alone"
    bad = [t for t in targets if t not in SPECIAL and not _NAME.fullmatch(t)]
    if bad:
        return f"{', '.join(map(repr, bad))} do(es) not look like a module name"
    return None


def parse_targets(text: str) -> tuple[str, ...]:
    """The `--lora-targets` option: `default`, `all-linear` (`all` is the same), or
    comma-separated module-name suffixes such as `q_proj,v_proj`."""
    if text.strip() == "all":
        return (ALL_LINEAR,)
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    problem = targets_problem(targets)
    if problem:
        raise CrowdtrainError(f"invalid LoRA targets {text.strip()!r} ({problem}): give "
                              "'default', 'all-linear' or comma-separated layer names such as "
                              "q_proj,v_proj")
    return targets


@dataclass(frozen=True)
class LoraSettings:
    """The adapters of a LoRA run: rank, scale (alpha / rank), dropout, adapted layers. Each is
    a `crowdtrain init` option, `--lora-` + its name (crowdtrain.cli.options). In run.json the
    targets are always concrete names (see `resolve_targets`)."""

    rank: int = field(default=8, metadata={"help": "adapter rank r"})
    alpha: float = field(default=16.0, metadata={"help": "adapter scale alpha; scaling alpha/r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    targets: tuple[str, ...] = field(default=(DEFAULT,), metadata={
        "metavar": "NAMES", "parse": parse_targets,
        "help": "layers to adapt: 'default' (peft's choice for the architecture, e.g. "
                "q_proj,v_proj for Llama, c_attn for GPT-2), 'all-linear' (every linear layer "
                "but the output head), or comma-separated layer names (e.g. q_proj,k_proj,"
                "v_proj,o_proj)"})

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, list):  # from run.json
            targets = tuple(targets)
            object.__setattr__(self, "targets", targets)
        check_settings("lora", {
            "rank": isinstance(self.rank, int) and 1 <= self.rank <= 4096,
            "alpha": 0 < self.alpha <= 1e4,
            "dropout": 0 <= self.dropout < 1,
            "targets": targets_problem(targets) is None,
        }, self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    parse_targets = staticmethod(parse_targets)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft model (its frozen base does not travel)."""
    return getattr(model, "peft_config", None) is not None


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def _matches(name: str, suffix: str) -> bool:
    """peft's rule for a target name: the module's whole name, or its last dotted parts."""
    return name == suffix or name.endswith("." + suffix)


class _Layers:
    """A plain model's modules by name: its linear layers (but the output head), and the rest."""

    def __init__(self, model: torch.nn.Module):
        if is_lora(model):
            raise CrowdtrainError("LoRA targets are resolved on the plain model; resolve them "
                                  "before wrapping it")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        kinds = _linear_types()
        self.modules = {n: m for n, m in model.named_modules() if n}
        self.linear = {n for n, m in self.modules.items()
                       if isinstance(m, kinds) and m is not head}
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)

    def matched(self, suffix: str) -> list[str]:
        return [n for n in self.modules if _matches(n, suffix)]

    def adaptable(self, suffix: str) -> bool:
        """Whether `suffix` names at least one linear layer and nothing else."""
        found = self.matched(suffix)
        return bool(found) and all(n in self.linear for n in found)

    def suffixes(self, chosen: set[str]) -> tuple[str, ...]:
        """The shortest suffixes that name exactly the layers `chosen` (usually their last
        names, e.g. q_proj), sorted."""
        out: set[str] = set()
        ok: dict[str, bool] = {}
        for name in chosen:
            parts = name.split(".")
            for i in range(len(parts) - 1, -1, -1):
                s = ".".join(parts[i:])
                if s not in ok:
                    ok[s] = all(n in chosen for n in self.matched(s))
                if ok[s]:
                    out.add(s)
                    break
            else:
                out.add(name)
        return tuple(sorted(out))

    def listing(self) -> str:
        return ",".join(self.suffixes(self.linear)) or "(none)"


def default_targets(model_type: str | None) -> tuple[str, ...] | str | None:
    """peft's default LoRA targets for `model_type` (a tuple of names, or a regular expression
    over whole module names), EXTRA_DEFAULTS where peft has none, else None (all-linear)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    found = PEFT.get(model_type) if model_type else None
    if found is None:
        return EXTRA_DEFAULTS.get(model_type) if model_type else None
    return found if isinstance(found, str) else tuple(found)


def resolve_targets(settings: LoraSettings, model: torch.nn.Module) -> LoraSettings:
    """`settings` with the concrete layer-name suffixes it means on `model` (the plain,
    unwrapped model), sorted: what run.json records, so that every worker adapts the same
    layers. "default" is peft's table by `config.model_type` (+ EXTRA_DEFAULTS); a type
    neither knows gets "all-linear": every nn.Linear / Conv1D but the output head. Names the
    user gave must each match linear layers only (not the head): else a CrowdtrainError that
    lists the model's linear layers."""
    layers = _Layers(model)
    kind = f"this {layers.model_type or 'model'}"
    choice = settings.targets
    if choice == (ALL_LINEAR,):
        names = layers.suffixes(layers.linear)
    elif choice == (DEFAULT,):
        want = default_targets(layers.model_type)
        if want is None:
            names = layers.suffixes(layers.linear)
        elif isinstance(want, str):  # a regular expression over whole names
            names = layers.suffixes({n for n in layers.linear if re.fullmatch(want, n)})
        else:
            names = tuple(sorted(t for t in set(want) if layers.adaptable(t)))
        if not names:
            raise CrowdtrainError(f"peft's default LoRA targets for {kind} model ({want}) are "
                                  f"not its linear layers: give --lora-targets all-linear or "
                                  f"names from {layers.listing()}")
    else:
        bad = [t for t in choice if not layers.adaptable(t)]
        if bad:
            raise CrowdtrainError(f"LoRA target(s) {','.join(bad)} name no linear layer of "
                                  f"{kind} model (or name other modules too): choose from "
                                  f"{layers.listing()}, or 'default' or 'all-linear'")
        names = tuple(sorted(set(choice)))
    if not names:
        raise CrowdtrainError(f"{kind} model has no linear layer LoRA could adapt")
    return replace(settings, targets=names)


def wrap(model: torch.nn.Module, settings: LoraSettings, seed: int = 0) -> torch.nn.Module:
    """`model` with LoRA adapters on `settings.targets` (resolved on `model` first; A random
    from `seed`, B zero), the base frozen. The same (model, settings, seed) gives the same
    adapters. Conv1D layers (GPT-2) are adapted with `fan_in_fan_out`."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    settings = resolve_targets(settings, model)
    layers = _Layers(model)
    chosen = [layers.modules[n] for t in settings.targets for n in layers.matched(t)]
    conv1d = all(isinstance(m, Conv1D) for m in chosen)
    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(settings.targets), fan_in_fan_out=conv1d, bias="none",
                     task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers a deprecated question (is_gradient_checkpointing)
        warnings.simplefilter("ignore", FutureWarning)
        # a model with both kinds: peft sets fan_in_fan_out per layer, and says so each time
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set")
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def build_lora_model(config, settings: LoraSettings, base: dict[str, torch.Tensor],
                     seed: int = 0) -> torch.nn.Module:
    """The run's model: `config` with the frozen `base` weights, wrapped with adapters."""
    model = build_model(config, seed=seed)
    load_into(model, base)  # a plain model: every parameter
    return wrap(model, settings, seed)


def base_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_base(path: str | os.PathLike, sha256: str) -> dict[str, torch.Tensor]:
    """The frozen base weights (safetensors, never pickle), checked against their sha256."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise CrowdtrainError(f"the base weights {p} are missing")
    got = base_sha256(p)
    if got != sha256:
        raise CrowdtrainError(f"the base weights {p} are corrupt: sha256 {got[:12]}... != "
                              f"expected {sha256[:12]}...")
    return load_file(str(p))


def save_adapter(model: torch.nn.Module, out_dir: str | os.PathLike,
                 base_name: str | None = None) -> Path:
    """Write the adapters in peft's format (adapter_config.json + adapter_model.safetensors),
    loadable with `PeftModel.from_pretrained(base_model, out_dir)`."""
    out = Path(out_dir)
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    return out


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with the adapters folded into the base weights (in place:
    `model` is consumed)."""
    return model.merge_and_unload()


def export_adapter(run, model: torch.nn.Module, out_dir: str | os.PathLike) -> torch.nn.Module:
    """For export: a LoRA run's `model` writes its adapter to `out_dir/adapter/` and comes back
    merged; any other model comes back as it is."""
    if not is_lora(model):
        return model
    save_adapter(model, Path(out_dir) / ADAPTER_DIR, getattr(run.config, "base_model", None))
    return merge(model)
