"""Packed ESM-2 against fair-esm's own fp32 `ESM2` (and Hugging Face's `EsmModel`) on tiny random models."""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import shutil

import esm
import numpy as np
import pytest
import torch
from esm.model.esm2 import ESM2

from vnp_core.config import EmbedConfig
from vnp_core.models import esm2_checkpoint
from vnp_core.models.checkpoint import CheckpointError
from vnp_core.models.esm2 import (
    CLS, EOS, MASK, PAD, POOLING, RESIDUES, TOKENS, UNK, ESM2Config, ESM2Tokenizer, PackedESM2,
)
from vnp_core.models.esm2_checkpoint import describe_esm2, load_esm2
from vnp_core.models.reference import esm2_reference
from vnp_core.tiny_models import write_tiny_esm2
from vnp_core.packing import make_batch

AMINO_ACIDS = "LAGVSERTIDPKQNFYMHWCXBUZO"  # all 25 residue letters of the alphabet
SEQUENCES = ["M", "MKV", AMINO_ACIDS, "MSTNPKPQRKTKRNTNRRPQDVKFPGG" * 3, AMINO_ACIDS[::-1] * 4 + "W"]
FP32 = EmbedConfig()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def pack(sequences: list[str], tokenizer: ESM2Tokenizer = ESM2Tokenizer()):
    return make_batch([tokenizer.encode(s, f"seq{i}")[0] for i, s in enumerate(sequences)], range(len(sequences)))


