import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vnp_core.classify import (
    LoadedClassifier,
    VirNucProClassifier,
    chunk_calls,
    load_classifier,
    predict,
    write_prediction_files,
)
from vnp_core.config import PrepConfig
from vnp_core.index import build_index
from vnp_core.prep import prepare_fasta
from vnp_core.tiny_models import write_tiny_classifier
from real_genomes import REAL_DATA


IN_FEATURES = 24


class MLPClassifier(nn.Module):
    """The original VirNucPro classifier as its train.py defines it (the names its pickles refer to)."""

    def __init__(self, input_dim, hidden_dim, num_class):
        super().__init__()
        self.hidden_layer = nn.Linear(input_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, num_class)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.output_layer(self.dropout(F.relu(self.bn1(self.hidden_layer(x)))))


def features(rows: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, IN_FEATURES)).astype(np.float32)


def frame_ids(rows: int) -> list[str]:
    return [f"seq_chunk_{i // 6 + 1}{'FR'[i % 6 // 3]}{i % 3 + 1}" for i in range(rows)]


def test_both_saved_forms_load_and_score_alike(tmp_path):
    paths = write_tiny_classifier(tmp_path, in_features=IN_FEATURES, chunk_length=300)

    from_state_dict = load_classifier(paths["state_dict"])
    from_pickle = load_classifier(paths["pickled_module"], trusted_pickle=True)

    assert from_state_dict.chunk_length == from_pickle.chunk_length == 300
    assert from_state_dict.in_features == IN_FEATURES
    assert not from_state_dict.module.training
    frames = predict(from_state_dict, frame_ids(12), features(12), chunk_length=300)
    assert frames.columns == ["frame_id", "prediction", "score1", "score2"]
    assert frames.equals(predict(from_pickle, frame_ids(12), features(12), chunk_length=300))
    np.testing.assert_allclose((frames["score1"] + frames["score2"]).to_numpy(), 1.0, rtol=1e-6)


def test_pickled_module_is_refused_without_the_trust_flag(tmp_path):
    paths = write_tiny_classifier(tmp_path, in_features=IN_FEATURES, chunk_length=500)

    with pytest.raises(ValueError, match=r"(?s)500_model\.pth.*runs code.*trusted_pickle=True"):
        load_classifier(paths["pickled_module"])


def test_original_main_module_pickle_loads(tmp_path, monkeypatch):
    # train.py ran as a script: its pickle names `__main__.MLPClassifier`, importable nowhere later.
    torch.manual_seed(0)
    original = MLPClassifier(IN_FEATURES, 16, 2).eval()
    original.bn1.running_mean.normal_()
    path = tmp_path / "500_model.pth"
    with monkeypatch.context() as patch:
        patch.setattr(MLPClassifier, "__module__", "__main__")
        patch.setattr(sys.modules["__main__"], "MLPClassifier", MLPClassifier, raising=False)
        torch.save(original, path)
    assert not hasattr(sys.modules["__main__"], "MLPClassifier")

    loaded = load_classifier(path, trusted_pickle=True)

    assert loaded.chunk_length == 500 and isinstance(loaded.module, VirNucProClassifier)
    frames = predict(loaded, frame_ids(6), features(6), chunk_length=500)
    with torch.no_grad():
        expected = F.softmax(original(torch.from_numpy(features(6))), dim=1).numpy()
    np.testing.assert_allclose(frames.select("score1", "score2").to_numpy(), expected, rtol=1e-6)


