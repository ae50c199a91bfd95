"""The fp32 reference paths the packed forwards are validated against: unpacked.

ESM-2's is fair-esm's own `ESM2`, in its padded batches. DNABERT-S has no runnable original (its remote
code needs an old Triton), so its reference writes the same equations out independently of
`PackedDnabertS` (explicit (L, L) ALiBi bias, plain softmax, padded batches with the padding masked);
it shares only the checkpoint reader and the tokenizer.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vnp_core.config import ESM2_MAX_RESIDUES
from vnp_core.models.dnabert_s import DnabertSConfig, DnabertSTokenizer, alibi_slopes
from vnp_core.models.dnabert_s_checkpoint import read_checkpoint
from vnp_core.models.esm2_checkpoint import read_esm2_weights, resolve_checkpoint

log = logging.getLogger(__name__)


def esm2_reference(checkpoint: Path, sequences: list[str], *, max_residues: int | None = ESM2_MAX_RESIDUES,
                   device: str = "cpu", batch_tokens: int = 16384) -> np.ndarray:
    """(N, embed_dim) float32: fair-esm's own `ESM2` in fp32, same pooling, in fair-esm's padded batches
    of proteins of similar length (at most `batch_tokens` tokens with padding; 0: one at a time).

    One protein at a time, the 3B model's reference of 512 proteins took ~16 s of an H200; batches give
    the same vectors to fp32 rounding (fair-esm masks the padding), in well under a second.
    """
    import esm
    from esm.model.esm2 import ESM2

    start = time.perf_counter()
    cfg, weights = read_esm2_weights(resolve_checkpoint(Path(checkpoint)))
    # Built on the device: its random initialisation, overwritten at once, took seconds on the CPU
    # for the 3B model (and a second copy of the weights to move them).
    with torch.device(device):
        model = ESM2(cfg.num_layers, cfg.embed_dim, cfg.attention_heads)
    model.load_state_dict(weights, strict=False)  # LM/contact heads and rotary buffers are not read
    model.eval()
    loaded = time.perf_counter()
    to_tokens = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    crops = [sequence[:max_residues] for sequence in sequences]
    out = np.empty((len(crops), cfg.embed_dim), dtype=np.float32)
    with torch.inference_mode():
        for batch in _length_batches([len(crop) + 2 for crop in crops], batch_tokens):  # + <cls> and <eos>
            _, _, tokens = to_tokens([(str(i), crops[i]) for i in batch])
            hidden = model(tokens.to(device), repr_layers=[cfg.num_layers])["representations"][cfg.num_layers]
            for row, i in enumerate(batch):
                out[i] = hidden[row, 1 : len(crops[i]) + 1].mean(0).cpu().numpy()
    log.info("esm2 fp32 reference: weights on %s in %.1f s, %d proteins embedded in %.1f s", device, loaded - start,
             len(crops), time.perf_counter() - loaded)
    return out


def _length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Positions grouped shortest first, each group's count times its longest length within `batch_tokens`
    (a longer one alone)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batches and (len(batches[-1]) + 1) * lengths[i] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def dnabert_s_reference(model_dir: Path, sequences: list[str], device: torch.device | str = "cpu", *,
                        batch_tokens: int = 16384) -> np.ndarray:
    """(N, hidden) float32: DNABERT-S's equations in fp32, over padded batches of sequences of similar
    length (at most `batch_tokens` tokens with padding; 0: one at a time), padded keys masked out."""
    config = DnabertSConfig.from_json(model_dir / "config.json")
    _, weights = read_checkpoint(model_dir, torch.device(device))
    w = {key: tensor.float() for key, tensor in weights.items()}
    tokenizer = DnabertSTokenizer(model_dir / "tokenizer.json")
    d, heads, inner = config.hidden_size, config.num_attention_heads, config.intermediate_size
    slopes = alibi_slopes(heads).to(device)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[f"{name}.weight"].T + w.get(f"{name}.bias", 0.0)

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (d,), w[f"{name}.weight"], w[f"{name}.bias"], config.layer_norm_eps)

    token_ids = [tokenizer.encode(sequence, str(row))[0] for row, sequence in enumerate(sequences)]
    out = np.empty((len(sequences), d), dtype=np.float32)
    for batch in _length_batches([len(ids) for ids in token_ids], batch_tokens):
        n, length = len(batch), max(len(token_ids[row]) for row in batch)
        ids = torch.zeros((n, length), dtype=torch.long)
        real = torch.zeros((n, length), dtype=torch.bool)
        for i, row in enumerate(batch):
            ids[i, : len(token_ids[row])] = torch.from_numpy(token_ids[row])
            real[i, : len(token_ids[row])] = True
        ids, real = ids.to(device), real.to(device)
        pos = torch.arange(length, dtype=torch.float32, device=device)
        bias = -slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs()  # (H, L, L)
        bias = bias[None].masked_fill(~real[:, None, None, :], float("-inf"))  # (n, H, L, L): no weight on padding
        x = layer_norm(w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0],
                       "embeddings.LayerNorm")
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}"
            q, k, v = linear(x, f"{p}.attention.self.Wqkv").view(n, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads) + bias, dim=-1)  # (n, H, L, L)
            a = (probs @ v).transpose(1, 2).reshape(n, length, d)
            x = layer_norm(linear(a, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            g = linear(x, f"{p}.mlp.gated_layers")
            h = F.gelu(g[..., :inner]) * g[..., inner:]
            x = layer_norm(linear(h, f"{p}.mlp.wo") + x, f"{p}.mlp.layernorm")
        pooled = (x * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # mean over each sequence's own tokens
        out[batch] = pooled.cpu().numpy()
    return out
