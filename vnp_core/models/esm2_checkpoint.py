"""ESM-2 checkpoints: a fair-esm `.pt` file, a fair-esm model name in the local torch hub cache (never
downloaded), or a Hugging Face `facebook/esm2_*` directory, read into `PackedESM2` under fair-esm's names."""

from __future__ import annotations

import argparse
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vnp_core.config import EmbedConfig
from vnp_core.models.base import LoadedModel, ModelDescription, placement
from vnp_core.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_pickled_tensors,
    read_json,
    read_tensors,
    sha256_files,
)
from vnp_core.models.esm2 import LAYER_NORM_EPS, POOLING, TOKENS, ESM2Config, ESM2Tokenizer, PackedESM2
from vnp_core.models.fp8 import check_fp8_device, use_fp8_linears

# Heads by width for the released ESM-2 sizes: the one thing a state dict's shapes do not tell.
RELEASED_HEADS = {320: 20, 480: 20, 640: 20, 1280: 20, 2560: 40, 5120: 40}


def load_esm2(path: Path, config: EmbedConfig) -> LoadedModel:
    """A packed ESM-2 on `config.device` in `config.dtype` from a fair-esm .pt, hub name or HF directory."""
    source = resolve_checkpoint(Path(path))
    # The checksum reads the file a second time: on a thread (hashlib releases the GIL), it overlaps the load.
    with ThreadPoolExecutor(1, thread_name_prefix="vnp-sha256") as pool:
        weights_sha256 = pool.submit(sha256_files, _files_read(source))
        cfg, weights = read_esm2_weights(source)
        device, dtype, backend = placement(config, needs_bias=False)
        module = PackedESM2.from_weights(cfg, weights, device, dtype, backend)
    if config.fp8:
        check_fp8_device(device)
        use_fp8_linears(module.layers)  # quantised once, here; the embedding and final LayerNorm stay as they are
    description = _description(source, cfg, config, weights_sha256.result(), device, dtype, backend)
    return LoadedModel(**vars(description), module=module, tokenizer=ESM2Tokenizer(config.max_protein_length))


def describe_esm2(path: Path, config: EmbedConfig) -> ModelDescription:
    """The model `load_esm2` loads, from its config and checksum alone: a fair-esm file's tensors are
    memory-mapped and never read (a pre-zip pickle, which cannot be mapped, is read whole)."""
    source = resolve_checkpoint(Path(path))
    cfg = _hf_config(source) if source.is_dir() else _read_fair_esm(source)[0]
    return _description(source, cfg, config, sha256_files(_files_read(source)), *placement(config, needs_bias=False))


def _description(source: Path, cfg: ESM2Config, config: EmbedConfig, weights_sha256: str, device: torch.device,
                 dtype: torch.dtype, backend: str) -> ModelDescription:
    return ModelDescription(kind="esm2", name=source.stem if source.is_file() else source.name, embed_dim=cfg.embed_dim,
                            weights_sha256=weights_sha256, source=str(source), device=device, dtype=dtype,
                            attention_backend=backend, pooling=POOLING, fp8=config.fp8)


def read_esm2_weights(source: Path) -> tuple[ESM2Config, dict[str, torch.Tensor]]:
    """The config and the encoder's tensors under fair-esm's names, checked key by key and shape by shape."""
    cfg, weights = _read_hf_dir(source) if source.is_dir() else _read_fair_esm(source)
    with torch.device("meta"):
        expected = PackedESM2(cfg).state_dict()
    check_state_dict(weights, expected, source, f"an ESM-2 of {cfg}")
    return cfg, weights


def resolve_checkpoint(path: Path) -> Path:
    """A file or directory as given, or a fair-esm model name looked up in the torch hub cache (never downloaded)."""
    if path.exists():
        return path
    if path.name.startswith("esm2_") and not path.suffix and path.parent == Path("."):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{path.name}.pt"
        if cached.is_file():
            return cached
        raise FileNotFoundError(f"ESM-2 model {path.name!r} is not in the local torch hub cache: put {path.name}.pt at {cached}")
    raise FileNotFoundError(f"no ESM-2 checkpoint at {path}")


