"""`crowdtrain export --format gguf` and `write_gguf`: the file loads back with transformers' GGUF
loader and gives (nearly) the original's logits, tokens and bits per byte, for our own runs and
for the open families GGUF supports (llama, mistral, qwen2: `tests/families.py`), each with its
own tokenizer, special tokens and chat template; other architectures get one line to act on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from publish_helpers import train_briefly

from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish import gguf_file
from crowdtrain.publish.export import export_model
from crowdtrain.publish.gguf_file import permute_qk, write_gguf
from crowdtrain.publish.provenance import read_provenance
from crowdtrain.run.data import file_sha256

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF files

TEXT = "ROMEO:\nWhat light through yonder window breaks? It is the east, and Juliet the sun.\n"


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """A briefly trained tiny model: attention that matters, so a wrong q/k layout shows."""
    return train_briefly(tiny_run, tmp_path_factory.mktemp("gguf") / "run", steps=60)


@pytest.fixture(scope="module")
def ggufs(trained, tmp_path_factory):
    base = tmp_path_factory.mktemp("gguf-out")
    return {q: export_model(trained, base / q, fmt="gguf", quant=q) for q in ("q8_0", "f16")}


def load_back(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name,
                                                 dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder), gguf_file=name)


@pytest.mark.parametrize("quant,tolerance", [("f16", 1e-3), ("q8_0", 2e-2)])
def test_gguf_loads_back_with_transformers_and_matches_the_logits(trained, ggufs, quant,
                                                                  tolerance):
    ours, _ = trained.load_model()
    model, tok = load_back(ggufs[quant])
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0].tolist() == trained.tokenizer.encode(TEXT).ids
    with torch.no_grad():
        a = ours.eval()(input_ids=ids).logits
        b = model(input_ids=ids).logits
    scale = float(a.abs().max())
    assert float((a - b).abs().max()) < tolerance * scale
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_gguf_metadata_and_size_and_bits_per_byte(trained, ggufs):
    prov = {q: read_provenance(d) for q, d in ggufs.items()}
    original = prov["f16"].evaluation.bits_per_byte
    for q, p in prov.items():
        g = p.gguf
        assert g.quant == q and g.bytes == (ggufs[q] / g.file).stat().st_size
        assert p.files[g.file]  # hashed
        assert g.evaluation.bits_per_byte == pytest.approx(
            original, rel=1e-3 if q == "f16" else 1e-2)
    assert prov["q8_0"].gguf.bytes < prov["f16"].gguf.bytes \
        < prov["f16"].gguf.original_fp32_bytes
    r = gguf.GGUFReader(str(ggufs["q8_0"] / prov["q8_0"].gguf.file))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("llama.block_count") == 2 and field("llama.context_length") == 128
    assert field("tokenizer.ggml.eos_token_id") == trained.index.eot_id
    names = {t.name for t in r.tensors}
    assert "token_embd.weight" in names and "blk.1.attn_q.weight" in names
    assert "output.weight" not in names  # tied: llama.cpp uses token_embd
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 176: not a multiple of 32
    card = (ggufs["q8_0"] / "README.md").read_text()
    assert "- gguf" in card and "llama-cli -m" in card and "## GGUF" in card


def test_qk_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    p = permute_qk(w, 8)
    assert not np.array_equal(p, w)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(p, 8, 8), w)


def test_a_model_folder_converts_and_evaluates(trained, tmp_path, capsys):
    from crowdtrain.cli.main import main

    hf = export_model(trained, tmp_path / "hf", evaluate=False)
    data = tmp_path / "t.txt"
    data.write_text(TEXT * 20)
    code = main(["export", str(hf), str(tmp_path / "g"), "--format", "gguf", "--quant", "f16",
                 "--eval-data", str(data)])
    out = capsys.readouterr().out
    assert code == 0 and "bits/byte" in out and ".gguf" in out
    prov = read_provenance(tmp_path / "g")
    assert prov.converted_from.model_safetensors == file_sha256(hf / "model.safetensors")
    assert prov.gguf.evaluation.bits_per_byte == pytest.approx(
        prov.evaluation.bits_per_byte, rel=1e-3)
    code = main(["eval", str(tmp_path / "g"), "--data", str(data), "--json"])
    assert code == 0 and "bits_per_byte" in capsys.readouterr().out
    with pytest.raises(CrowdtrainError, match="already a Hugging Face model folder"):
        export_model(hf, tmp_path / "x")
    with pytest.raises(CrowdtrainError, match="unknown export format"):
        export_model(trained, tmp_path / "y", fmt="onnx")


# --- open families: llama, mistral and qwen2 with their own tokenizers -------------------------

SAMPLE = ("line 123: the quick brown fox jumps over the lazy dog.\n\n"
          "A community trains a model together, round after round.")
# measured on these families (q8_0, weights drawn as in `spread`): the logits move by 0.020-0.040
# of the largest one and 89-100% of the argmaxes agree; a q/k permute left out, the key permuted
# with the query head count, the qwen2 biases left out or its q/k permuted move them by 0.59-1.2
Q8_TOLERANCE = 0.08


def spread(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Re-draw the weights at unit-variance scale (std 1/sqrt(fan-in)) and the biases at 0.5: at
    the families' initializer range (0.02) attention is uniform and the biases zero, so a wrong
    q/k layout or a lost bias would not show in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            std = p.shape[1] ** -0.5 if p.ndim == 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (name, folder, fp32 model with spread weights, its transformers tokenizer),
    each family built once for the module."""
    from families import make_family
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built: dict = {}

    def get(name: str):
        if name not in built:
            folder = make_family(name, tmp_path_factory.mktemp(name) / "model")
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
            built[name] = (name, folder, spread(model, seed=sum(name.encode())).eval(),
                           AutoTokenizer.from_pretrained(str(folder)))
        return built[name]

    return get


