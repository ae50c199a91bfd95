"""FP8 linear layers: the quantisation, the layer against its fp32 product, and ESM-2 loaded in FP8 mode.

On the CPU the layers multiply the same e4m3 values in fp32, as an FP8 GPU does in its tensor cores;
the GPU's throughput and fidelity at the 3B shape are in bench/BENCHMARKS.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vnp_core.config import EmbedConfig
from vnp_core.models.esm2_checkpoint import load_esm2
from vnp_core.models.esm2 import ResidualLayerNorm
from vnp_core.models.fp8 import (E4M3, E4M3_MAX, Fp8Gelu, Fp8Linear, Fp8ResidualLayerNorm, Fp8Rows, quantize_rows,
                                 use_fp8_linears)
from vnp_core.models.reference import esm2_reference
from vnp_core.packing import make_batch
from vnp_core.tiny_models import write_tiny_esm2
from real_genomes import FLU

SEQUENCES = ["MKV", "LAGVSERTIDPKQNFYMHWC" * 3, "MSTNPKPQRKTKRNTNRRPQDVKFPGG" * 4, "W"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_each_row_fills_e4m3_and_scales_back():
    x = torch.randn(8, 32) * torch.logspace(-3, 3, 8)[:, None]  # rows six decades apart
    x[3] = 0.0
    x8, scale = quantize_rows(x)
    assert x8.dtype == E4M3 and scale.shape == (8, 1) and scale.dtype == torch.float32
    peaks = x8.float().abs().amax(dim=1)
    assert torch.equal(peaks[torch.arange(8) != 3], torch.full((7,), E4M3_MAX))  # each row's largest value is 448
    assert torch.equal(x8[3].float(), torch.zeros(32))  # a zero row stays zero, not NaN
    relative = (x8.float() * scale - x).norm(dim=1) / x.norm(dim=1).clamp(min=1e-30)
    assert relative[torch.arange(8) != 3].max() < 0.05  # e4m3 keeps 3 mantissa bits


def test_fp8_linear_is_the_linear_within_fp8_error():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.float16)
    x = torch.randn(37, 64, dtype=torch.float16)  # a row count no tile divides
    out = Fp8Linear(linear)(x)
    assert out.dtype == torch.float16 and out.shape == (37, 48)
    expected = (x.float() @ linear.weight.float().T + linear.bias.float()).detach().numpy()
    assert cosine(out.float().numpy(), expected).min() > 0.998


def test_use_fp8_linears_replaces_every_linear_and_gelu_and_keeps_the_rest():
    model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU(),
                          nn.Sequential(nn.Linear(32, 16, bias=False)), nn.GELU(approximate="tanh"))
    use_fp8_linears(model)
    assert [type(m).__name__ for m in model.modules()] == [
        "Sequential", "Fp8Linear", "LayerNorm", "Fp8Gelu", "Sequential", "Fp8Linear", "GELU"]  # tanh GELU: not ESM-2's
    assert model[3][0].bias is None and model[0].weight.dtype == E4M3
    assert model(torch.randn(5, 32)).shape == (5, 16)


def test_a_gelu_quantised_as_computed_feeds_the_next_layer_the_same_numbers():
    torch.manual_seed(0)
    x = torch.randn(9, 40, dtype=torch.float16) * 3
    rows = Fp8Gelu()(x)
    assert isinstance(rows, Fp8Rows) and rows.values.dtype == E4M3
    expected = quantize_rows(F.gelu(x))
    assert torch.equal(rows.values.view(torch.uint8), expected[0].view(torch.uint8)) and torch.equal(rows.scale, expected[1])
    fc2 = Fp8Linear(nn.Linear(40, 8).to(torch.float16))
    assert torch.equal(fc2(rows), fc2(F.gelu(x)))  # the half-precision output either way


def test_a_layer_norm_quantised_as_computed_returns_the_residual_sum_and_the_same_numbers():
    torch.manual_seed(0)
    norm = ResidualLayerNorm(40).to(torch.float16)
    nn.init.normal_(norm.weight, 1, 0.1), nn.init.normal_(norm.bias, 0, 0.1)
    x, delta = torch.randn(9, 40, dtype=torch.float16), torch.randn(9, 40, dtype=torch.float16)
    fp8_norm = Fp8ResidualLayerNorm.replacing(norm)
    total, rows = fp8_norm(x, delta)
    expected_total, normed = norm(x, delta)
    assert torch.equal(total, x + delta) and torch.equal(expected_total, total)
    expected = quantize_rows(normed)
    assert torch.equal(rows.values.view(torch.uint8), expected[0].view(torch.uint8)) and torch.equal(rows.scale, expected[1])
    assert fp8_norm.weight is norm.weight and fp8_norm.bias is norm.bias  # the same parameters, no copy


def e4m3_steps(values: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return (values.view(torch.uint8).int() - expected.view(torch.uint8).int()).abs()


GPU_SHAPES = [(1000, 10240), (1000, 2560), (7, 100), (3, 64), (0, 64)]  # ESM-2 3B's widths, ragged ones, none


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the ops run Triton kernels on CUDA; the eager ops above on the CPU")
@pytest.mark.parametrize("rows, width", GPU_SHAPES)
def test_the_fused_kernels_give_the_eager_ops_numbers_on_a_gpu(rows, width):
    from vnp_core.models.fp8 import add_layer_norm_quantize_rows, gelu_quantize_rows, quantize_activation_rows

    torch.manual_seed(0)
    x, delta = (torch.randn(rows, width, device="cuda") * 2).half(), torch.randn(rows, width, device="cuda").half()
    weight, bias = (torch.randn(width, device="cuda") * 0.1 + 1).half(), (torch.randn(width, device="cuda") * 0.1).half()
    # Times the scale's reciprocal, not divided by the scale: about 1 value in 25,000 is one e4m3 step away.
    for (values, scale), (expected, expected_scale) in [
            (gelu_quantize_rows(x), quantize_rows(F.gelu(x))), (quantize_activation_rows(x), quantize_rows(x))]:
        assert values.shape == (rows, width) and torch.equal(scale, expected_scale)
        steps = e4m3_steps(values, expected)
        assert (steps <= 1).all() and (steps > 0).sum() <= max(1, steps.numel() // 10_000)
    total, values, scale = add_layer_norm_quantize_rows(x, delta, weight, bias, 1e-5)
    assert torch.equal(total, x + delta)
    expected, expected_scale = quantize_rows(F.layer_norm(x + delta, (width,), weight, bias, 1e-5))
    # The LayerNorm sums in another order than PyTorch's: a value may round one fp16 step apart.
    assert torch.allclose(scale, expected_scale, rtol=2e-3, atol=0) and (e4m3_steps(values, expected) <= 1).all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_esm2(tmp_path_factory.mktemp("esm") / "esm2_t2_tiny.pt")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_esm2_in_fp8_passes_fp8_thresholds_against_fair_esm_fp32(tiny, dtype):
    loaded = load_esm2(tiny, EmbedConfig(dtype=dtype, fp8=True))
    assert loaded.fp8 and loaded.precision == f"fp8_e4m3+{dtype}"
    linears = [m for m in loaded.module.modules() if isinstance(m, (nn.Linear, Fp8Linear))]
    assert linears and all(isinstance(m, Fp8Linear) for m in linears)  # every layer's q, k, v, out, fc1, fc2
    norms = [type(m).__name__ for m in loaded.module.modules() if isinstance(m, nn.LayerNorm)]
    assert norms == ["Fp8ResidualLayerNorm"] * 4 + ["LayerNorm"]  # each layer's two; the last one's output is the embedding
    tokenizer = loaded.tokenizer
    batch = make_batch([tokenizer.encode(s, str(i))[0] for i, s in enumerate(SEQUENCES)], range(len(SEQUENCES)))
    pooled = loaded.module.embed(batch).numpy()
    similarity = cosine(pooled, esm2_reference(tiny, SEQUENCES))
    assert similarity.min() >= 0.99  # FP8's threshold for every sequence (`ValidationConfig`)
    # and it is FP8, not the half-precision model: its own error is visibly larger.
    half = load_esm2(tiny, EmbedConfig(dtype=dtype)).module.embed(batch).numpy()
    assert np.abs(pooled - half).max() > 1e-4


def test_fp8_needs_half_precision_activations():
    with pytest.raises(ValueError, match="fp8 .* set dtype to float16 or bfloat16"):
        EmbedConfig(fp8=True)
    assert EmbedConfig(dtype="float16", fp8=True).fp8


def test_vnp_run_with_fp8_embeds_esm2_in_fp8_and_its_validation_checks_the_calls(tmp_path):
    """The placeholder classifier's scores sit within 0.03 of a tie, so FP8's error turns some of the
    sample's chunk calls over: the check that FP8 must pass (and fp16 need not) stops the sample."""
    import json
    import shutil
    from pathlib import Path

    from typer.testing import CliRunner

    from vnp_assets.cli import app
    from vnp_core.store import read_attrs

    fasta = tmp_path / "flu.fasta"
    shutil.copyfile(FLU, fasta)
    home = tmp_path / "home"
    refused = CliRunner().invoke(app, ["run", str(fasta), "--home", str(home), "--fp8", "--dtype", "float32"])
    assert refused.exit_code == 1 and "--fp8 keeps activations in float16 or bfloat16" in refused.output
    assert not home.exists()

    run = CliRunner().invoke(app, ["run", str(fasta), "--home", str(home), "--shards", "1", "--fp8"])
    sample = home / "storage" / "samples" / "flu"
    report_file = sample / "fp16_validation" / "validation_report.json"
    report = json.loads(report_file.read_text())
    esm2, calls = report["models"]["esm2"], report["calls"]
    assert run.exit_code == 1 and run.output.strip().splitlines()[-1] == (
        "error: fp16_validation_report: the embeddings failed their comparison with the fp32 reference "
        f"[chunk calls: {calls['agreement']:.1%} as from fp32 (99.5% needed)], so no calls were made: see {report_file}")
    assert read_attrs(sample / "embeddings" / "esm2" / "shard-0.h5")["dtype"] == "fp8_e4m3+float16"
    assert read_attrs(sample / "embeddings" / "dnabert_s" / "shard-0.h5")["dtype"] == "float16"
    assert esm2["passed"] and esm2["min_cosine_all"] == 0.99 and report["models"]["dnabert_s"]["min_cosine_all"] == 0.995
    assert calls["applies"] and not calls["passed"] and calls["agreement"] < 0.995 and not report["passed"]
    assert not (sample / "predictions").exists()

    # The same sample in fp16: the calls are compared and reported, and all agree.
    again = CliRunner().invoke(app, ["run", str(fasta), "--home", str(home), "--shards", "1", "--dtype", "float16"])
    assert again.exit_code == 0, again.output
    report = json.loads(report_file.read_text())
    assert report["passed"] and not report["calls"]["applies"] and report["calls"]["agreement"] == 1.0
    assert read_attrs(sample / "embeddings" / "esm2" / "shard-0.h5")["dtype"] == "float16"  # FP8 is part of the version


