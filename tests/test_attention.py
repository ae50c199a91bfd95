"""The CPU attention back ends: `sdpa_bucketed` (the CPU's auto choice) is `sdpa_reference`'s math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vnp_core.attention import BUCKET_MAX_PADDING, attend, length_buckets, plan_attention, select_backend
from vnp_core.packing import length_groups, make_batch, padded_gather_index

LENGTHS = {
    "one sequence": [7],
    "equal lengths": [5, 5, 5, 5],
    "VirNucPro-like": [51] * 20 + [52] * 12 + [102, 100] + [168] * 3 + [1, 2],
    "random": np.random.default_rng(0).integers(1, 300, 50).tolist(),
}


def pack_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)


def test_length_groups_cover_every_sequence_once_within_the_padding_bound():
    lengths = np.array(LENGTHS["random"] + LENGTHS["VirNucPro-like"])
    groups = length_groups(lengths, 0.125)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    for group in groups:
        assert lengths[group].max() <= lengths[group].min() * 1.125
    # Shortest first, and a length is never split between groups.
    assert [lengths[g].max() for g in groups] == sorted(lengths[g].max() for g in groups)
    assert sum(len(set(lengths[g])) for g in groups) == len(set(lengths.tolist()))


def test_padded_gather_index_repeats_the_last_token():
    index = padded_gather_index(np.array([0, 3]), np.array([3, 1]), 4)
    np.testing.assert_array_equal(index, [[0, 1, 2, 2], [3, 3, 3, 3]])


def test_buckets_map_every_token_back_to_itself():
    lengths = LENGTHS["VirNucPro-like"]
    buckets, unbucket = length_buckets(pack_of(lengths), torch.float32, None)
    slots = torch.cat([b.gather for b in buckets])
    torch.testing.assert_close(slots[unbucket], torch.arange(sum(lengths)))
    assert sum(b.shape[0] for b in buckets) == len(lengths)
    # Buckets of one length need no mask; the others mask exactly their padding.
    for bucket in buckets:
        if bucket.mask is not None:
            assert bucket.mask.dtype == torch.bool and not bucket.mask.all()


@pytest.mark.parametrize("alibi", [False, True], ids=["no bias", "ALiBi"])
@pytest.mark.parametrize("case", LENGTHS)
def test_bucketed_equals_the_per_sequence_reference(case, alibi):
    lengths = LENGTHS[case]
    cu_seqlens, tokens, heads, dim = pack_of(lengths), sum(lengths), 4, 16
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(tokens, heads, dim, generator=generator) for _ in range(3))
    slopes = torch.rand(heads, generator=generator) if alibi else None

    def run(backend):
        plan = plan_attention(backend, cu_seqlens, tokens, max(lengths), torch.float32, slopes)
        return attend(q, k, v, plan, scale=dim**-0.5)

    torch.testing.assert_close(run("sdpa_bucketed"), run("sdpa_reference"), atol=1e-5, rtol=1e-5)


def test_models_on_bucketed_match_the_reference():
    from vnp_core.models.dnabert_s import DnabertSConfig, PackedDnabertS, alibi_slopes
    from vnp_core.models.esm2 import ESM2Config, PackedESM2

    rng = np.random.default_rng(1)
    lengths = [int(n) for n in rng.integers(3, 120, 40)]
    esm2 = PackedESM2.from_config(ESM2Config(2, 64, 4), "cpu", torch.float32, "sdpa_reference")
    dnabert_s = PackedDnabertS(DnabertSConfig(64, 2, 4, 128, vocab_size=40), "sdpa_reference")
    with torch.no_grad():
        for param in dnabert_s.parameters():
            param.normal_(0, 0.1)
    dnabert_s.alibi_slopes = alibi_slopes(4)
    for model, vocab in ((esm2, range(4, 24)), (dnabert_s, range(5, 40))):
        batch = make_batch([rng.choice(vocab, n) for n in lengths], range(len(lengths)))
        model.attention_backend = "sdpa_reference"
        reference = model.embed(batch)
        model.attention_backend = "sdpa_bucketed"
        torch.testing.assert_close(model.embed(batch), reference, atol=1e-5, rtol=1e-5)


def test_auto_packs_on_the_cpu():
    assert select_backend("auto", torch.device("cpu"), torch.float32, needs_bias=False) == "sdpa_bucketed"
    assert select_backend("auto", torch.device("cpu"), torch.float32, needs_bias=True) == "sdpa_bucketed"
    # CUDA without a half-precision kernel keeps one padded call: bucketing reads the bounds on the host.
    assert select_backend("auto", torch.device("cuda"), torch.float32, needs_bias=False) == "sdpa_padded"
    assert 0 < BUCKET_MAX_PADDING < 1


def test_auto_picks_the_triton_kernel_for_alibi_on_a_gpu(monkeypatch):
    from vnp_core import attention

    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    monkeypatch.setattr(attention, "triton_available", lambda: True)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: True)
    assert select_backend("auto", torch.device("cuda"), torch.float16, needs_bias=True) == "triton_varlen"
    assert select_backend("auto", torch.device("cuda"), torch.float16, needs_bias=False) == "torch_varlen"
    with pytest.raises(ValueError, match="CUDA device and float16"):
        select_backend("triton_varlen", torch.device("cpu"), torch.float16, needs_bias=True)
    monkeypatch.setattr(attention, "triton_available", lambda: False)
    assert select_backend("auto", torch.device("cuda"), torch.float16, needs_bias=True) == "sdpa_padded"
