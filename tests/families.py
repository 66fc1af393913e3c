"""Small random models of the open families people download, saved the way a download from the
Hugging Face Hub looks: sharded bf16 safetensors with an index file, config.json and
generation_config.json, the family's own tokenizer (tokenizer.json + tokenizer_config.json)
with its own special tokens, a chat template where the family's chat models have one, and for
some a model card with a license.

The tokenizers are byte-level BPE trained on a little text, with each family's special tokens
and its rule for a beginning-of-sequence token (Llama 2, Mistral and Gemma add one to every
text; Qwen2, Phi-3 and GPT-2 do not). `make_family(name, folder)` writes one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

# a ChatML template (Qwen2's chat format): each turn between <|im_start|>role and <|im_end|>
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# a Llama-2-style template: [INST] user [/INST] answer</s>, with the bos token in front
INST = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """One family's architecture and tokenizer conventions."""

    model_type: str
    bos: str | None
    eos: str
    pad: str | None
    add_bos: bool
    extra: tuple[str, ...] = ()  # more special tokens
    chat_template: str | None = None
    license: str | None = None
    config: dict = field(default_factory=dict)  # the architecture's own keywords


FAMILIES: dict[str, Family] = {
    # Llama 2 / TinyLlama: <s> added to every text, </s> ends a sequence, no pad token
    "llama": Family("llama", "<s>", "</s>", None, True, ("<unk>",), INST, "llama2",
                    {"num_key_value_heads": 2}),
    "qwen2": Family("qwen2", None, "<|endoftext|>", "<|endoftext|>", False,
                    ("<|im_start|>", "<|im_end|>"), CHATML, "apache-2.0",
                    {"num_key_value_heads": 2}),
    "mistral": Family("mistral", "<s>", "</s>", None, True, ("<unk>",), INST, "apache-2.0",
                      {"num_key_value_heads": 2, "sliding_window": None}),
    "gemma": Family("gemma", "<bos>", "<eos>", "<pad>", True,
                    ("<start_of_turn>", "<end_of_turn>"), None, "gemma",
                    {"num_key_value_heads": 1, "head_dim": 8}),
    "phi3": Family("phi3", "<s>", "<|endoftext|>", "<|endoftext|>", False,
                   ("<|user|>", "<|assistant|>", "<|end|>"), None, "mit",
                   {"num_key_value_heads": 4}),
    "gpt2": Family("gpt2", "<|endoftext|>", "<|endoftext|>", None, False, (), None, "mit"),
}

TEXT = (
    "The quick brown fox jumps over the lazy dog. A community trains a model together, "
    "round after round, on the text it cares about.\n"
) * 40 + "".join(f"line {i}: the swarm merges what volunteers send.\n" for i in range(200))


def specials(fam: Family) -> list[str]:
    """The family's special tokens, each once, in a fixed order."""
    out: list[str] = []
    for t in (fam.bos, fam.eos, fam.pad, *fam.extra):
        if t is not None and t not in out:
            out.append(t)
    return out


def make_tokenizer(fam: Family, vocab_size: int = 400):
    """The family's tokenizer as transformers saves it (PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials(fam),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    if fam.add_bos:
        bos_id = tok.token_to_id(fam.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
            special_tokens=[(fam.bos, bos_id)])
    kw = {"bos_token": fam.bos, "eos_token": fam.eos}
    if fam.pad is not None:
        kw["pad_token"] = fam.pad
    if "<unk>" in fam.extra:
        kw["unk_token"] = "<unk>"
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    if fam.chat_template is not None:
        hf.chat_template = fam.chat_template
    return hf


def make_config(fam: Family, vocab_size: int, bos_id, eos_id, pad_id):
    """A tiny random config of the family (hidden 32, 2 layers, 4 heads, context 256)."""
    from transformers import AutoConfig

    common = {"vocab_size": vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id,
              "pad_token_id": pad_id}
    if fam.model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                    **common)
    return AutoConfig.for_model(fam.model_type, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=256, **fam.config, **common)


def make_family(name: str, folder: Path, seed: int = 0, dtype=torch.bfloat16,
                max_shard_size: str = "40KB") -> Path:
    """Write a small random model of family `name` to `folder`, as a Hub download looks:
    sharded `dtype` safetensors + index, config, generation config, tokenizer files, and a
    README.md with the family's license. Returns `folder`."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    fam = FAMILIES[name]
    folder = Path(folder)
    tok = make_tokenizer(fam)
    n = len(tok)
    ids = {k: (tok.convert_tokens_to_ids(t) if t is not None else None)
           for k, t in (("bos", fam.bos), ("eos", fam.eos), ("pad", fam.pad))}
    config = make_config(fam, (n + 63) // 64 * 64, ids["bos"], ids["eos"], ids["pad"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(dtype)
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                               pad_token_id=ids["pad"])
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    tok.save_pretrained(str(folder))
    if fam.license is not None:
        (folder / "README.md").write_text(
            f"---\nlicense: {fam.license}\nlanguage:\n- en\n---\n\n# tiny-{name}\n\n"
            "A small random model for tests.\n", encoding="utf-8")
    return folder