def test_vnp_embed_esm2_with_fp8(tiny, tmp_path):
    from typer.testing import CliRunner

    from vnp_assets.cli import app
    from vnp_core.store import read_attrs, read_embeddings

    proteins = tmp_path / "p.faa"
    proteins.write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(SEQUENCES)))
    out = tmp_path / "e.h5"
    refused = CliRunner().invoke(app, ["embed", "esm2", str(proteins), "--model", str(tiny), "--out", str(out), "--fp8"])
    assert refused.exit_code == 1 and "--fp8 keeps activations in float16 or bfloat16: add --dtype float16" in refused.output
    assert not out.exists()

    done = CliRunner().invoke(app, ["embed", "esm2", str(proteins), "--model", str(tiny), "--out", str(out), "--fp8",
                                    "--dtype", "float16"])
    assert done.exit_code == 0, done.output
    assert read_attrs(out)["dtype"] == "fp8_e4m3+float16" and "fp8_e4m3+float16" in done.output
    vectors = read_embeddings(out).embeddings
    assert cosine(vectors, esm2_reference(tiny, SEQUENCES)).min() >= 0.99


def test_a_gpu_without_fp8_tensor_cores_is_refused_in_one_sentence(monkeypatch):
    from vnp_core.models.fp8 import check_fp8_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"^fp8 needs a GPU with FP8 tensor cores .* NVIDIA A100-SXM4-80GB has 8\.0: turn fp8 off$"):
        check_fp8_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda"))  # Hopper
    check_fp8_device(torch.device("cpu"))