def fair_esm_model(path, token_dropout: bool = True) -> ESM2:
    """fair-esm's own loader (its Namespace config needs allow-listing under torch >= 2.6)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        model, _ = esm.pretrained.load_model_and_alphabet_local(path)
    if not token_dropout:
        model.token_dropout = False
    return model.eval()


def fair_esm_embed(model: ESM2, token_ids: list[np.ndarray]) -> np.ndarray:
    """One sequence at a time, unpadded: the mean of the last representation over the residues."""
    out = []
    with torch.inference_mode():
        for ids in token_ids:
            hidden = model(torch.as_tensor(ids)[None], repr_layers=[model.num_layers])["representations"][model.num_layers]
            out.append(hidden[0, 1:-1].mean(0).numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_esm2(tmp_path_factory.mktemp("esm") / "esm2_t2_tiny.pt")


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return write_tiny_esm2(tmp_path_factory.mktemp("esm") / "esm2_t1_tiny.pt", num_layers=1, seed=1)


@pytest.fixture(scope="module")
def model(tiny) -> PackedESM2:
    return load_esm2(tiny, FP32).module


# ---------------------------------------------------------------------------------------- tokens


def test_alphabet_is_fair_esm_esm1b():
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    assert TOKENS == tuple(alphabet.all_toks)
    assert (CLS, PAD, EOS, UNK, MASK) == (alphabet.cls_idx, alphabet.padding_idx, alphabet.eos_idx,
                                          alphabet.unk_idx, alphabet.mask_idx)
    assert set(AMINO_ACIDS) <= set(RESIDUES)


def test_tokenizer_matches_fair_esm_batch_converter():
    convert = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    for sequence in SEQUENCES:
        ids, truncated = ESM2Tokenizer().encode(sequence, "r")
        assert not truncated
        assert ids.tolist() == convert([("r", sequence)])[2][0].tolist()


def test_tokenizer_keeps_the_n_terminal_residues():
    sequence = "M" + "A" * 1020 + "KW"  # 1023 residues
    ids, truncated = ESM2Tokenizer().encode(sequence, "long")
    assert truncated and len(ids) == 1024
    assert ids[0] == CLS and ids[1] == TOKENS.index("M") and ids[-2] == TOKENS.index("K") and ids[-1] == EOS
    fits, truncated = ESM2Tokenizer().encode(sequence[:1022], "fits")
    assert not truncated and np.array_equal(fits, ids)
    untruncated, truncated = ESM2Tokenizer(max_residues=None).encode(sequence, "long")
    assert not truncated and len(untruncated) == 1025


@pytest.mark.parametrize("sequence, letter", [("MKJV", "J"), ("MKaV", "a"), ("MK*V", "*"), ("MKéV", "é"), ("MK V", " ")])
def test_unknown_letter_names_record_letter_and_position(sequence, letter):
    with pytest.raises(ValueError, match=rf"record 'contig_7_f2'.*{letter!r}.*position 3"):
        ESM2Tokenizer().encode(sequence, "contig_7_f2")


def test_empty_sequence_is_an_error():
    with pytest.raises(ValueError, match="'p1'.*empty"):
        ESM2Tokenizer().encode("", "p1")


def test_encode_many_matches_encode_and_names_the_first_bad_record():
    tokenizer = ESM2Tokenizer(max_residues=6)
    sequences = [*SEQUENCES, "MKVLAGVS", "Q", "MKVLAG"]  # truncated, one residue, exactly at the limit
    encoded = tokenizer.encode_many(sequences, [f"r{i}" for i in range(len(sequences))])
    one_by_one = [tokenizer.encode(sequence, "r") for sequence in sequences]
    assert encoded.truncated == sum(truncated for _, truncated in one_by_one)
    for i, (ids, _) in enumerate(one_by_one):
        assert encoded.sequence(i).tolist() == ids.tolist()
    for bad, message in ((["MKV", "MKéV", ""], "'r1'.*'é'.*position 3"), (["MKV", "", "MKJ"], "'r1'.*empty")):
        with pytest.raises(ValueError, match=message):
            tokenizer.encode_many(bad, ["r0", "r1", "r2"])


def test_tokenizer_pickles():
    tokenizer = pickle.loads(pickle.dumps(ESM2Tokenizer(max_residues=7)))
    assert tokenizer.encode("MKVLAGVS", "r")[1] and len(tokenizer.encode("MKVLAGVS", "r")[0]) == 9


# ----------------------------------------------------------------------------- packed vs fair-esm


def test_packed_matches_fair_esm(tiny, model):
    token_ids = [ESM2Tokenizer().encode(s, "r")[0] for s in SEQUENCES]
    ours = model.embed(make_batch(token_ids, range(len(token_ids)))).numpy()
    reference = fair_esm_embed(fair_esm_model(tiny), token_ids)
    assert cosine(ours, reference).min() >= 0.99999
    assert np.abs(ours - reference).max() < 1e-5


def test_long_proteins_are_truncated_and_still_match(one_layer):
    sequences = ["W", AMINO_ACIDS * 40 + "M", (AMINO_ACIDS * 41)[:1022] + "W" * 478]  # 1, 1001 and 1500 residues
    tokenizer = ESM2Tokenizer()
    assert [tokenizer.encode(s, "r")[1] for s in sequences] == [False, False, True]
    ours = load_esm2(one_layer, FP32).module.embed(pack(sequences)).numpy()
    reference = esm2_reference(one_layer, sequences)
    assert cosine(ours, reference).min() >= 0.99999
    assert np.abs(ours - reference).max() < 1e-5
    # The truncated protein is the N-terminal 1022 residues, not the whole.
    whole = esm2_reference(one_layer, sequences[2:], max_residues=None)
    assert cosine(ours[2:], whole)[0] < 0.99


def test_esm2_reference_in_padded_batches_equals_one_protein_at_a_time(tiny):
    from vnp_core.models.reference import _length_batches

    sequences = [*SEQUENCES, "M" * 40, "MKV"]
    batched = _length_batches([len(s) + 2 for s in sequences], 64)
    assert sorted(i for batch in batched for i in batch) == list(range(len(sequences)))
    assert len(batched) < len(sequences) and all(len(b) * (max(len(sequences[i]) for i in b) + 2) <= 64
                                                  for b in batched if len(b) > 1)
    one_at_a_time = esm2_reference(tiny, sequences, batch_tokens=0)
    np.testing.assert_allclose(esm2_reference(tiny, sequences, batch_tokens=64), one_at_a_time, atol=1e-6)


def test_esm2_reference_is_fair_esm_loaded_by_fair_esm(tiny):
    token_ids = [ESM2Tokenizer().encode(s, "r")[0] for s in SEQUENCES]
    np.testing.assert_allclose(esm2_reference(tiny, SEQUENCES), fair_esm_embed(fair_esm_model(tiny), token_ids),
                               atol=1e-6)


def test_a_pack_equals_its_sequences_alone(model):
    """Nothing leaks across a boundary: attention, token-dropout scale, positions.

    Rotary makes q.k depend on relative positions only, so a position offset within a segment is
    invisible in fp32 at these lengths; restarting positions keeps angles small for precision.
    """
    a, b = SEQUENCES[3], SEQUENCES[4]
    together = model.embed(pack([a, b]))
    apart = torch.cat([model.embed(pack([a])), model.embed(pack([b]))])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)


def test_pooling_is_the_mean_over_residues_only(model):
    hidden = model(pack(["MKVLAGW"]))
    pooled = model.embed(pack(["MKVLAGW"]))[0]
    torch.testing.assert_close(pooled, hidden[1:-1].mean(0))
    assert not torch.allclose(pooled, hidden.mean(0), atol=1e-3)
    assert not torch.allclose(pooled, hidden[1:].mean(0), atol=1e-3)


def test_token_dropout_rescale_per_sequence_with_masks(tiny, model):
    token_ids = [ESM2Tokenizer().encode(s, "r")[0] for s in SEQUENCES[2:]]
    token_ids[0][[3, 5]] = MASK  # each sequence its own mask ratio: 2/27, 1/83, 0
    token_ids[1][10] = MASK
    ours = model.embed(make_batch(token_ids, range(3))).numpy()
    reference = fair_esm_embed(fair_esm_model(tiny), token_ids)
    assert cosine(ours, reference).min() >= 0.99999
    assert np.abs(ours - reference).max() < 1e-5
    # Without the 0.88 rescale every layer sees a different residual stream.
    unscaled = fair_esm_embed(fair_esm_model(tiny, token_dropout=False), token_ids)
    assert np.abs(ours - unscaled).max() > 1e-2


def test_cpu_attention_back_ends_agree(tiny):
    batch = pack(SEQUENCES)
    reference = load_esm2(tiny, EmbedConfig(attention_backend="sdpa_reference")).module.embed(batch)
    padded = load_esm2(tiny, EmbedConfig(attention_backend="sdpa_padded")).module.embed(batch)
    torch.testing.assert_close(padded, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_within_the_spec_threshold(tiny, dtype):
    loaded = load_esm2(tiny, EmbedConfig(dtype=dtype))
    assert next(loaded.module.parameters()).dtype == getattr(torch, dtype)
    pooled = loaded.module.embed(pack(SEQUENCES))
    assert pooled.dtype == torch.float32
    assert cosine(pooled.numpy(), esm2_reference(tiny, SEQUENCES)).min() >= 0.995


def test_from_config_gives_a_random_model_of_that_shape():
    model = PackedESM2.from_config(ESM2Config(1, 32, 2), "cpu", torch.bfloat16, "sdpa_padded")
    pooled = model.embed(pack(SEQUENCES[:2]))
    assert pooled.shape == (2, 32) and torch.isfinite(pooled).all()
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training


# ---------------------------------------------------------------------------------------- loaders


def test_load_esm2_records_what_was_loaded(tiny):
    loaded = load_esm2(tiny, EmbedConfig(max_protein_length=500))
    assert (loaded.kind, loaded.name, loaded.embed_dim, loaded.source) == ("esm2", "esm2_t2_tiny", 64, str(tiny))
    assert loaded.weights_sha256 == hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert (loaded.dtype, loaded.attention_backend, loaded.pooling) == (torch.float32, "sdpa_bucketed", POOLING)
    assert loaded.tokenizer == ESM2Tokenizer(500)


def _rewrite(source, target, edit):
    data = torch.load(source, weights_only=False)
    edit(data)
    torch.save(data, target)
    return target


def test_prefixed_fair_esm_keys(tiny, model, tmp_path):
    def add_prefixes(data):
        data["model"] = {("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
                         for k, v in data["model"].items()}

    prefixed = _rewrite(tiny, tmp_path / "prefixed.pt", add_prefixes)
    batch = pack(SEQUENCES)
    torch.testing.assert_close(load_esm2(prefixed, FP32).module.embed(batch), model.embed(batch), atol=0, rtol=0)


def test_config_inferred_for_a_released_width_without_cfg(tmp_path):
    # 320 wide is the 8M layout, whose 20 heads of 16 no shape reveals.
    source = write_tiny_esm2(tmp_path / "esm2_t1_320.pt", num_layers=1, embed_dim=320, attention_heads=20)
    no_cfg = _rewrite(source, tmp_path / "no_cfg.pt", lambda data: data.pop("cfg"))
    loaded = load_esm2(no_cfg, FP32)
    assert loaded.module.cfg == ESM2Config(1, 320, 20)
    ours = loaded.module.embed(pack(SEQUENCES[:3])).numpy()
    assert cosine(ours, esm2_reference(source, SEQUENCES[:3])).min() >= 0.99999


def test_unknown_width_without_cfg_is_an_error(tiny, tmp_path):
    no_cfg = _rewrite(tiny, tmp_path / "no_cfg.pt", lambda data: data.pop("cfg"))
    with pytest.raises(ValueError, match="no_cfg.pt.*attention heads"):
        load_esm2(no_cfg, FP32)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("layers.1.fc2.bias"), "missing weight 'layers.1.fc2.bias'"),
    (lambda sd: sd.update({"layers.0.fc1.weight": torch.zeros(128, 64)}), r"'layers.0.fc1.weight' has shape \(128, 64\)"),
    (lambda sd: sd.update({"emb_layer_norm_before.weight": torch.ones(64)}), "unexpected.*emb_layer_norm_before"),
])
def test_bad_weights_name_the_file_and_key(tiny, tmp_path, edit, message):
    broken = _rewrite(tiny, tmp_path / "broken.pt", lambda data: edit(data["model"]))
    with pytest.raises(ValueError, match=f"broken.pt.*{message}"):
        load_esm2(broken, FP32)


def test_a_file_that_is_no_checkpoint_is_an_error(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pt: not a readable torch checkpoint"):
        load_esm2(tmp_path / "notes.pt", FP32)


class PlantedCode:
    """Unpickled, it would run code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("where", ["cfg", "weights"])
