"""Tiny random models in the real checkpoint formats, so the whole platform runs on a laptop.

They go through the same loaders as the real weights (a fair-esm `.pt`, a Hugging Face DNABERT-S
directory, VirNucPro classifier files). Their outputs are placeholders with no biological meaning.
Writers are deterministic (same seed, same bytes) and fork only the CPU random state, so they never
start CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, processors, trainers
from torch import nn

from vnp_core.atomic import atomic_path
from vnp_core.classify import VirNucProClassifier
from vnp_core.models.dnabert_s import DnabertSConfig, PackedDnabertS
from vnp_core.models.esm2_checkpoint import read_esm2_weights

TINY_MODELS_NOTICE = "tiny random placeholder models: the embeddings and calls have no biological meaning"
_COMPLETE = ".complete"


def write_tiny_models(out_dir: Path) -> dict[str, Path]:
    """The tiny ESM-2, DNABERT-S and classifiers under `out_dir`, written once and reused after.

    Several processes may ask at once (parallel shard steps): each writes a private staging folder
    and renames it into place, so no process ever reads a half-written model.
    """
    out_dir = Path(out_dir)
    if not (out_dir / _COMPLETE).exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            _write(staging)
            (staging / _COMPLETE).touch()
            try:
                os.rename(staging, out_dir)
            except OSError as error:  # out_dir exists: fine when another process completed it first
                if not (out_dir / _COMPLETE).exists():
                    raise OSError(f"{out_dir} exists and is not a complete tiny-model folder: "
                                  "remove it or choose another") from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # left only when another process got there first
    return _paths(out_dir)


def tiny_model_paths(out_dir: Path, chunk_length: int) -> dict[str, Path]:
    """The tiny models `write_tiny_models` wrote under `out_dir`: each embedder's and the classifier for `chunk_length`."""
    if not (Path(out_dir) / _COMPLETE).exists():
        raise FileNotFoundError(f"{out_dir}: no tiny placeholder models there: write them first (vnp models make-tiny --out {out_dir})")
    paths = _paths(Path(out_dir))
    return {"esm2": paths["esm2"], "dnabert_s": paths["dnabert_s"], "classifier": paths[f"classifier_{chunk_length}"]}


def _paths(out_dir: Path) -> dict[str, Path]:
    paths = {"esm2": out_dir / "esm2_tiny.pt", "dnabert_s": out_dir / "dnabert_s_tiny"}
    for chunk_length in (300, 500):
        paths[f"classifier_{chunk_length}"] = out_dir / f"classifier_{chunk_length}" / f"{chunk_length}_model.state_dict.pt"
        paths[f"classifier_{chunk_length}_pickled"] = out_dir / f"classifier_{chunk_length}" / f"{chunk_length}_model.pth"
    return paths


def _write(out_dir: Path) -> None:
    paths = _paths(out_dir)
    write_tiny_esm2(paths["esm2"])
    write_tiny_dnabert_s(paths["dnabert_s"])
    in_features = tiny_feature_width(paths["esm2"], paths["dnabert_s"])
    for chunk_length in (300, 500):
        write_tiny_classifier(out_dir / f"classifier_{chunk_length}", in_features=in_features, chunk_length=chunk_length)


def tiny_feature_width(esm2_checkpoint: Path, dnabert_s_dir: Path) -> int:
    """DNABERT-S width + ESM-2 width: the classifier's input (3328 for the real models)."""
    esm2_config, _ = read_esm2_weights(Path(esm2_checkpoint))
    return DnabertSConfig.from_json(Path(dnabert_s_dir) / "config.json").hidden_size + esm2_config.embed_dim


