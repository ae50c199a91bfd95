import json

import numpy as np
import polars as pl
import pytest

from vnp_core.config import ValidationConfig
from vnp_core.validate import (
    build_report,
    compare_calls,
    compare_embeddings,
    report_markdown,
    select_validation_chunks,
    select_validation_subset,
    what_failed,
    write_report,
)

CONFIG = ValidationConfig()  # min_cosine_all 0.995, min_cosine_p99 0.999


def comparison(cosines: list[float], nonfinite: list[bool] | None = None) -> pl.DataFrame:
    return pl.DataFrame({
        "id": [f"s{i}" for i in range(len(cosines))],
        "cosine": cosines,
        "max_abs_diff": [1 - c for c in cosines],
        "production_nonfinite": nonfinite or [False] * len(cosines),
    }, schema={"id": pl.String, "cosine": pl.Float64, "max_abs_diff": pl.Float64, "production_nonfinite": pl.Boolean})


def test_compare_embeddings_matches_known_angles():
    cosines = np.array([1.0, 0.999, 0.6, -0.5])
    reference = np.tile([[2.0, 0.0]], (4, 1)).astype(np.float32)
    production = (3.0 * np.stack([cosines, np.sqrt(1 - cosines**2)], axis=1)).astype(np.float32)  # scale does not matter

    result = compare_embeddings(["a", "b", "c", "d"], production, reference)

    assert result["id"].to_list() == ["a", "b", "c", "d"]
    np.testing.assert_allclose(result["cosine"].to_numpy(), cosines, atol=1e-7)
    expected_max_diff = np.abs(production.astype(np.float64) - reference).max(axis=1)
    np.testing.assert_allclose(result["max_abs_diff"].to_numpy(), expected_max_diff)
    assert not result["production_nonfinite"].any()


def test_compare_embeddings_flags_nonfinite_production_and_refuses_bad_reference():
    reference = np.ones((3, 4), dtype=np.float32)
    production = reference.copy()
    production[1, 2] = np.inf
    production[2, 0] = np.nan

    result = compare_embeddings(["a", "b", "c"], production, reference)

    assert result["production_nonfinite"].to_list() == [False, True, True]
    assert np.isnan(result["cosine"].to_numpy()[1:]).all()
    with pytest.raises(ValueError, match=r"reference.*\['c'\]"):
        compare_embeddings(["a", "b", "c"], reference, production[[0, 0, 2]])


def test_report_numbers_match_hand_computation():
    report = build_report({"esm2": comparison([1.0, 0.9995, 0.999, 0.997])}, CONFIG, {"dtype": "float16"})
    model = report["models"]["esm2"]

    assert model["n_compared"] == 4
    assert model["cosine_min"] == pytest.approx(0.997)
    # Linear interpolation between the two smallest: 0.997 + 0.03 * (0.999 - 0.997).
    assert model["cosine_p1"] == pytest.approx(0.99706)
    assert model["cosine_median"] == pytest.approx((0.999 + 0.9995) / 2)
    assert model["cosine_mean"] == pytest.approx((1.0 + 0.9995 + 0.999 + 0.997) / 4)
    assert model["max_abs_diff"] == pytest.approx(0.003)
    assert model["fraction_at_or_above_p99_threshold"] == pytest.approx(0.75)
    # One sequence in four below 0.999 is 25% > 1%: fails although every cosine is >= 0.995.
    assert not model["passed"] and not report["passed"]
    assert model["worst_ids"] == ["s3"]
    assert report["context"] == {"dtype": "float16"}


def test_thresholds_are_inclusive_at_exactly_0999_and_0995():
    at_boundary = [0.995] + [0.999] * 99  # 99% at exactly 0.999, the rest at exactly 0.995
    model = build_report({"m": comparison(at_boundary)}, CONFIG, {})["models"]["m"]
    assert model["passed"]
    # Ranks 0..99: the 1st percentile sits 0.99 of the way from the lowest to the next.
    assert model["cosine_p1"] == pytest.approx(0.995 + 0.99 * 0.004)

    below_all = [0.99499] + [0.999] * 99
    assert not build_report({"m": comparison(below_all)}, CONFIG, {})["models"]["m"]["passed"]
    two_below_p99 = [0.995, 0.995] + [0.999] * 98  # 98% >= 0.999
    assert not build_report({"m": comparison(two_below_p99)}, CONFIG, {})["models"]["m"]["passed"]


def test_nan_inf_are_counted_and_fail():
    per_model = {"esm2": comparison([1.0, float("nan"), 0.9999], nonfinite=[False, True, False]),
                 "dnabert_s": comparison([1.0, 1.0])}
    report = build_report(per_model, CONFIG, {})
    esm2 = report["models"]["esm2"]

    assert esm2["nan_inf_count"] == 1 and not esm2["passed"]
    assert esm2["worst_ids"] == ["s1"]
    assert esm2["cosine_min"] == pytest.approx(0.9999)  # statistics of the finite cosines
    assert report["models"]["dnabert_s"]["passed"] and not report["passed"]


