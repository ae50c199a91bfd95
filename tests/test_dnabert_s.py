"""DNABERT-S: the packed forward against the plain per-sequence fp32 reference, the loader, the tokenizer."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, processors, trainers

from vnp_core.config import EmbedConfig
from vnp_core.models import dnabert_s
from vnp_core.models.checkpoint import CheckpointError
from vnp_core.models.dnabert_s import DnabertSTokenizer, alibi_slopes
from vnp_core.models.dnabert_s_checkpoint import load_dnabert_s
from vnp_core.models.reference import dnabert_s_reference
from vnp_core.tiny_models import write_tiny_dnabert_s
from vnp_core.packing import make_batch
from real_genomes import REAL_DATA

BACKENDS = ["sdpa_reference", "sdpa_padded"]


def genome(name: str) -> str:
    lines = (REAL_DATA / name).read_text().splitlines()
    return "".join(line for line in lines if not line.startswith(">"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_dnabert_s(tmp_path_factory.mktemp("dnabert_s"))


@pytest.fixture(scope="module")
def tiny_one_layer(tmp_path_factory) -> Path:
    return write_tiny_dnabert_s(tmp_path_factory.mktemp("dnabert_s_1"), layers=1)


@pytest.fixture(scope="module")
def chunks() -> list[str]:
    """Real phage/viral DNA of assorted lengths, one soft-masked (lower-case) and one of a single base."""
    lam, sars = genome("lambda.fasta"), genome("sars_cov2.fasta")
    return [lam[:500], sars[1000:1300], lam[9000:9001], sars[5000:5500].lower(), lam[20000:20137], sars[:64]]


def embed_packed(model_dir: Path, sequences: list[str], backend: str = "sdpa_padded") -> np.ndarray:
    model = load_dnabert_s(model_dir, EmbedConfig(attention_backend=backend))
    ids = [model.tokenizer.encode(s, f"seq{i}")[0] for i, s in enumerate(sequences)]
    return model.module.embed(make_batch(ids, range(len(ids)))).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_alibi_slopes_match_the_published_values():
    expected = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625,
                0.70710678, 0.35355339, 0.1767767, 0.08838835]
    slopes = alibi_slopes(12)
    assert slopes.dtype == torch.float32
    np.testing.assert_allclose(slopes.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(alibi_slopes(4).numpy(), [0.25, 0.0625, 0.015625, 0.00390625])


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_forward_matches_reference(tiny, chunks, backend):
    packed = embed_packed(tiny, chunks, backend)
    reference = dnabert_s_reference(tiny, chunks)
    assert packed.dtype == np.float32 and packed.shape == (len(chunks), 64)
    assert cosines(packed, reference).min() >= 0.99999
    np.testing.assert_allclose(packed, reference, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_longer_than_alibi_starting_size(tiny_one_layer, backend):
    t4 = genome("t4.fasta")
    long = [t4[:2000], t4[50000:52400], t4[100000:101900]]
    tokens = DnabertSTokenizer(tiny_one_layer / "tokenizer.json").encode_many(long, ["a", "b", "c"]).lengths
    assert tokens.min() > 512 and tokens.max() < 800
    packed = embed_packed(tiny_one_layer, long, backend)
    assert cosines(packed, dnabert_s_reference(tiny_one_layer, long)).min() >= 0.99999


def test_a_pack_of_two_equals_each_alone(tiny, chunks):
    together = embed_packed(tiny, chunks[:2])
    alone = np.concatenate([embed_packed(tiny, [s]) for s in chunks[:2]])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_pooling_is_the_mean_over_all_tokens_including_cls_and_sep(tiny, chunks):
    model = load_dnabert_s(tiny, EmbedConfig())
    ids, _ = model.tokenizer.encode(chunks[4], "r")
    batch = make_batch([ids], [0])
    with torch.inference_mode():
        hidden = model.module(batch)
    pooled = model.module.embed(batch)[0]
    torch.testing.assert_close(pooled, hidden.mean(0))
    assert (pooled - hidden[1:-1].mean(0)).abs().max() > 1e-2


def test_loaded_model_describes_itself(tiny):
    model = load_dnabert_s(tiny, EmbedConfig(attention_backend="auto"))
    weights = tiny / "model.safetensors"
    assert (model.kind, model.name, model.embed_dim, model.attention_backend) == ("dnabert_s", tiny.name, 64, "sdpa_bucketed")
    assert model.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert model.source == str(weights) and "[CLS]" in model.pooling and "[SEP]" in model.pooling


def test_built_in_the_target_dtype_with_fp32_slopes(tiny, chunks):
    model = load_dnabert_s(tiny, EmbedConfig(dtype="bfloat16", attention_backend="sdpa_padded"))
    assert {p.dtype for p in model.module.parameters()} == {torch.bfloat16}
    assert model.module.alibi_slopes.dtype == torch.float32
    ids = [model.tokenizer.encode(s, "r")[0] for s in chunks]
    assert model.module.embed(make_batch(ids, range(len(ids)))).dtype == torch.float32


def copy_with_weights(tiny: Path, out: Path, state: dict[str, torch.Tensor], file_name: str) -> Path:
    out.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (out / name).write_bytes((tiny / name).read_bytes())
    if file_name == "model.safetensors":
        save_file(state, out / file_name)
    else:
        torch.save(state, out / file_name)
    return out


@pytest.mark.parametrize("file_name", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("prefix", ["", "bert."])
def test_loads_both_file_formats_with_or_without_bert_prefix(tiny, chunks, tmp_path, file_name, prefix):
    state = {prefix + key: t for key, t in load_file(tiny / "model.safetensors").items()}
    state["cls.predictions.bias"] = torch.zeros(384)  # DNABERT-2's MLM head, unused
    model_dir = copy_with_weights(tiny, tmp_path / "copy", state, file_name)
    np.testing.assert_array_equal(embed_packed(model_dir, chunks), embed_packed(tiny, chunks))


def test_missing_weight_is_named(tiny, tmp_path):
    state = load_file(tiny / "model.safetensors")
    del state["encoder.layer.1.mlp.wo.bias"]
    model_dir = copy_with_weights(tiny, tmp_path / "copy", state, "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: missing weight 'encoder\.layer\.1\.mlp\.wo\.bias'"):
        load_dnabert_s(model_dir, EmbedConfig())


def test_wrong_shape_is_named(tiny, tmp_path):
    state = load_file(tiny / "model.safetensors")
    state["encoder.layer.0.attention.self.Wqkv.weight"] = torch.zeros(64, 64)
    model_dir = copy_with_weights(tiny, tmp_path / "copy", state, "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: weight 'encoder\.layer\.0\.attention\.self\.Wqkv\.weight' "
                                         r"has shape \(64, 64\), expected \(192, 64\)"):
        load_dnabert_s(model_dir, EmbedConfig())


def test_missing_weights_file_is_named(tiny, tmp_path):
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no DNABERT-S weights"):
        load_dnabert_s(tmp_path, EmbedConfig())


def test_a_truncated_safetensors_file_is_an_error(tiny, tmp_path):
    model_dir = copy_with_weights(tiny, tmp_path / "copy", load_file(tiny / "model.safetensors"), "model.safetensors")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_dnabert_s(model_dir, EmbedConfig())
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        dnabert_s_reference(model_dir, ["ACGT"])


class PlantedCode:
    """Unpickled, it would run code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_weights_file_whose_pickle_would_run_code_is_refused(tiny, tmp_path):
    marker = tmp_path / "code_ran"
    state = {**load_file(tiny / "model.safetensors"), "pooler.dense.weight": PlantedCode(marker)}
    model_dir = copy_with_weights(tiny, tmp_path / "copy", state, "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused: loading it would run code"):
        load_dnabert_s(model_dir, EmbedConfig())
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused"):
        dnabert_s_reference(model_dir, ["ACGT"])
    assert not marker.exists()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda config: config.pop("num_attention_heads"), r"config\.json: missing num_attention_heads"),
    (lambda config: config.update(vocab_size=100), r"tokenizer\.json has 384 tokens, config\.json's vocab_size is 100"),
])
def test_bad_config_is_named(tiny, tmp_path, edit, message):
    model_dir = copy_with_weights(tiny, tmp_path / "copy", load_file(tiny / "model.safetensors"), "model.safetensors")
    config = json.loads((tiny / "config.json").read_text())
    edit(config)
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_dnabert_s(model_dir, EmbedConfig())


