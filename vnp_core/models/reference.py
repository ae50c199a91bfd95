"""The fp32 reference paths the packed forwards are validated against: unpacked, one sequence at a time.

ESM-2's is fair-esm's own `ESM2`. DNABERT-S has no runnable original (its remote code needs an old
Triton), so its reference writes the same equations out independently of `PackedDnabertS`
(explicit (L, L) ALiBi bias, plain softmax); it shares only the checkpoint reader and the tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vnp_core.config import ESM2_MAX_RESIDUES
from vnp_core.models.dnabert_s import DnabertSConfig, DnabertSTokenizer, alibi_slopes
from vnp_core.models.dnabert_s_checkpoint import read_checkpoint
from vnp_core.models.esm2_checkpoint import read_esm2_weights, resolve_checkpoint


def esm2_reference(checkpoint: Path, sequences: list[str], *, max_residues: int | None = ESM2_MAX_RESIDUES,
                   device: str = "cpu") -> np.ndarray:
    """(N, embed_dim) float32: fair-esm's own `ESM2` in fp32, one sequence at a time, same pooling."""
    import esm
    from esm.model.esm2 import ESM2

    cfg, weights = read_esm2_weights(resolve_checkpoint(Path(checkpoint)))
    # Built on the device: its random initialisation, overwritten at once, took seconds on the CPU
    # for the 3B model (and a second copy of the weights to move them).
    with torch.device(device):
        model = ESM2(cfg.num_layers, cfg.embed_dim, cfg.attention_heads)
    model.load_state_dict(weights, strict=False)  # LM/contact heads and rotary buffers are not read
    model.eval()
    to_tokens = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    out = np.empty((len(sequences), cfg.embed_dim), dtype=np.float32)
    with torch.inference_mode():
        for i, sequence in enumerate(sequences):
            residues = sequence[:max_residues]
            _, _, tokens = to_tokens([(str(i), residues)])
            hidden = model(tokens.to(device), repr_layers=[cfg.num_layers])["representations"][cfg.num_layers]
            out[i] = hidden[0, 1 : len(residues) + 1].mean(0).cpu().numpy()
    return out


def dnabert_s_reference(model_dir: Path, sequences: list[str], device: torch.device | str = "cpu") -> np.ndarray:
    """(N, hidden) float32: DNABERT-S's equations in fp32, one unpadded sequence at a time."""
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

    out = np.empty((len(sequences), d), dtype=np.float32)
    for row, sequence in enumerate(sequences):
        ids = torch.from_numpy(tokenizer.encode(sequence, str(row))[0]).to(device)
        n = len(ids)
        pos = torch.arange(n, dtype=torch.float32, device=device)
        bias = -slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs()  # (H, L, L)
        x = layer_norm(w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0],
                       "embeddings.LayerNorm")
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}"
            q, k, v = linear(x, f"{p}.attention.self.Wqkv").view(n, 3, heads, -1).permute(1, 2, 0, 3)  # (H, L, Dh)
            probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d // heads) + bias, dim=-1)
            a = (probs @ v).transpose(0, 1).reshape(n, d)
            x = layer_norm(linear(a, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            g = linear(x, f"{p}.mlp.gated_layers")
            h = F.gelu(g[:, :inner]) * g[:, inner:]
            x = layer_norm(linear(h, f"{p}.mlp.wo") + x, f"{p}.mlp.layernorm")
        out[row] = x.mean(0).cpu().numpy()
    return out
