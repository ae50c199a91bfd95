"""DNABERT-S checkpoints: a local Hugging Face directory (config.json, model.safetensors or
pytorch_model.bin, tokenizer.json) read into `PackedDnabertS`. None of the checkpoint's own code runs."""

from __future__ import annotations

from pathlib import Path

import torch

from vnp_core.config import EmbedConfig
from vnp_core.models.base import LoadedModel, ModelDescription, placement
from vnp_core.models.checkpoint import CheckpointError, check_state_dict, read_tensors, sha256_files
from vnp_core.models.dnabert_s import POOLING, DnabertSConfig, DnabertSTokenizer, PackedDnabertS, alibi_slopes

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The pooler and the MLM head are not part of the embedding.
UNUSED_WEIGHTS = ("pooler.", "cls.")


def weights_file(model_dir: Path) -> Path:
    files = [model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not files:
        raise FileNotFoundError(f"{model_dir}: no DNABERT-S weights ({' or '.join(WEIGHT_FILES)})")
    return files[0]


def read_checkpoint(model_dir: Path, device: torch.device) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file and its tensors, keyed as in DNABERT-S (DNABERT-2's `bert.` prefix removed,
    pooler and MLM head left out)."""
    file = weights_file(model_dir)
    raw = read_tensors(file, device=str(device))
    state = {key.removeprefix("bert."): tensor for key, tensor in raw.items()}
    return file, {key: tensor for key, tensor in state.items() if not key.startswith(UNUSED_WEIGHTS)}


def describe_dnabert_s(path: Path, config: EmbedConfig) -> ModelDescription:
    """The model `load_dnabert_s` loads, from config.json and the weights' checksum alone."""
    file, (device, dtype, backend) = weights_file(path), placement(config, needs_bias=True)
    return ModelDescription(kind="dnabert_s", name=path.name, source=str(file), weights_sha256=sha256_files([file]),
                            embed_dim=DnabertSConfig.from_json(path / "config.json").hidden_size, device=device,
                            dtype=dtype, attention_backend=backend, pooling=POOLING)


def load_dnabert_s(path: Path, config: EmbedConfig) -> LoadedModel:
    """DNABERT-S from a local Hugging Face directory: config.json, the weights, tokenizer.json."""
    model_config = DnabertSConfig.from_json(path / "config.json")
    tokenizer = DnabertSTokenizer(path / "tokenizer.json")
    # An id past the embedding table would fail later as an opaque device-side assert.
    if tokenizer.vocab_size > model_config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens, "
                              f"config.json's vocab_size is {model_config.vocab_size}")
    model = describe_dnabert_s(path, config)
    file, state = read_checkpoint(path, model.device)
    # Built on the meta device, then given the checkpoint's tensors: no random init, no second copy.
    with torch.device("meta"):
        module = PackedDnabertS(model_config, model.attention_backend)
    check_state_dict(state, module.state_dict(), file, "DNABERT-S")
    module.load_state_dict({key: tensor.to(model.dtype) for key, tensor in state.items()}, assign=True)
    # A non-persistent buffer: not in the checkpoint, so still on the meta device until set here.
    module.alibi_slopes = alibi_slopes(model_config.num_attention_heads).to(model.device)
    return LoadedModel(**vars(model), module=module.eval(), tokenizer=tokenizer)
