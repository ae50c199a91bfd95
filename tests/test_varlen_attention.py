"""The Triton varlen attention kernel (`vnp::varlen_attention`) does the per-sequence reference's math.

On a GPU its cases run there; without one, in Triton's interpreter (`triton_interpreter`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from triton_interpreter import DEVICE, INTERPRETED, interpreter_rerun, runs_here

from vnp_core.attention import attend, plan_attention

LENGTHS = {
    "one token": [1],
    "across blocks": [3, 70, 1, 129, 5],
    "equal": [17] * 5,
    "random": np.random.default_rng(0).integers(1, 100, 8).tolist(),
    "longer than 512": [530, 7],
}
# (heads, head_dim, dtype, tolerance against the fp32 reference). The interpreter computes in NumPy,
# which has no bfloat16.
SHAPES = [(2, 64, torch.float16, 4e-3), (3, 24, torch.float16, 4e-3), (2, 8, torch.float32, 1e-5)]
if not INTERPRETED:
    SHAPES.append((2, 64, torch.bfloat16, 3e-2))


def pack(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """cu_seqlens and q, k, v as the strided views of one (T, 3, H, D) projection, as the models make them."""
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=DEVICE)
    generator = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(sum(lengths), 3, heads, head_dim, generator=generator) * 2).to(DEVICE, dtype)
    return cu_seqlens, *qkv.unbind(1)


def run(backend: str, q, k, v, cu_seqlens, slopes):
    plan = plan_attention(backend, cu_seqlens, q.shape[0], int((cu_seqlens[1:] - cu_seqlens[:-1]).max()), q.dtype, slopes)
    return attend(q, k, v, plan, scale=q.shape[-1] ** -0.5)


@runs_here
@pytest.mark.parametrize("alibi", [False, True], ids=["no bias", "ALiBi"])
@pytest.mark.parametrize("heads, head_dim, dtype, tolerance", SHAPES, ids=lambda value: str(value))
@pytest.mark.parametrize("case", LENGTHS)
def test_the_kernel_is_the_per_sequence_reference(case, heads, head_dim, dtype, tolerance, alibi):
    from vnp_core.models.dnabert_s import alibi_slopes

    cu_seqlens, q, k, v = pack(LENGTHS[case], heads, head_dim, dtype)
    slopes = alibi_slopes(heads).to(DEVICE) if alibi else None
    reference = run("sdpa_reference", q.float(), k.float(), v.float(), cu_seqlens, slopes)
    out = run("triton_varlen", q, k, v, cu_seqlens, slopes)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    torch.testing.assert_close(out.float(), reference, atol=tolerance, rtol=tolerance)


@runs_here
def test_attention_never_crosses_a_sequence():
    from vnp_core.models.dnabert_s import alibi_slopes

    lengths = [5, 40, 9]
    cu_seqlens, q, k, v = pack(lengths, 2, 64, torch.float16)
    slopes = alibi_slopes(2).to(DEVICE)
    before = run("triton_varlen", q, k, v, cu_seqlens, slopes)
    k, v = k.clone(), v.clone()
    k[5:45] += 1.0
    v[5:45] *= -1.0
    after = run("triton_varlen", q, k, v, cu_seqlens, slopes)
    assert torch.equal(after[:5], before[:5]) and torch.equal(after[45:], before[45:])
    assert not torch.equal(after[5:45], before[5:45])


@runs_here
def test_an_empty_pack_and_a_bad_layout():
    from vnp_core.varlen_attention import varlen_attention

    empty = torch.empty(0, 2, 64, device=DEVICE, dtype=torch.float16)
    cu_seqlens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    assert varlen_attention(empty, empty, empty, cu_seqlens, 0, 0.125, None).shape == (0, 2, 64)
    cu_seqlens, q, k, v = pack([4, 4], 2, 16, torch.float16)
    with pytest.raises(ValueError, match="contiguous"):
        varlen_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu_seqlens, 4, 0.25, None)


@runs_here
def test_dnabert_s_on_the_kernel_is_the_reference_model():
    from vnp_core.models.dnabert_s import DnabertSConfig, PackedDnabertS
    from vnp_core.packing import make_batch

    rng = np.random.default_rng(1)
    lengths = [int(n) for n in rng.integers(3, 90, 12)]
    model = PackedDnabertS(DnabertSConfig(64, 2, 4, 128, vocab_size=40), "sdpa_reference").to(DEVICE)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    batch = make_batch([rng.choice(range(5, 40), n) for n in lengths], range(len(lengths))).to(DEVICE)
    reference = model.embed(batch)
    model.attention_backend = "triton_varlen"
    torch.testing.assert_close(model.embed(batch), reference, atol=1e-5, rtol=1e-5)


test_every_case_passes_in_tritons_interpreter = interpreter_rerun(__file__)
