"""Build the run's causal language model: a transformers Llama from a named preset, or any
pretrained causal LM that transformers' AutoModelForCausalLM loads from a local folder (Llama,
Qwen2, Mistral, Gemma, Phi-3, GPT-2, OLMo, ...; sharded or not, bf16, fp16 or fp32 weights).

Training keeps fp32 master weights whatever the source's dtype (bf16 autocast on a GPU, see
train.py); the wire carries the run's codec of fp32 deltas; the export writes the source's
dtype back (`source_dtype`). A Hub model id is looked up in the local Hugging Face cache (where
`huggingface-cli download` puts it); the hub is reached only when the user asks
(`resolve_source(..., download=True)`, a thin call into huggingface_hub).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from crowdtrain.errors import CrowdtrainError


@dataclass(frozen=True)
class Preset:
    """Shape of a Llama model; the vocabulary comes from the run's tokenizer."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int
    vocab_size: int  # default tokenizer size for runs made with this preset
    about: str

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError("hidden must be a multiple of heads")


PRESETS: dict[str, Preset] = {
    "tiny": Preset(64, 2, 4, 176, 128, 512, "~0.1M params, for tests"),
    "small": Preset(256, 4, 4, 688, 256, 1024, "~3.4M params, the CPU demo default"),
    "base": Preset(768, 12, 12, 2048, 1024, 32000, "~110M params, for GPU volunteers"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise CrowdtrainError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_config(name: str, vocab_size: int, eot_id: int, bos_id: int | None = None,
                  pad_id: int | None = None) -> LlamaConfig:
    """A Llama of preset `name`; `eot_id` ends documents (and begins and pads them unless the
    tokenizer has its own `bos_id` and `pad_id`)."""
    p = get_preset(name)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.heads,
        max_position_embeddings=p.context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eot_id if bos_id is None else bos_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id if pad_id is None else pad_id,
        initializer_range=0.02,
    )


def load_config(model_dir: str | os.PathLike):
    """The HF config stored in a folder (a run's `model/` or a pretrained model)."""
    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise CrowdtrainError(f"{p} has no config.json: not a Hugging Face model folder")
    return AutoConfig.from_pretrained(str(p), local_files_only=True)


def build_model(config, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised causal LM; the same (config, seed) gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_dtype(config) -> str:
    """The dtype a pretrained folder's weights are stored in (config `dtype`, formerly
    `torch_dtype`): "bfloat16", "float16" or "float32" (the default when it says nothing)."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(d).removeprefix("torch.") if d is not None else "float32"
    return name if name in DTYPES else "float32"


def check_causal_lm(config, where: str | os.PathLike) -> None:
    """CrowdtrainError unless transformers has a causal-LM class for `config`'s architecture."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CrowdtrainError(f"{where} holds a {config.model_type!r} model, which is not a "
                              "causal language model transformers' AutoModelForCausalLM knows")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(src: str | os.PathLike, download: bool = False,
                   flag: str = "--from-pretrained") -> tuple[Path, str | None]:
    """(local folder, Hub id or None) of a pretrained model given as a folder or a Hub id
    (`org/name`). An id is resolved from the local Hugging Face cache; with `download`, a
    missing one is downloaded first (huggingface_hub.snapshot_download)."""
    p = Path(src)
    if p.exists() or not HUB_ID.match(str(src)):
        if not p.is_dir():
            raise CrowdtrainError(f"{flag} {src}: not a folder (pass a model folder or a Hub "
                                  "id such as Qwen/Qwen2.5-0.5B)")
        return p, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo = str(src)
    try:
        return Path(snapshot_download(repo, local_files_only=not download)), repo
    except LocalEntryNotFoundError:
        raise CrowdtrainError(f"{repo} is not in the local Hugging Face cache: download it "
                              f"with `huggingface-cli download {repo}`, or pass --download"
                              ) from None
    except Exception as e:  # network, authorisation, a gated or missing repository
        raise CrowdtrainError(f"cannot download {repo} ({type(e).__name__}: {e})") from None


def load_pretrained(model_dir: str | os.PathLike) -> PreTrainedModel:
    """A pretrained folder's model with fp32 weights (the master copy training updates)."""
    p = Path(model_dir)
    check_causal_lm(load_config(p), p)  # clear error if it is not a causal LM folder
    try:
        return AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True,
                                                    dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise CrowdtrainError(f"cannot load the model in {p}: {e}") from None


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def traveling_parameters(model: torch.nn.Module):
    """(name, parameter) of what checkpoints and the wire carry: every parameter, or for a peft
    (LoRA) model only the trainable adapters (its frozen base is stored once, see lora.py)."""
    peft = getattr(model, "peft_config", None) is not None
    for name, p in model.named_parameters():  # named_parameters() already skips tied duplicates
        if not peft or p.requires_grad:
            yield name, p


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors without tied duplicates, contiguous, on CPU: what checkpoints and the
    wire carry (a LoRA model's adapters only)."""
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, p in traveling_parameters(model):
        if id(p) in seen:
            continue
        seen[id(p)] = name
        out[name] = p.detach().to("cpu").contiguous()
    return out


@torch.no_grad()
def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (as from `state_dict_for_save`) into the model's parameters in place."""
    for name, p in traveling_parameters(model):
        if name not in tensors:
            raise CrowdtrainError(f"weights lack tensor {name}")
        p.copy_(tensors[name])


@torch.no_grad()
def add_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Add `tensors` (named as by `state_dict_for_save`) to the model's parameters in place."""
    for name, p in traveling_parameters(model):
        if name not in tensors:
            raise CrowdtrainError(f"weights lack tensor {name}")
        p.add_(tensors[name].to(p.device, p.dtype))


def config_from_dict(d: dict):
    """Rebuild a HF config from its `to_dict()` form (as sent in the run info)."""
    d = dict(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise CrowdtrainError("model config has no model_type")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as e:
        raise CrowdtrainError(f"cannot build a {model_type!r} model config: {e}") from None


def load_frozen(config: dict, weights: Path, sha256: str) -> PreTrainedModel:
    """A model that is not trained (a distillation run's teacher) from its config and a
    safetensors file of `state_dict_for_save` tensors, after checking the file's sha256."""
    from safetensors.torch import load_file

    from crowdtrain.errors import CorruptDataError
    from crowdtrain.run.checkpoint import check_tensors_match
    from crowdtrain.run.data import file_sha256

    if file_sha256(weights) != sha256:
        raise CorruptDataError(f"{weights}: sha256 differs from the run's record; fetch it "
                               "again")
    model = build_model(config_from_dict(config))
    tensors = load_file(str(weights))
    check_tensors_match(tensors, state_dict_for_save(model), str(weights))
    load_into(model, tensors)
    return model.eval().requires_grad_(False)