def test_chunk_length_comes_from_the_file_or_its_original_name(tmp_path):
    state_dict = VirNucProClassifier(IN_FEATURES).state_dict()
    torch.save(state_dict, tmp_path / "300_model.pth")
    torch.save(state_dict, tmp_path / "classifier.pth")

    assert load_classifier(tmp_path / "300_model.pth").chunk_length == 300
    with pytest.raises(ValueError, match=r"classifier\.pth: cannot tell which chunk length"):
        load_classifier(tmp_path / "classifier.pth")
    (tmp_path / "500_model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"500_model\.pth: not a PyTorch file"):
        load_classifier(tmp_path / "500_model.pth", trusted_pickle=True)


def test_features_given_as_column_groups_score_as_the_joined_matrix(tmp_path, monkeypatch):
    # The merged file's models side by side, joined a block at a time, blocks smaller than the sample.
    import vnp_core.classify as classify

    classifier = load_classifier(write_tiny_classifier(tmp_path, in_features=IN_FEATURES, chunk_length=300)["state_dict"])
    whole = features(12)
    monkeypatch.setattr(classify, "_ROWS_PER_FORWARD", 5)
    joined = predict(classifier, frame_ids(12), whole, chunk_length=300)
    assert predict(classifier, frame_ids(12), [whole[:, :7], whole[:, 7:]], chunk_length=300).equals(joined)
    bad = whole.copy()
    bad[[3, 11], 9] = np.inf
    with pytest.raises(ValueError, match=r"^2 feature rows contain NaN/Inf"):
        predict(classifier, frame_ids(12), [bad[:, :7], bad[:, 7:]], chunk_length=300)
    with pytest.raises(ValueError, match=r"shape \(11, 24\)"):
        predict(classifier, frame_ids(12), [whole[:11, :7], whole[:, 7:]], chunk_length=300)


def test_copies_are_scored_once_and_take_their_firsts_scores(tmp_path, monkeypatch):
    import vnp_core.classify as classify

    classifier = load_classifier(write_tiny_classifier(tmp_path, in_features=IN_FEATURES, chunk_length=300)["state_dict"])
    whole = features(12)
    same_as = np.array([0, 1, 0, 3, 1, 5, 6, 3, 8, 9, 0, 11])  # rows 2 and 10 copy row 0, 4 copies 1, 7 copies 3
    whole[[2, 10]], whole[4], whole[7] = whole[0], whole[1], whole[3]
    monkeypatch.setattr(classify, "_ROWS_PER_FORWARD", 4)  # scored rows span blocks
    scored = []
    forward = classifier.module.forward
    monkeypatch.setattr(classifier.module, "forward", lambda x: scored.append(len(x)) or forward(x))

    once = predict(classifier, frame_ids(12), [whole[:, :7], whole[:, 7:]], chunk_length=300, same_as=same_as)
    assert sum(scored) == 8  # the 8 first copies
    every = predict(classifier, frame_ids(12), whole, chunk_length=300)
    assert once["frame_id"].equals(every["frame_id"]) and once["prediction"].equals(every["prediction"])
    np.testing.assert_allclose(once["score2"].to_numpy(), every["score2"].to_numpy(), rtol=1e-6)
    assert (once["score2"].to_numpy()[same_as] == once["score2"].to_numpy()).all()  # a copy's scores are its first's
    bad = whole.copy()
    bad[3, 9] = np.nan
    with pytest.raises(ValueError, match=r"^1 feature rows contain NaN/Inf, e.g. \['seq_chunk_1R1'\]"):
        predict(classifier, frame_ids(12), bad, chunk_length=300, same_as=same_as)


def test_features_of_the_other_chunk_length_are_refused(tmp_path):
    classifier = load_classifier(write_tiny_classifier(tmp_path, in_features=IN_FEATURES, chunk_length=300)["state_dict"])

    with pytest.raises(ValueError, match=r"500-bp chunks.*trained on 300-bp chunks"):
        predict(classifier, frame_ids(6), features(6), chunk_length=500)
    with pytest.raises(ValueError, match=r"shape \(6, 23\)"):
        predict(classifier, frame_ids(6), features(6)[:, 1:], chunk_length=300)
    bad = features(6)
    bad[4, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN/Inf.*seq_chunk_1R2"):
        predict(classifier, frame_ids(6), bad, chunk_length=300)


def classifier_with_logits(other: float, virus: float) -> LoadedClassifier:
    """A classifier whose two logits are the same constants for every input."""
    module = VirNucProClassifier(IN_FEATURES, 8)
    with torch.no_grad():
        module.output_layer.weight.zero_()
        module.output_layer.bias.copy_(torch.tensor([other, virus]))
    return LoadedClassifier(module=module, chunk_length=300, in_features=IN_FEATURES, source=Path("fixed"), weights_sha256="")


def test_frame_label_is_the_first_maximum_so_a_tie_is_others():
    tie = predict(classifier_with_logits(0.3, 0.3), ["a_chunk_1F1"], features(1), chunk_length=300)
    viral = predict(classifier_with_logits(0.0, 1.0), ["a_chunk_1F1"], features(1), chunk_length=300)

    assert tie.row(0) == ("a_chunk_1F1", "others", 0.5, 0.5)
    assert viral["prediction"].to_list() == ["virus"]
    assert viral["score2"][0] == pytest.approx(1 / (1 + np.exp(-1.0)), rel=1e-6)


def hand_made_frames() -> pl.DataFrame:
    return pl.DataFrame({
        "frame_id": ["r1_chunk_2F1", "r1_chunk_2R3", "r1_chunk_10F2", "r2_chunk_1F1", "r2_chunk_1F3", "r3_chunk_1R1"],
        "prediction": ["others", "others", "virus", "others", "virus", "virus"],
        "score1": [0.5, 0.9, 1e-05, 0.6, 0.3, 0.25],
        "score2": [0.5, 0.1, 0.99999, 0.4, 0.7, 0.75],
    }, schema_overrides={"score1": pl.Float32, "score2": pl.Float32})


def test_chunk_rule_max_virus_at_least_max_other():
    chunks = chunk_calls(hand_made_frames())

    calls = dict(chunks.select("chunk_id", "is_virus").rows())
    # r1_chunk_2: a tie frame (0.5/0.5) and an "others" frame at 0.9: max(P_virus) 0.5 < 0.9.
    # r2_chunk_1: its frames disagree; max(P_virus) 0.7 >= max(P_other) 0.6.
    assert calls == {"r1_chunk_10": True, "r1_chunk_2": False, "r2_chunk_1": True, "r3_chunk_1": True}
    assert chunk_calls(hand_made_frames()[:1])["is_virus"].to_list() == [True]  # a tie is viral at chunk level
    assert chunks["n_frames"].to_list() == [1, 2, 2, 1]


def test_prediction_files_are_the_original_text(tmp_path):
    frames = hand_made_frames()

    paths = write_prediction_files(frames, chunk_calls(frames), tmp_path)

    assert paths["frame_predictions"].read_text() == (
        "Sequence_ID\tPrediction\tscore1\tscore2\n"
        "r1_chunk_2F1\tothers\t0.5\t0.5\n"
        "r1_chunk_2R3\tothers\t0.9\t0.1\n"
        "r1_chunk_10F2\tvirus\t1e-05\t0.99999\n"
        "r2_chunk_1F1\tothers\t0.6\t0.4\n"
        "r2_chunk_1F3\tvirus\t0.3\t0.7\n"
        "r3_chunk_1R1\tvirus\t0.25\t0.75\n"
    )
    # Tab-separated despite the name; chunks in text order, as pandas groupby sorted them.
    assert paths["chunk_calls"].read_text() == (
        "Modified_ID\tIs_Virus\n"
        "r1_chunk_10\tTrue\n"
        "r1_chunk_2\tFalse\n"
        "r2_chunk_1\tTrue\n"
        "r3_chunk_1\tTrue\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no temp files left


def test_with_the_index_frames_come_in_prep_order_with_record_ids_and_coordinates(tmp_path):
    frames = hand_made_frames()  # in prep order
    index = pl.DataFrame({
        "frame_id": ["r1_chunk_2F1", "r1_chunk_2R3", "r1_chunk_10F2", "r2_chunk_1F1", "r2_chunk_1F3", "r3_chunk_1R1"],
        "prep_order": range(6),
        "record_id": ["r1", "r1", "r1", "r2", "r2", "r3"],
        "chunk_index": [2, 2, 10, 1, 1, 1],
        "chunk_start": [300, 300, 2700, 0, 0, 0],
        "chunk_end": [600, 600, 3000, 300, 300, 120],
        "frame": ["F1", "R3", "F2", "F1", "F3", "R1"],
        "protein_length": [99, 99, 98, 99, 99, 40],
    }).reverse()  # the join must not depend on row order

    paths = write_prediction_files(frames.reverse(), chunk_calls(frames), tmp_path, index)

    written = [line.split("\t")[0] for line in paths["frame_predictions"].read_text().splitlines()[1:]]
    assert written == frames["frame_id"].to_list()
    frame_table = pl.read_parquet(paths["frame_table"])
    assert frame_table.columns == ["frame_id", "prediction", "score1", "score2", "record_id", "chunk_index",
                                   "chunk_start", "chunk_end", "frame"]
    assert frame_table["frame_id"].to_list() == frames["frame_id"].to_list()
    assert frame_table.row(2) == ("r1_chunk_10F2", "virus", pytest.approx(1e-05), pytest.approx(0.99999),
                                  "r1", 10, 2700, 3000, "F2")
    chunk_table = pl.read_parquet(paths["chunk_table"])
    assert chunk_table.select("chunk_id", "record_id", "chunk_index", "chunk_start", "chunk_end", "is_virus").rows() == [
        ("r1_chunk_10", "r1", 10, 2700, 3000, True),
        ("r1_chunk_2", "r1", 2, 300, 600, False),
        ("r2_chunk_1", "r2", 1, 0, 300, True),
        ("r3_chunk_1", "r3", 1, 0, 120, True),
    ]

    with pytest.raises(ValueError, match=r"not in the sequence index.*r3_chunk_1R1"):
        write_prediction_files(frames, chunk_calls(frames), tmp_path / "partial", index.filter(pl.col("record_id") != "r3"))
    assert not (tmp_path / "partial").exists()


def test_predictions_of_a_real_genome_come_out_in_the_order_of_its_protein_fasta(tmp_path):
    prep = prepare_fasta(REAL_DATA / "influenza_a_california_07_2009.fasta", tmp_path / "prep",
                         PrepConfig(chunk_length=500))
    index = build_index(prep.frames, num_shards=2)
    classifier = load_classifier(write_tiny_classifier(tmp_path, in_features=IN_FEATURES, chunk_length=500)["state_dict"])
    # Scored in index order (longest first), as the merged embeddings hold them.
    frames = predict(classifier, index["frame_id"].to_list(), features(index.height), chunk_length=500)

    paths = write_prediction_files(frames, chunk_calls(frames), tmp_path / "predictions", index)

    protein_ids = [line[1:] for line in prep.protein_fasta.read_text().splitlines() if line.startswith(">")]
    assert index["frame_id"].to_list() != protein_ids
    written = [line.split("\t")[0] for line in paths["frame_predictions"].read_text().splitlines()[1:]]
    assert written == protein_ids
    assert pl.read_parquet(paths["frame_table"])["frame_id"].to_list() == protein_ids