def test_nothing_compared_is_not_a_pass():
    assert not build_report({"esm2": comparison([])}, CONFIG, {})["passed"]
    assert not build_report({}, CONFIG, {})["passed"]


def test_what_failed_names_each_missed_criterion_in_one_line():
    def failed(per_model):
        return what_failed(build_report(per_model, CONFIG, {}))

    assert failed({"esm2": comparison([1.0] * 99 + [0.9999])}) == ""  # passed
    assert failed({"esm2": comparison([1.0, 0.9995, 0.999, 0.997])}) == "esm2: 75.0% of cosines >= 0.999 (99% needed)"
    assert failed({"dnabert_s": comparison([0.99] + [1.0] * 99)}) == "dnabert_s: lowest cosine 0.9900 (>= 0.995 needed)"
    assert failed({"esm2": comparison([1.0, float("nan")], nonfinite=[False, True]), "dnabert_s": comparison([1.0])}) == (
        "esm2: 1 vectors with NaN/Inf; esm2: 50.0% of cosines >= 0.999 (99% needed)")
    assert failed({}) == "nothing was compared"


def test_write_report_files_and_markdown(tmp_path):
    per_model = {"esm2": comparison([1.0, 0.9999, 0.99]), "dnabert_s": comparison([1.0, 0.99999])}
    report = build_report(per_model, CONFIG, {"device": "cuda:0", "dtype": "float16", "backend": "torch_varlen"})

    paths = write_report(report, per_model, tmp_path)

    assert json.loads(paths["report"].read_text()) == report
    table = pl.read_parquet(paths["per_sequence"])
    assert table.columns[0] == "model" and table.height == 5
    assert table.filter(pl.col("model") == "dnabert_s")["cosine"].to_list() == [1.0, 0.99999]
    assert paths["histogram"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no temp files left

    markdown = report_markdown(report)
    assert markdown.startswith("**FAILED**")
    assert "| esm2 | 3 | 0.990000 |" in markdown and "torch_varlen" in markdown and "worst esm2: s2" in markdown


def test_subset_is_deterministic_stratified_and_sized():
    lengths = np.random.default_rng(1).permutation(1000) + 10  # distinct lengths 10..1009

    subset = select_validation_subset(lengths, 50, seed=7)

    assert np.array_equal(subset, select_validation_subset(lengths, 50, seed=7))
    assert not np.array_equal(subset, select_validation_subset(lengths, 50, seed=8))
    assert len(subset) == 50 and len(np.unique(subset)) == 50
    # Equal draws from every length decile: short and long sequences are both represented.
    deciles = np.bincount((lengths[subset] - 10) // 100, minlength=10)
    assert deciles.tolist() == [5] * 10


def test_subset_of_a_skewed_sample_still_has_long_sequences():
    lengths = np.array([100] * 900 + list(range(5000, 5100)))  # 10% long

    subset = select_validation_subset(lengths, 20, seed=0)

    assert len(subset) == 20
    assert (lengths[subset] >= 5000).sum() == 2  # the top length decile is all long ones


def test_subset_takes_every_row_when_there_are_few():
    assert select_validation_subset(np.array([5, 3, 9]), 10, seed=0).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="positive"):
        select_validation_subset(np.array([5]), 0, seed=0)


def test_reference_embeddings_runs_each_models_reference_on_its_sequences(tmp_path):
    from vnp_core.config import EmbedConfig, ModelPaths
    from vnp_core.models.reference import dnabert_s_reference, esm2_reference
    from vnp_core.tiny_models import write_tiny_dnabert_s, write_tiny_esm2
    from vnp_core.validate import reference_embeddings

    esm2, dnabert_s = write_tiny_esm2(tmp_path / "esm2_tiny.pt"), write_tiny_dnabert_s(tmp_path / "dnabert_s")
    models = ModelPaths(embedders={"esm2": esm2, "dnabert_s": dnabert_s}, classifier=tmp_path / "unused.pt")
    sequences = {"esm2": ["MKVLAG", "MK"], "dnabert_s": ["ACGTACGTAA", "GGGCCCATATAT", "ACGT"]}
    references = reference_embeddings(models, sequences, EmbedConfig(max_protein_length=3), "cpu")

    assert list(references) == ["dnabert_s", "esm2"]
    np.testing.assert_array_equal(references["dnabert_s"], dnabert_s_reference(dnabert_s, sequences["dnabert_s"]))
    # The config's protein length limit reaches the reference: "MKVLAG" is embedded as "MKV".
    np.testing.assert_array_equal(references["esm2"], esm2_reference(esm2, ["MKV", "MK"], max_residues=None))
    assert not np.allclose(references["esm2"][0], esm2_reference(esm2, ["MKVLAG"], max_residues=None)[0])


# ---------------------------------------------------------------------------------------- FP8


def test_a_model_in_fp8_is_held_to_fp8_thresholds():
    cosines = [0.993] + [0.996] * 99  # fails fp16's (0.995 / 0.999), passes FP8's (0.99 / 0.995)
    per_model = {"esm2": comparison(cosines), "dnabert_s": comparison([1.0] * 3)}
    half = build_report(per_model, CONFIG, {})
    fp8 = build_report(per_model, CONFIG, {}, precision={"esm2": "fp8_e4m3+float16", "dnabert_s": "float16"})
    assert not half["passed"] and fp8["passed"]
    assert (fp8["models"]["esm2"]["min_cosine_all"], fp8["models"]["esm2"]["min_cosine_p99"]) == (0.99, 0.995)
    assert fp8["models"]["dnabert_s"]["min_cosine_p99"] == 0.999  # the model in fp16 keeps fp16's
    markdown = report_markdown(fp8)
    assert "Thresholds (esm2): every cosine >= 0.99," in markdown and "Thresholds (dnabert_s): every cosine >= 0.995," in markdown
    assert not build_report({"esm2": comparison([0.989] + [0.999] * 99)}, CONFIG, {}, {"esm2": "fp8_e4m3+float16"})["passed"]


def frames_of_chunks(chunks: int, frames_per_chunk: int = 3) -> pl.DataFrame:
    """An index's chunk columns: `chunks` chunks of a few frames, longest protein growing with the chunk."""
    rows = [(f"r{c // 2}", c % 2, f"r{c // 2}_{c % 2}F{f}", 10 + c + f) for c in range(chunks) for f in range(frames_per_chunk)]
    return pl.DataFrame(rows, schema=["record_id", "chunk_index", "frame_id", "protein_length"], orient="row")


def test_validation_rows_are_whole_chunks_of_about_the_size_asked():
    index = frames_of_chunks(300)
    rows = select_validation_chunks(index, 60, seed=0)
    assert np.array_equal(rows, select_validation_chunks(index, 60, seed=0)) and np.all(np.diff(rows) > 0)
    chosen = index[rows]
    assert len(chosen) == 60  # 20 chunks of 3 frames
    per_chunk = chosen.group_by("record_id", "chunk_index").len()["len"]
    assert per_chunk.to_list() == [3] * 20  # every frame of each chosen chunk
    # Stratified by length: the shortest and the longest tenth of the chunks are both drawn from.
    chunk_rank = chosen["protein_length"].to_numpy() - 10
    assert chunk_rank.min() < 30 and chunk_rank.max() >= 270
    assert len(select_validation_chunks(frames_of_chunks(5), 60, seed=0)) == 15  # a small sample: every chunk


def sign_classifier(width: int):
    """A VirNucPro classifier that calls a frame viral exactly when its first feature is positive."""
    import torch

    from vnp_core.classify import LoadedClassifier, VirNucProClassifier

    module = VirNucProClassifier(width, 2)
    with torch.no_grad():
        module.hidden_layer.weight.zero_()
        module.hidden_layer.weight[0, 0], module.hidden_layer.weight[1, 0] = 1.0, -1.0
        module.hidden_layer.bias.zero_()
        module.output_layer.weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))  # others: relu(-x), virus: relu(x)
        module.output_layer.bias.zero_()
    return LoadedClassifier(module=module, chunk_length=500, in_features=width, source="sign", weights_sha256="")