@pytest.fixture(params=["llama", "mistral", "qwen2"])
def family(request, families):
    return families(request.param)


def read_fields(path) -> tuple[dict, object]:
    """(metadata key -> value, the reader) of a GGUF file."""
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}, r


def test_open_family_writes_gguf_that_loads_back_with_its_logits_and_tokenizer(family, tmp_path):
    from families import FAMILIES

    name, folder, model, hf_tok = family
    fam = FAMILIES[name]
    out = tmp_path / "g"
    out.mkdir()
    info = write_gguf(model, hf_tok, out / "m.gguf", "q8_0", name=f"tiny-{name}")
    assert info.arch == ("qwen2" if name == "qwen2" else "llama")
    assert set(info.tensor_types) == {"Q8_0", "F32"}  # rows of 32 and 64: no f16 fallback

    back, tok = load_back(out)
    ids = hf_tok(SAMPLE, return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = back(input_ids=ids).logits
    assert float((a - b).abs().max()) < Q8_TOLERANCE * float(a.abs().max())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8

    # the tokenizer: same ids with and without the specials it adds, same special tokens
    assert tok(SAMPLE).input_ids == hf_tok(SAMPLE).input_ids
    plain = hf_tok(SAMPLE, add_special_tokens=False).input_ids
    assert tok(SAMPLE, add_special_tokens=False).input_ids == plain
    assert (tok(SAMPLE).input_ids[0] == hf_tok.bos_token_id) is fam.add_bos
    for t in ("bos", "eos", "pad"):
        assert getattr(tok, f"{t}_token_id") == getattr(hf_tok, f"{t}_token_id")
    assert tok.convert_tokens_to_ids(fam.extra[-1]) == hf_tok.convert_tokens_to_ids(fam.extra[-1])
    assert tok.chat_template == fam.chat_template
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == \
        hf_tok.apply_chat_template(chat, tokenize=False)

    fields, reader = read_fields(out / "m.gguf")
    arch = info.arch
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.attention.head_count"] == 4
    assert fields[f"{arch}.attention.head_count_kv"] == 2  # grouped-query attention
    assert fields[f"{arch}.context_length"] == 256 and fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(model.config.rope_parameters[
        "rope_theta"])
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(
        model.config.rms_norm_eps)
    # transformers' Qwen2Tokenizer splits with Qwen2's own rule whatever tokenizer.json says
    assert fields["tokenizer.ggml.pre"] == ("qwen2" if name == "qwen2" else "gpt-2")
    assert fields["tokenizer.ggml.add_bos_token"] is fam.add_bos
    names = {t.name for t in reader.tensors}
    assert "output.weight" in names  # untied
    assert ("blk.0.attn_q.bias" in names) is (name == "qwen2")
    # the padded embedding rows: [PAD{id}] tokens of type UNUSED, the specials CONTROL
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    n = len(hf_tok)
    assert len(tokens) == model.config.vocab_size > n
    assert tokens[n] == f"[PAD{n}]" and set(types[n:]) == {int(gguf.TokenType.UNUSED)}
    assert types[hf_tok.eos_token_id] == int(gguf.TokenType.CONTROL)
    assert types[hf_tok.convert_tokens_to_ids("Ġthe")] == int(gguf.TokenType.NORMAL)


def test_special_ids_from_keywords_take_precedence(families, tmp_path):
    from tokenizers import Tokenizer

    _, folder, model, _ = families("mistral")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # eot_id alone: bos = eos = pad = eot and no bos added, as for our own runs
    write_gguf(model, tok, tmp_path / "a.gguf", eot_id=1)
    f, _ = read_fields(tmp_path / "a.gguf")
    assert [f[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id",
                                               "padding_token_id")] == [1, 1, 1]
    assert f["tokenizer.ggml.add_bos_token"] is False and "tokenizer.chat_template" not in f
    # the keywords win over eot_id; without a transformers tokenizer the bos rule is read off
    # the tokenizer's post-processor, and the model config gives what is not named
    write_gguf(model, tok, tmp_path / "b.gguf", eot_id=1, bos_id=0, pad_id=2, add_bos=True,
               chat_template="{{ messages }}")
    f, _ = read_fields(tmp_path / "b.gguf")
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (0, 1, 2)
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.chat_template"] == "{{ messages }}"
    write_gguf(model, tok, tmp_path / "c.gguf")
    f, _ = read_fields(tmp_path / "c.gguf")
    assert f["tokenizer.ggml.bos_token_id"] == model.config.bos_token_id == 0
    assert f["tokenizer.ggml.eos_token_id"] == model.config.eos_token_id == 1
    assert "tokenizer.ggml.padding_token_id" not in f  # the family has no pad token
    assert f["tokenizer.ggml.add_bos_token"] is True  # its post-processor adds <s>
    with pytest.raises(CrowdtrainError, match="outside the model's vocabulary"):
        write_gguf(model, tok, tmp_path / "d.gguf", bos_id=10_000)


@pytest.mark.parametrize("pattern,pre", [(gguf_file._QWEN2_SPLIT, "qwen2"),
                                         (gguf_file._LLAMA3_SPLIT, "llama-bpe")])
def test_split_pre_tokenizers_are_recognised_and_load_back(families, tmp_path, pattern, pre):
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer

    _, folder, model, _ = families("qwen2")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    gpt2_ids = tok.encode(SAMPLE).ids
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert tok.encode(SAMPLE).ids != gpt2_ids  # the split matters for this text
    write_gguf(model, tok, tmp_path / "m.gguf")
    assert read_fields(tmp_path / "m.gguf")[0]["tokenizer.ggml.pre"] == pre
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert back(SAMPLE).input_ids == tok.encode(SAMPLE).ids

    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+"), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pytest.raises(CrowdtrainError, match="splits text in a way llama.cpp does not know"):
        write_gguf(model, tok, tmp_path / "x.gguf")


@pytest.mark.parametrize("name", ["gemma", "phi3", "gpt2"])
def test_other_architectures_get_one_line_saying_what_to_do(name, tmp_path):
    from families import make_family
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    folder = make_family(name, tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with pytest.raises(CrowdtrainError) as e:
        write_gguf(model, tok, tmp_path / "m.gguf")
    assert str(e.value) == (f"GGUF export supports llama, mistral and qwen2 models; this is a "
                            f"{name} model: export --format hf and convert it with llama.cpp's "
                            "convert_hf_to_gguf.py")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_a_tokenizer_that_is_not_byte_level_bpe_is_refused(families, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = families("llama")[2]
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(CrowdtrainError, match="supports byte-level BPE tokenizers; this one is "
                                              "WordLevel: export --format hf") as e:
        write_gguf(model, words, tmp_path / "m.gguf")
    assert "\n" not in str(e.value)