def test_vnp_run_with_fp8_on_a_gpu_without_fp8_is_refused_at_the_door(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vnp_assets.cli import app

    # A host with a Hopper (GPU 0) and an A100 (GPU 1), faked: this machine has no GPU.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0) if device.index == 0 else (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: ["NVIDIA H100", "NVIDIA A100-SXM4-80GB"][device.index])
    fasta = tmp_path / "reads.fasta"
    fasta.write_text(">r1\nACGTACGTAC\n")
    home = tmp_path / "home"
    refused = CliRunner().invoke(app, ["run", str(fasta), "--home", str(home), "--fp8"])
    assert refused.exit_code == 1 and refused.output.strip() == (
        "error: --fp8 on GPU 1: fp8 needs a GPU with FP8 tensor cores (Ada or Hopper, compute capability 8.9 or later); "
        "NVIDIA A100-SXM4-80GB has 8.0: leave --fp8 out, or pick FP8 GPUs with --devices")
    assert not home.exists()  # refused before anything was written
    # The Hopper alone passes this check (and the run is then stopped by the next: --home is a file).
    home.write_text("")
    on_hopper = CliRunner().invoke(app, ["run", str(fasta), "--home", str(home), "--fp8", "--devices", "0"])
    assert on_hopper.exit_code == 1 and "--fp8" not in on_hopper.output and "--home" in on_hopper.output


def test_esm2_in_fp8_compiles_with_its_ops_for_packs_of_any_length(tiny):
    """A compiled layer calls the FP8 ops as they are, with a symbolic pack length, in one graph."""
    loaded = load_esm2(tiny, EmbedConfig(dtype="bfloat16", fp8=True))
    tokenizer = loaded.tokenizer
    batches = [make_batch([tokenizer.encode(s, str(i))[0] for i, s in enumerate(seqs)], range(len(seqs)))
               for seqs in (SEQUENCES, SEQUENCES[:3])]
    eager = [loaded.module.embed(batch) for batch in batches]
    for layer in loaded.module.layers:
        layer.compile(dynamic=True, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break fails
    for batch, expected in zip(batches, eager):
        assert torch.equal(loaded.module.embed(batch), expected)