def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tiny, tmp_path, where):
    marker = tmp_path / "code_ran"

    def plant(data):
        if where == "cfg":
            data["cfg"]["model"] = PlantedCode(marker)
        else:
            data["model"]["layers.0.fc1.weight"] = PlantedCode(marker)

    planted = _rewrite(tiny, tmp_path / "esm2_planted.pt", plant)
    with pytest.raises(CheckpointError, match=r"esm2_planted\.pt: refused: loading it would run code"):
        load_esm2(planted, FP32)
    with pytest.raises(CheckpointError, match=r"esm2_planted\.pt: refused"):
        esm2_reference(planted, SEQUENCES[:1])
    assert not marker.exists()


def test_a_truncated_checkpoint_is_an_error(tiny, tmp_path):
    truncated = tmp_path / "esm2_truncated.pt"
    truncated.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"esm2_truncated\.pt: not a readable torch checkpoint"):
        load_esm2(truncated, FP32)


def test_model_name_from_the_local_hub_cache_only(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"esm2_t2_tiny.pt at {tmp_path}/checkpoints"):
        load_esm2("esm2_t2_tiny", FP32)
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(tiny, tmp_path / "checkpoints" / tiny.name)
    assert load_esm2("esm2_t2_tiny", FP32).name == "esm2_t2_tiny"


