"""`crowdtrain export --format gguf`: the file loads back with transformers' GGUF loader and
gives (nearly) the original's logits, tokens and bits per byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from publish_helpers import train_briefly

from crowdtrain.errors import CrowdtrainError
from crowdtrain.publish.export import export_model
from crowdtrain.publish.gguf_file import permute_qk
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
