"""LoRA fine-tuning of a pretrained model with peft: the settings, the wrapped model, what
travels, and the export in peft's own format.

In a LoRA run the pretrained weights are frozen and stored once in the run directory
(`model/base.safetensors`, its sha256 in run.json); workers download them once
(`GET /v1/base`, content-addressed and sha256-checked). Everything the swarm moves per round
(checkpoints, payloads, updates: "theta") is the adapter tensors only, because
`model.state_dict_for_save` and `model.load_into` see just the trainable parameters of a peft
model. So the coordinator, the codecs, robust aggregation and the hash chain work unchanged.

peft is imported only when a LoRA model is built or exported (it is slow to import).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from crowdtrain.errors import CrowdtrainError, check_settings
from crowdtrain.run.model import build_model, load_into

BASE_FILE = "base.safetensors"  # in the run's model/ folder
ADAPTER_DIR = "adapter"  # in an exported folder

# Llama linear layers LoRA can adapt
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_targets(text: str) -> tuple[str, ...]:
    """`q_proj,v_proj` or `all` (every Llama linear layer)."""
    if text.strip() == "all":
        return LLAMA_TARGETS
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in targets if t not in LLAMA_TARGETS]
    if bad or not targets:
        raise CrowdtrainError(f"unknown LoRA target(s) {', '.join(bad) or '(none)'}: choose "
                              f"from {','.join(LLAMA_TARGETS)} or 'all'")
    return targets


@dataclass(frozen=True)
class LoraSettings:
    """The adapters of a LoRA run: rank, scale (alpha / rank), dropout, adapted layers. Each is
    a `crowdtrain init` option, `--lora-` + its name (crowdtrain.cli.options)."""

    rank: int = field(default=8, metadata={"help": "adapter rank r"})
    alpha: float = field(default=16.0, metadata={"help": "adapter scale alpha; scaling alpha/r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    targets: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={
        "metavar": "NAMES", "parse": parse_targets,
        "help": f"comma-separated layers to adapt, from {','.join(LLAMA_TARGETS)}, or 'all'"})

    def __post_init__(self) -> None:
        targets = tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        check_settings("lora", {
            "rank": isinstance(self.rank, int) and 1 <= self.rank <= 4096,
            "alpha": 0 < self.alpha <= 1e4,
            "dropout": 0 <= self.dropout < 1,
            "targets": bool(targets) and len(set(targets)) == len(targets)
            and all(t in LLAMA_TARGETS for t in targets),
        }, self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    parse_targets = staticmethod(parse_targets)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft model (its frozen base does not travel)."""
    return getattr(model, "peft_config", None) is not None


def wrap(model: torch.nn.Module, settings: LoraSettings, seed: int = 0) -> torch.nn.Module:
    """`model` with LoRA adapters on `settings.targets` (A random from `seed`, B zero), the
    base frozen. The same (model, settings, seed) gives the same adapters."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(settings.targets), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers a deprecated question (is_gradient_checkpointing)
        warnings.simplefilter("ignore", FutureWarning)
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