def test_call_agreement_counts_the_chunks_called_otherwise_and_fails_only_under_fp8():
    index = frames_of_chunks(40, frames_per_chunk=2)
    frame_ids = index["frame_id"].to_list()
    reference = {"dnabert_s": np.ones((80, 3), np.float32), "esm2": np.ones((80, 5), np.float32)}
    production = {"dnabert_s": reference["dnabert_s"].copy(), "esm2": reference["esm2"].copy()}
    production["dnabert_s"][[0, 1], 0] = -1.0  # both frames of the first chunk now look like others
    classifier = sign_classifier(8)

    calls = compare_calls(classifier, frame_ids, production, reference, chunk_length=500, config=CONFIG, applies=True)
    assert (calls.chunks, calls.agreeing, calls.agreement) == (40, 39, 0.975)
    assert calls.disagreeing_chunks == ["r0_0"] and not calls.passed
    per_model = {"esm2": comparison([1.0] * 80), "dnabert_s": comparison([1.0] * 80)}
    assert not build_report(per_model, CONFIG, {}, {"esm2": "fp8_e4m3+float16"}, calls)["passed"]
    markdown = report_markdown(build_report(per_model, CONFIG, {}, {"esm2": "fp8_e4m3+float16"}, calls))
    assert "VirNucPro calls: 39 of 40 chunks (97.50%)" in markdown and "FAIL" in markdown and "r0_0" in markdown

    in_fp16 = compare_calls(classifier, frame_ids, production, reference, chunk_length=500, config=CONFIG, applies=False)
    assert build_report(per_model, CONFIG, {}, None, in_fp16)["passed"]  # reported, not part of pass/fail
    same = compare_calls(classifier, frame_ids, reference, reference, chunk_length=500, config=CONFIG, applies=True)
    assert same.agreement == 1.0 and same.passed