def _hf_esm(head: bool):
    from transformers import EsmConfig, EsmForMaskedLM, EsmModel

    config = EsmConfig(vocab_size=33, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                       position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                       layer_norm_eps=1e-5, mask_token_id=MASK, pad_token_id=PAD)
    torch.manual_seed(0)
    model = EsmForMaskedLM(config) if head else EsmModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("head, shard_size", [(False, None), (True, "20KB")], ids=["EsmModel", "EsmForMaskedLM-sharded"])
def test_hugging_face_directory_matches_hf_forward(tmp_path, head, shard_size):
    hf = _hf_esm(head)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    encoder = hf.esm if head else hf
    token_ids = [ESM2Tokenizer().encode(s, "r")[0] for s in SEQUENCES]
    with torch.inference_mode():
        reference = np.stack([encoder(torch.as_tensor(ids)[None]).last_hidden_state[0, 1:-1].mean(0).numpy()
                              for ids in token_ids])
    ours = load_esm2(tmp_path, FP32).module.embed(make_batch(token_ids, range(len(token_ids)))).numpy()
    assert cosine(ours, reference).min() >= 0.99999


def test_a_hugging_face_directory_is_described_from_its_config_without_reading_its_tensors(tmp_path, monkeypatch):
    _hf_esm(head=False).save_pretrained(tmp_path, max_shard_size="20KB")
    loaded = load_esm2(tmp_path, FP32)
    monkeypatch.setattr(esm2_checkpoint, "read_tensors", None)  # any call fails
    assert describe_esm2(tmp_path, FP32) == loaded.description


def test_hugging_face_config_of_another_architecture_is_an_error(tmp_path):
    _hf_esm(head=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "position_embedding_type": "absolute"}))
    with pytest.raises(ValueError, match="config.json: position_embedding_type is 'absolute'"):
        load_esm2(tmp_path, FP32)