def _read_fair_esm(path: Path) -> tuple[ESM2Config, dict[str, torch.Tensor]]:
    # A fair-esm checkpoint pickles its config as an argparse.Namespace, the one object allowed besides
    # tensors and containers. Memory-mapped where the format allows (zip checkpoints): each tensor is
    # read once, as it is cast onto the device, rather than copied into host memory first.
    data = load_pickled_tensors(path, allowed=[argparse.Namespace], mmap=zipfile.is_zipfile(path))
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{path}: not a fair-esm checkpoint (expected a dict with a 'model' state dict)")
    # The same upgrade as fair-esm's loader, then drop the heads and the rotary buffers we recompute.
    weights = {re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", k): v for k, v in data["model"].items()}
    weights = {
        k: v for k, v in weights.items()
        if not (k.startswith(("lm_head.", "contact_head.")) or k.endswith("rot_emb.inv_freq"))
    }
    model_cfg = data.get("cfg", {}).get("model")
    if model_cfg is not None:
        args = vars(model_cfg) if isinstance(model_cfg, argparse.Namespace) else dict(model_cfg)
        return ESM2Config(args["encoder_layers"], args["encoder_embed_dim"], args["encoder_attention_heads"]), weights
    return _infer_config(path, weights), weights


def _infer_config(path: Path, weights: dict[str, torch.Tensor]) -> ESM2Config:
    if "embed_tokens.weight" not in weights:
        raise CheckpointError(f"{path}: missing weight 'embed_tokens.weight'")
    embed_dim = weights["embed_tokens.weight"].shape[1]
    if embed_dim not in RELEASED_HEADS:
        raise CheckpointError(f"{path}: no 'cfg' in the checkpoint and width {embed_dim} is no released ESM-2 size: "
                         "cannot tell the number of attention heads")
    num_layers = sum(1 for k in weights if re.fullmatch(r"layers\.\d+\.fc1\.weight", k))
    return ESM2Config(num_layers, embed_dim, RELEASED_HEADS[embed_dim])


# Hugging Face EsmModel module names -> fair-esm module names, inside one layer and at the top.
_HF_LAYER_MODULES = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_HF_TOP_MODULES = {"embeddings.word_embeddings": "embed_tokens", "encoder.emb_layer_norm_after": "emb_layer_norm_after"}
# transformers writes LayerNorm parameters under their legacy BERT names.
_HF_PARAMS = {"gamma": "weight", "beta": "bias"}


def _fair_esm_name(hf_name: str) -> str | None:
    """The fair-esm name of an HF encoder weight; None for heads, pooler and rotary buffers."""
    module, _, param = hf_name.removeprefix("esm.").rpartition(".")
    param = _HF_PARAMS.get(param, param)
    if layer := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module):
        index, module = layer.groups()
        mapped = _HF_LAYER_MODULES.get(module)
        return None if mapped is None else f"layers.{index}.{mapped}.{param}"
    mapped = _HF_TOP_MODULES.get(module)
    return None if mapped is None else f"{mapped}.{param}"


def _hf_config(directory: Path) -> ESM2Config:
    hf = read_json(directory / "config.json", ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    architecture = {
        "position_embedding_type": ("rotary", hf.get("position_embedding_type")),
        "emb_layer_norm_before": (False, bool(hf.get("emb_layer_norm_before"))),
        "token_dropout": (True, hf.get("token_dropout")),
        "vocab_size": (len(TOKENS), hf.get("vocab_size")),
        "layer_norm_eps": (LAYER_NORM_EPS, hf.get("layer_norm_eps")),
        "intermediate_size": (4 * hf["hidden_size"], hf.get("intermediate_size")),
    }
    for field, (wanted, found) in architecture.items():
        if found != wanted:
            raise CheckpointError(f"{directory / 'config.json'}: {field} is {found!r}; ESM-2 has {wanted!r}")
    return ESM2Config(hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"])


def _read_hf_dir(directory: Path) -> tuple[ESM2Config, dict[str, torch.Tensor]]:
    cfg, weights = _hf_config(directory), {}
    for weights_file in _hf_weight_files(directory):
        for hf_name, tensor in read_tensors(weights_file).items():
            if (name := _fair_esm_name(hf_name)) is not None:
                weights[name] = tensor
    return cfg, weights


def _hf_weight_files(directory: Path) -> list[Path]:
    """The weights file, or the shards its index lists (large models are saved sharded)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
        index = directory / f"{name}.index.json"
        if index.is_file():
            return [directory / shard for shard in sorted(set(read_json(index, ["weight_map"])["weight_map"].values()))]
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin (nor their sharded index)")


def _files_read(source: Path) -> list[Path]:
    return [source / "config.json", *_hf_weight_files(source)] if source.is_dir() else [source]