# DNABERT-2's order of special tokens.
SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def write_tiny_esm2(path: Path, *, num_layers: int = 2, embed_dim: int = 64, attention_heads: int = 4,
                          seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random ESM-2 in fair-esm's release layout: `<name>.pt` and its `<name>-contact-regression.pt`.

    Random placeholder weights with no biological meaning. The name must start with "esm2", which
    is how fair-esm's `load_model_and_alphabet_local` recognises the ESM-2 format. `dtype` float16
    halves the file of a 3B-sized model.
    """
    from esm.model.esm2 import ESM2

    path = Path(path)
    if not path.name.startswith("esm2") or path.suffix != ".pt":
        raise ValueError(f"{path}: fair-esm only reads ESM-2 checkpoints named esm2*.pt")
    with torch.random.fork_rng(devices=[]):  # CPU tensors only: no CUDA context on every GPU
        torch.manual_seed(seed)
        model = ESM2(num_layers, embed_dim, attention_heads)
        # Non-trivial LayerNorms, so that a comparison against fair-esm exercises them.
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                nn.init.normal_(param, mean=1.0 if name.endswith("weight") else 0.0, std=0.2)
    state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in model.state_dict().items()}
    regression = {k: state.pop(k) for k in [k for k in state if k.startswith("contact_head.regression.")]}
    cfg = argparse.Namespace(encoder_layers=num_layers, encoder_embed_dim=embed_dim,
                             encoder_attention_heads=attention_heads, token_dropout=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path.with_name(f"{path.stem}-contact-regression.pt"), partial(torch.save, {"model": regression}))
    _write_atomic(path, partial(torch.save, {"model": state, "cfg": {"model": cfg}}))
    return path


def _train_tiny_tokenizer(seed: int, vocab_size: int) -> Tokenizer:
    """A DNA BPE tokenizer trained on deterministic pseudo-random sequence (no data files needed)."""
    rng = np.random.default_rng(seed)
    corpus = ["".join(rng.choice(list("ACGT"), size=1000)) for _ in range(200)]
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=list("ACGTN"), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    cls, sep = (("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]")))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep])
    return tokenizer


def _random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if "layernorm" in name.lower():
        # Far from the identity, so that a LayerNorm applied wrongly shows in the tests.
        return 1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise
    if name.startswith("embeddings."):
        return noise
    if name.endswith("bias"):
        return 0.1 * noise
    return noise * shape[-1] ** -0.5  # fan-in scaling keeps activations and attention logits O(1)


def write_tiny_dnabert_s(out_dir: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     intermediate: int = 128, seed: int = 0) -> Path:
    """A small random DNABERT-S directory in the real layout (same seed, same bytes).

    A placeholder for tests and laptops: its embeddings have no biological meaning.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tiny_tokenizer(seed, vocab_size=384)
    config = DnabertSConfig(hidden, layers, heads, intermediate, vocab_size=tokenizer.get_vocab_size())
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in PackedDnabertS(config, "sdpa_reference").state_dict().items()}
    shapes |= {"pooler.dense.weight": (hidden, hidden), "pooler.dense.bias": (hidden,)}
    generator = torch.Generator().manual_seed(seed)
    state = {name: _random_weight(name, shape, generator) for name, shape in shapes.items()}
    hf_config = asdict(config) | {
        "architectures": ["BertModel"], "model_type": "bert", "alibi_starting_size": 512,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 512, "position_embedding_type": "absolute", "torch_dtype": "float32",
    }
    _write_atomic(out_dir / "config.json", lambda p: p.write_text(json.dumps(hf_config, indent=2, sort_keys=True)))
    _write_atomic(out_dir / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    _write_atomic(out_dir / "model.safetensors", lambda p: save_file(state, str(p)))
    return out_dir


def write_tiny_classifier(out_dir: Path, *, in_features: int, chunk_length: int, seed: int = 0) -> dict[str, Path]:
    """A random classifier saved as our state dict file and as a pickled whole module (the original's form)."""
    with torch.random.fork_rng(devices=[]):  # CPU tensors only: no CUDA context on every GPU
        torch.manual_seed(seed)
        module = VirNucProClassifier(in_features)
        # Non-default BatchNorm statistics, so that a loader that drops the buffers changes the scores.
        module.bn1.running_mean.normal_()
        module.bn1.running_var.uniform_(0.5, 2.0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"state_dict": out_dir / f"{chunk_length}_model.state_dict.pt",
             "pickled_module": out_dir / f"{chunk_length}_model.pth"}
    _write_atomic(paths["state_dict"], partial(torch.save, {"state_dict": module.state_dict(), "chunk_length": chunk_length}))
    _write_atomic(paths["pickled_module"], partial(torch.save, module))
    return paths