def train_tokenizer(special_tokens: list[str], wrap: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=special_tokens, show_progress=False)
    tokenizer.train_from_iterator([genome("phiX174.fasta").upper()], trainer)
    if wrap:
        ids = [(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
        tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=ids)
    return tokenizer


def test_tokenizer_reads_special_ids_from_the_file_and_never_truncates(tmp_path):
    tokenizer = train_tokenizer(["[PAD]", "[MASK]", "[SEP]", "[CLS]", "[UNK]"], wrap=True)
    # A file that asks for truncation and padding: VirNucPro tokenises whole, unpadded sequences.
    tokenizer.enable_truncation(max_length=16)
    tokenizer.enable_padding(length=4096, pad_id=0)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    sequence = genome("phiX174.fasta")[:400]
    ids, truncated = DnabertSTokenizer(tmp_path / "tokenizer.json").encode(sequence, "r")
    assert (ids[0], ids[-1], truncated) == (3, 2, False)
    assert ids.dtype == np.int64 and 16 < len(ids) < 400 and not (ids[1:-1] <= 4).any()


def test_tokenizer_without_cls_sep_template_is_rejected(tmp_path):
    train_tokenizer(["[UNK]", "[CLS]", "[SEP]"], wrap=False).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json: .*\[CLS\] \.\.\. \[SEP\]"):
        DnabertSTokenizer(tmp_path / "tokenizer.json")


def test_tokenizer_upper_cases_counts_and_pickles(tiny, chunks, tmp_path):
    tokenizer = DnabertSTokenizer(tiny / "tokenizer.json")
    np.testing.assert_array_equal(tokenizer.encode(chunks[0].lower(), "a")[0], tokenizer.encode(chunks[0], "b")[0])
    lengths = [len(tokenizer.encode(s, "r")[0]) for s in chunks]
    np.testing.assert_array_equal(tokenizer.encode_many(chunks, [str(i) for i in range(len(chunks))]).lengths, lengths)
    clone = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(clone.encode(chunks[1], "r")[0], tokenizer.encode(chunks[1], "r")[0])
    other = write_tiny_dnabert_s(tmp_path / "other", seed=1)
    assert clone.digest == tokenizer.digest != DnabertSTokenizer(other / "tokenizer.json").digest
    with pytest.raises(ValueError, match="'empty_one'"):
        tokenizer.encode("", "empty_one")


def test_batch_encoding_matches_one_by_one_and_names_an_empty_record(tiny, chunks, monkeypatch):
    tokenizer = DnabertSTokenizer(tiny / "tokenizer.json")
    monkeypatch.setattr(dnabert_s, "_ENCODE_BLOCK", 3)  # several blocks, the last one partial
    sequences = [s.lower() if i % 2 else s for i, s in enumerate(chunks[:5])]
    encoded = tokenizer.encode_many(sequences, [f"r{i}" for i in range(5)])
    assert encoded.truncated == 0 and len(encoded) == 5
    for i, sequence in enumerate(sequences):
        np.testing.assert_array_equal(encoded.sequence(i), tokenizer.encode(sequence, "r")[0])
    for empty_at in (0, 4):
        ids = [f"r{i}" for i in range(5)]
        with pytest.raises(ValueError, match=f"'r{empty_at}': empty nucleotide"):
            tokenizer.encode_many([("" if i == empty_at else chunks[i]) for i in range(5)], ids)


def test_write_tiny_dnabert_s_is_deterministic(tmp_path):
    first, again, other = (write_tiny_dnabert_s(tmp_path / name, seed=seed) for name, seed in
                           (("a", 0), ("b", 0), ("c", 1)))
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (first / name).read_bytes() == (again / name).read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_reference_in_padded_batches_equals_one_sequence_at_a_time(tiny):
    sequences = ["ACGTACGTTTGACCA" * k for k in (1, 2, 2, 3, 7, 10)] + ["GATTACA"]
    one_at_a_time = dnabert_s_reference(tiny, sequences, batch_tokens=0)
    np.testing.assert_allclose(dnabert_s_reference(tiny, sequences, batch_tokens=256), one_at_a_time, atol=1e-5)
