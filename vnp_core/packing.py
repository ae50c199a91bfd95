"""Token-budget packing: many variable-length sequences in one row with no padding.

A pack is the varlen layout of flash-attn: token ids of every sequence concatenated, and
`cu_seqlens = [0, n1, n1+n2, ...]` marking where each sequence starts. Positions restart at 0
at each sequence's first token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (T,) int64, every sequence's tokens concatenated
    cu_seqlens: torch.Tensor  # (B+1,) int32, cu_seqlens[i] is where sequence i starts
    position_ids: torch.Tensor  # (T,) int64, 0-based position within its own sequence
    max_seqlen: int
    seq_index: torch.Tensor  # (B,) int64, each sequence's position in the caller's list

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.seq_index.numel())

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(
            self.input_ids.pin_memory(), self.cu_seqlens.pin_memory(), self.position_ids.pin_memory(),
            self.max_seqlen, self.seq_index,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        # seq_index stays on the CPU: it is bookkeeping, never used by a kernel.
        return PackedBatch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.cu_seqlens.to(device, non_blocking=non_blocking),
            self.position_ids.to(device, non_blocking=non_blocking),
            self.max_seqlen, self.seq_index,
        )


def plan_packs(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy in-order packing of sequence indices so that each pack holds at most `max_tokens`.

    A sequence longer than the budget gets a pack of its own (never dropped, never cut here).
    """
    packs: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        packs.append(current)
    return packs


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[0, 1, ..., n1-1, 0, 1, ..., n2-1, ...] for the given offsets."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    total = int(cu_seqlens[-1])
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.arange(total, dtype=torch.long, device=cu_seqlens.device) - starts


def make_batch(token_ids: Sequence[np.ndarray], seq_index: Sequence[int]) -> PackedBatch:
    """Concatenate the given tokenised sequences into one pack."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(token_ids) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    input_ids = torch.from_numpy(np.concatenate(token_ids).astype(np.int64, copy=False))
    return PackedBatch(
        input_ids=input_ids,
        cu_seqlens=cu_seqlens,
        position_ids=position_ids_from_cu_seqlens(cu_seqlens),
        max_seqlen=int(lengths.max()),
        seq_index=torch.as_tensor(list(seq_index), dtype=torch.long),
    )


def split_batch(batch: PackedBatch) -> tuple[PackedBatch, PackedBatch]:
    """Two halves by sequence count (for out-of-memory retry). The batch must hold >= 2 sequences."""
    if batch.num_sequences < 2:
        raise ValueError("cannot split a pack of one sequence")
    half = batch.num_sequences // 2
    cu = batch.cu_seqlens.cpu()
    ids = batch.input_ids.cpu()

    def part(lo: int, hi: int) -> PackedBatch:
        a, b = int(cu[lo]), int(cu[hi])
        offsets = cu[lo : hi + 1] - a
        return PackedBatch(
            ids[a:b], offsets, position_ids_from_cu_seqlens(offsets),
            int((offsets[1:] - offsets[:-1]).max()), batch.seq_index[lo:hi],
        )

    return part(0, half), part(half, batch.num_sequences)


def token_layout(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position) of each of the pack's `total` tokens, without a host synchronisation.

    `total` comes from a shape, never from reading `cu_seqlens` back, so compiled code does not break
    its graph here and the host never waits for the device.
    """
    cu = cu_seqlens.long()
    sequence = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu[1:] - cu[:-1], output_size=total)
    return sequence, torch.arange(total, device=cu.device) - cu[sequence]


def padded_slots(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> torch.Tensor:
    """(T,) each token's row among the `B * max_seqlen` rows of the pack padded (`pad_packed`)."""
    sequence, position = token_layout(cu_seqlens, total)
    return sequence * max_seqlen + position


def pad_packed(x: torch.Tensor, slots: torch.Tensor, batch_size: int, max_seqlen: int) -> torch.Tensor:
    """(T, ...) packed -> (B, max_seqlen, ...) zero-padded, with the pack's `padded_slots`.

    Whole rows copied by one flat index: indexing by (sequence, position) pairs was an elementwise
    kernel that took 26% of DNABERT-S's GPU time in eager mode (bench/BENCHMARKS.md).
    """
    padded = x.new_zeros((batch_size * max_seqlen, *x.shape[1:]))
    return padded.index_copy_(0, slots, x).unflatten(0, (batch_size, max_seqlen))


def unpad(padded: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, S, ...) -> (T, ...) packed, in sequence order: the inverse of `pad_packed`."""
    return padded.flatten(0, 1).index_select(0, slots)


def length_groups(lengths: np.ndarray, max_padding: float) -> list[np.ndarray]:
    """Sequence indices grouped by length, shortest first: padded to its longest, a group's
    shortest sequence grows by at most `max_padding` (0.125: 12.5%). Equal lengths share a group."""
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or sorted_lengths[i] > sorted_lengths[start] * (1 + max_padding):
            groups.append(order[start:i])
            start = i
    return groups


def padded_gather_index(starts: np.ndarray, lengths: np.ndarray, max_seqlen: int) -> np.ndarray:
    """(n, max_seqlen) token index of each padded slot of n sequences; padding repeats a sequence's
    last token, so gathering needs no zero row and every padded value is finite."""
    return starts[:, None] + np.minimum(np.arange(max_seqlen), lengths[:, None] - 1)


def segment_mean(x: torch.Tensor, cu_seqlens: torch.Tensor, skip_first: int = 0, skip_last: int = 0) -> torch.Tensor:
    """Mean of each segment's rows, in fp32, leaving out `skip_first`/`skip_last` rows of each segment.

    ESM-2 pools residues only (skip BOS and EOS: 1, 1); DNABERT-S pools every token (0, 0).
    Free of host synchronisation (no boolean indexing, sizes from shapes) so the CPU can run ahead.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment, position = token_layout(cu_seqlens, x.shape[0])
    keep = (position >= skip_first) & (position < lengths[segment] - skip_last)
    sums = torch.zeros(len(lengths), x.shape[-1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, segment, x.float() * keep[:, None])
    counts = (lengths - skip_first - skip_last).clamp(min=1).to(torch.float32)
    return sums / counts[:, None]
