"""Side-by-side GPU benchmark of vnp's packed embedders against what a user would otherwise run.

One run measures, on the same GPU and the same randomly initialised weights:
- ESM-2 3B (36 x 2560, 40 heads): vnp packed fp16/bf16 against fair-esm padded fp16 batches and
  Hugging Face `EsmModel` (SDPA) padded fp16 batches, plus the GEMM-only ceiling; accuracy of the
  packed fp16 path against fair-esm fp32 (per-sequence cosine of pooled embeddings).
- DNABERT-S (12 x 768, 12 heads, ALiBi): vnp packed fp16 against one sequence per call in fp32
  (the original tool's way) and length-sorted padded batches; accuracy against the fp32
  per-sequence reference.

Usage (on the lent H200): python bench/gpu_embed_bench.py --out $OUT/gpu_embed_bench.json
Random weights have the real models' cost per token; the real weights cannot be downloaded here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vnp_core.packing import make_batch, plan_packs  # noqa: E402

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
RESULTS: dict = {}
# "cpu" with --smoke: a quick run of this script's own logic on tiny shapes before spending GPU time.
DEVICE = "cuda"
ESM2_BACKEND = "torch_varlen"
SECTIONS = ("esm2", "esm2_compile", "esm2_fp8", "dnabert", "attention")
SHAPES = {"esm2": (36, 2560, 40), "dnabert": (12, 768, 12, 3072)}


def record(key: str, value) -> None:
    RESULTS[key] = value
    print(f"{key}: {value}", flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int = 1, reps: int = 2) -> float:
    """Median wall seconds of `fn` over `reps` runs after `warmup` runs, synchronised."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def protein_sets(rng: random.Random, scale: float) -> dict[str, list[str]]:
    def draw(n, length):
        return ["".join(rng.choice(AMINO_ACIDS) for _ in range(length())) for _ in range(int(n * scale))]

    return {
        "reads150": draw(12000, lambda: rng.choice([48, 49, 50])),
        "virnucpro500": draw(4000, lambda: rng.choice([165, 166])),
        "proteome": draw(1500, lambda: max(30, min(1022, int(rng.lognormvariate(5.6, 0.6))))),
    }


def padded_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """fair-esm extract.py batching: length-sorted, batch * max_len <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        if current and max(longest, lengths[i]) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


def cosine_stats(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-sequence cosine statistics, and whether they pass fp16's thresholds and FP8's (`ValidationConfig`)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "n": int(len(cos)), "min": float(cos.min()), "p1": float(np.percentile(cos, 1)),
        "median": float(np.median(cos)), "frac_ge_0.999": float((cos >= 0.999).mean()),
        "pass": bool((cos >= 0.995).all() and (cos >= 0.999).mean() >= 0.99),
        "pass_fp8": bool((cos >= 0.99).all() and (cos >= 0.995).mean() >= 0.99),
    }


def gemm_ceiling(num_layers: int, width: int, ffn: int, tokens: int = 16384, fp8: bool = False) -> dict:
    """Tokens/s of the layer GEMMs alone (qkv, out, fc1, fc2): what no implementation can beat."""
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(tokens, width, device=DEVICE, dtype=dtype)
        weights = [torch.randn(width, n, device=DEVICE, dtype=dtype) * 0.02 for n in (3 * width, width, ffn)]
        w2 = torch.randn(ffn, width, device=DEVICE, dtype=dtype) * 0.02

        def layers():
            for _ in range(num_layers):
                x @ weights[0]; x @ weights[1]; (x @ weights[2]) @ w2  # noqa: E702

        seconds = timed(layers, warmup=2, reps=5)
        flops = 2 * tokens * num_layers * (3 * width * width + width * width + 2 * width * ffn)
        out[str(dtype).removeprefix("torch.")] = {"tokens_per_s": round(tokens / seconds), "tflops": round(flops / seconds / 1e12, 1)}
    if fp8:  # the same GEMMs in e4m3 with row-wise scales, activations quantised beforehand (not timed)
        from vnp_core.models.fp8 import quantize_rows

        def fp8_weight(n_in, n_out):
            w8, scale = quantize_rows(torch.randn(n_out, n_in, device=DEVICE) * 0.02)
            return w8.T, scale.T.contiguous()

        x8, x_scale = quantize_rows(torch.randn(tokens, width, device=DEVICE))
        h8, h_scale = quantize_rows(torch.randn(tokens, ffn, device=DEVICE))
        gemms = [(x8, x_scale, *fp8_weight(width, 3 * width)), (x8, x_scale, *fp8_weight(width, width)),
                 (x8, x_scale, *fp8_weight(width, ffn)), (h8, h_scale, *fp8_weight(ffn, width))]

        def fp8_layers():
            for _ in range(num_layers):
                for a, a_scale, b, b_scale in gemms:
                    torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=torch.float16)

        seconds = timed(fp8_layers, warmup=2, reps=5)
        flops = 2 * tokens * num_layers * (3 * width * width + width * width + 2 * width * ffn)
        out["fp8_e4m3_rowwise"] = {"tokens_per_s": round(tokens / seconds), "tflops": round(flops / seconds / 1e12, 1)}
    return out


# ---------------------------------------------------------------- ESM-2 baselines a user would run


def fair_esm_embed(model, alphabet, sequences: list[str], max_tokens: int, layer: int) -> np.ndarray:
    """fair-esm's extract.py way: padded length-sorted batches, mean over residues."""
    converter = alphabet.get_batch_converter()
    out = np.zeros((len(sequences), model.embed_dim), dtype=np.float32)
    with torch.inference_mode():
        for batch in padded_batches([len(s) + 2 for s in sequences], max_tokens):
            _, _, tokens = converter([(str(i), sequences[i]) for i in batch])
            tokens = tokens.to(DEVICE, non_blocking=True)
            hidden = model(tokens, repr_layers=[layer])["representations"][layer]
            residue = (tokens != alphabet.padding_idx) & (tokens != alphabet.cls_idx) & (tokens != alphabet.eos_idx)
            pooled = (hidden.float() * residue[..., None]).sum(1) / residue.sum(1, keepdim=True)
            out[batch] = pooled.cpu().numpy()
    return out


def hf_esm_model(num_layers: int, width: int, heads: int):
    from transformers import EsmConfig, EsmModel

    config = EsmConfig(vocab_size=33, hidden_size=width, num_hidden_layers=num_layers, num_attention_heads=heads,
                       intermediate_size=4 * width, position_embedding_type="rotary", token_dropout=True,
                       mask_token_id=32, pad_token_id=1, max_position_embeddings=1026,
                       emb_layer_norm_before=False, layer_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    with torch.device(DEVICE):
        model = EsmModel(config, add_pooling_layer=False)
    return model.eval().half()


def hf_esm_run(model, alphabet, sequences: list[str], max_tokens: int) -> None:
    converter = alphabet.get_batch_converter()
    with torch.inference_mode():
        for batch in padded_batches([len(s) + 2 for s in sequences], max_tokens):
            _, _, tokens = converter([(str(i), sequences[i]) for i in batch])
            tokens = tokens.to(DEVICE, non_blocking=True)
            hidden = model(input_ids=tokens, attention_mask=(tokens != 1).long()).last_hidden_state
            residue = (tokens > 3)[..., None]
            (hidden.float() * residue).sum(1) / residue.sum(1)


# ---------------------------------------------------------------- vnp's packed path


def to_device(batch):
    return batch.pin_memory().to(DEVICE, non_blocking=True) if DEVICE == "cuda" else batch


def vnp_embed(module, token_ids: list[np.ndarray], max_tokens: int) -> np.ndarray:
    """What the engine's GPU loop does per shard: pack, pin, copy asynchronously, embed, gather."""
    vectors, order = [], []
    with torch.inference_mode():
        for pack in plan_packs([len(t) for t in token_ids], max_tokens):
            batch = to_device(make_batch([token_ids[i] for i in pack], pack))
            vectors.append(module.embed(batch))
            order.append(batch.seq_index)
        stacked = torch.cat(vectors).cpu().numpy()
    result = np.empty_like(stacked)
    result[torch.cat(order).numpy()] = stacked
    return result


def fuse_qkv(model):
    """Variant for measurement: one (3d x d) linear layer for q, k and v instead of three."""
    import types

    from vnp_core.attention import attend
    from vnp_core.models.esm2 import apply_rotary

    for layer in model.layers:
        attn = layer.self_attn
        width = attn.q_proj.in_features
        attn.qkv = torch.nn.Linear(width, 3 * width, device=attn.q_proj.weight.device, dtype=attn.q_proj.weight.dtype)
        attn.qkv.weight.data = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        attn.qkv.bias.data = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        del attn.q_proj, attn.k_proj, attn.v_proj

        def forward(self, x, plan, cos, sin):
            q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
            out = attend(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, plan, scale=self.head_dim**-0.5)
            return self.out_proj(out.flatten(1))

        attn.forward = types.MethodType(forward, attn)
    return model


def esm2_section(args) -> None:
    import esm
    from esm.model.esm2 import ESM2

    from vnp_core.models.esm2 import ESM2Config, ESM2Tokenizer, PackedESM2

    layers, width, heads = SHAPES["esm2"]
    record("esm2_gemm_ceiling", gemm_ceiling(layers, width, 4 * width, fp8=args.fp8))
    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    torch.manual_seed(0)
    with torch.device(DEVICE):
        fair = ESM2(layers, width, heads, alphabet, token_dropout=True).eval()  # fp32: the reference
    weights = {k: v for k, v in fair.state_dict().items()
               if not (k.startswith(("lm_head.", "contact_head.")) or k.endswith("rot_emb.inv_freq"))}
    cfg = ESM2Config(layers, width, heads)
    ours = {
        "fp16_torch_varlen": PackedESM2.from_weights(cfg, weights, DEVICE, torch.float16, ESM2_BACKEND),
        "fp16_torch_varlen_compiled": PackedESM2.from_weights(cfg, weights, DEVICE, torch.float16, ESM2_BACKEND),
    }
    ours["fp16_torch_varlen_compiled"].compile_layers()  # the engine's choice on CUDA for a large shard
    if args.fp8:  # what `EmbedConfig(fp8=True)` loads: the same weights, linear layers quantised once
        from vnp_core.models.fp8 import use_fp8_linears

        for variant in ("fp8_torch_varlen", "fp8_torch_varlen_compiled"):
            ours[variant] = PackedESM2.from_weights(cfg, weights, DEVICE, torch.float16, ESM2_BACKEND)
            use_fp8_linears(ours[variant].layers)
        ours["fp8_torch_varlen_compiled"].compile_layers()
    if args.esm2_variants:
        ours["bf16_torch_varlen"] = PackedESM2.from_weights(cfg, weights, DEVICE, torch.bfloat16, ESM2_BACKEND)
    del weights
    if args.esm2_variants:
        # Candidate speed-up, measured here before it goes into the model file. (torch.compile with
        # dynamic shapes was tried too: inductor's fused rotary kernel hit a device-side assert.)
        ours["fp16_torch_varlen_fused_qkv"] = fuse_qkv(
            PackedESM2.from_weights(cfg, {k: v for k, v in ours["fp16_torch_varlen"].state_dict().items()},
                                    DEVICE, torch.float16, ESM2_BACKEND))
    tokenizer = ESM2Tokenizer(1022)
    sets = protein_sets(random.Random(0), args.scale)

    # Accuracy: packed reduced precision against fair-esm fp32 on a subset of every set.
    for name, seqs in sets.items():
        subset = seqs[: args.accuracy_n]
        reference = fair_esm_embed(fair, alphabet, subset, 8192, layers)
        tokens = [tokenizer.encode(s, str(i))[0] for i, s in enumerate(subset)]
        for variant, module in ours.items():
            record(f"esm2_accuracy_{variant}_vs_fair_esm_fp32_{name}", cosine_stats(vnp_embed(module, tokens, 16384), reference))
        RESULTS.setdefault("_esm2_reference", {})[name] = reference
    fair = fair.half()
    for name, seqs in sets.items():
        record(f"esm2_accuracy_fair_esm_fp16_vs_fp32_{name}",
               cosine_stats(fair_esm_embed(fair, alphabet, seqs[: args.accuracy_n], 8192, layers), RESULTS["_esm2_reference"][name]))
    del RESULTS["_esm2_reference"]

    # Throughput, side by side on the same sets.
    hf = hf_esm_model(layers, width, heads)
    for name, seqs in sets.items():
        residues = sum(len(s) for s in seqs)
        n_tokens = residues + 2 * len(seqs)
        tokens = [tokenizer.encode(s, str(i))[0] for i, s in enumerate(seqs)]
        runs = {
            "fair_esm_fp16_padded_16k": lambda: fair_esm_embed(fair, alphabet, seqs, 16384, layers),
            "hf_esm_sdpa_fp16_padded_16k": lambda: hf_esm_run(hf, alphabet, seqs, 16384),
            "vnp_fp16_packed_16k": lambda: vnp_embed(ours["fp16_torch_varlen"], tokens, 16384),
            "vnp_fp16_packed_64k": lambda: vnp_embed(ours["fp16_torch_varlen"], tokens, 65536),
            "vnp_fp16_packed_compiled_64k": lambda: vnp_embed(ours["fp16_torch_varlen_compiled"], tokens, 65536),
        }
        for variant in ("bf16_torch_varlen", "fp16_torch_varlen_fused_qkv", "fp8_torch_varlen", "fp8_torch_varlen_compiled"):
            if variant in ours:
                runs[f"vnp_{variant}_64k"] = lambda m=ours[variant]: vnp_embed(m, tokens, 65536)
        for variant, fn in runs.items():
            try:
                seconds = timed(fn, warmup=1, reps=args.reps)
                record(f"esm2_throughput_{variant}_{name}", {
                    "tokens_per_s": round(n_tokens / seconds), "residues_per_s": round(residues / seconds),
                    "sequences_per_s": round(len(seqs) / seconds, 1), "seconds": round(seconds, 3)})
            except Exception as error:  # a failing variant is recorded, not fatal
                record(f"esm2_throughput_{variant}_{name}", f"failed: {error!r}")
    engine_end_to_end(ours["fp16_torch_varlen_compiled"], cfg, sets["virnucpro500"], args.workdir)
    if args.fp8:
        engine_end_to_end(ours["fp8_torch_varlen_compiled"], cfg, sets["virnucpro500"], args.workdir, fp8=True)
    del hf, fair, ours
    torch.cuda.empty_cache()


def engine_end_to_end(module, cfg, sequences: list[str], workdir: Path, fp8: bool = False) -> None:
    """The product path: `embed_sequences` with worker tokenising, checkpoints and the HDF5 shard."""
    from vnp_core.config import EmbedConfig
    from vnp_core.engine import embed_sequences
    from vnp_core.models import LoadedModel
    from vnp_core.models.esm2 import POOLING, ESM2Tokenizer

    loaded = LoadedModel(kind="esm2", name="esm2_t36_3B_random", module=module, tokenizer=ESM2Tokenizer(1022),
                         embed_dim=cfg.embed_dim, weights_sha256="random", source="random", device=torch.device(DEVICE),
                         dtype=torch.float16, attention_backend=ESM2_BACKEND, pooling=POOLING, fp8=fp8)
    ids = [f"p{i}" for i in range(len(sequences))]
    for run in range(2):  # the first run also pays compilation for new shapes
        out = workdir / f"engine_{run}.h5"
        out.unlink(missing_ok=True)
        stats = embed_sequences(loaded, ids, sequences, out, EmbedConfig(device=DEVICE, dtype="float16", max_tokens=65536, num_workers=4))
    record(f"esm2_throughput_vnp_engine_to_hdf5_{'fp8_' if fp8 else ''}compiled_64k_virnucpro500", {
        "tokens_per_s": round(stats.tokens_per_s), "sequences_per_s": round(stats.sequences_per_s, 1), "seconds": round(stats.seconds, 3)})


# multi_kernel: Inductor also generates whole-row ("persistent") reductions for rows up to 16k wide
# and picks, per kernel, the faster of the two at run time (no gain at d5917d3: bench/BENCHMARKS.md).
# max_autotune: Inductor also tries its own Triton GEMMs, into which it can fuse the bias and GELU.
# fp8_inductor_norms: also out_proj's quantisation left to torch.compile (its kernel swapped for the eager ops).
# fp16_inductor_norms: the add + LayerNorm fused by torch.compile, not our kernel.
# fp16_erf_gelu: the exact GELU as a pass of its own (torch.compile's), not in fc1's cuBLASLt epilogue.
# fp16_before: both, as main shipped fp16 before 2026-12-02.
FP8_VARIANTS = {"fp16": dict(fp8=False), "fp16_inductor_norms": dict(fp8=False, eager_norms=True),
                "fp16_erf_gelu": dict(fp8=False, erf_gelu=True), "fp16_before": dict(fp8=False, eager_norms=True, erf_gelu=True),
                "fp8_inductor_gelu": dict(fp8=True, inductor_gelu=True), "fp8": dict(fp8=True),
                "fp8_inductor_norms": dict(fp8=True, inductor_norms=True),
                "fp16_multi_kernel": dict(fp8=False, inductor={"triton.multi_kernel": 1}),
                "fp8_multi_kernel": dict(fp8=True, inductor={"triton.multi_kernel": 1}),
                "fp16_max_autotune": dict(fp8=False, inductor={"max_autotune_gemm": True}),
                "fp8_max_autotune": dict(fp8=True, inductor={"max_autotune_gemm": True})}


def esm2_fp8_section(args) -> None:
    """FP8 variants of ESM-2 3B, compiled as the engine runs them, against fp16 on the same weights:
    throughput, cosine against the packed fp32 model, and where one set's GPU time goes."""
    from vnp_core.models.esm2 import ESM2Config, ESM2Tokenizer, PackedESM2
    import torch._inductor.config

    from unittest import mock

    from vnp_core.models.esm2 import ResidualLayerNorm, TransformerLayer
    from vnp_core.models.fp8 import Fp8Linear, Fp8ResidualLayerNorm, quantize_rows, use_fp8_linears

    cfg = ESM2Config(*SHAPES["esm2"])
    torch.manual_seed(0)
    fp32 = PackedESM2.from_config(cfg, DEVICE, torch.float32, "sdpa_padded")  # flash kernels take no fp32
    with torch.no_grad():  # N(0, 0.02) as the checkpoints the benches write: well conditioned in fp32
        for name, tensor in fp32.named_parameters():
            if name.endswith(".weight") and tensor.ndim == 2:
                tensor.normal_(0, 0.02)
    weights = fp32.state_dict()

    def variant(fp8: bool, fused_qkv: bool = False, fast_accum: bool = True, inductor_gelu: bool = False,
                inductor_norms: bool = False):
        model = PackedESM2.from_weights(cfg, weights, DEVICE, torch.float16, ESM2_BACKEND)
        if fused_qkv:
            fuse_qkv(model)
        if fp8:
            use_fp8_linears(model.layers)
            for module in model.modules():
                if isinstance(module, Fp8Linear):
                    module.use_fast_accum = fast_accum
            if inductor_gelu:  # the GELU and fc2's quantisation left to torch.compile, as before row_kernels
                for layer in model.layers:
                    layer.activation = torch.nn.GELU()
            if inductor_norms:  # the add + LayerNorm + quantisation left to torch.compile, as main shipped it on 2026-12-01
                for layer in model.layers:
                    for name in ("self_attn_layer_norm", "final_layer_norm"):
                        fp8_norm = getattr(layer, name)
                        assert isinstance(fp8_norm, Fp8ResidualLayerNorm)
                        norm = ResidualLayerNorm(fp8_norm.normalized_shape, eps=fp8_norm.eps, device="meta")
                        norm.weight, norm.bias = fp8_norm.weight, fp8_norm.bias
                        setattr(layer, name, norm)
        model.compile_layers()
        return model

    variants = {label: dict(FP8_VARIANTS[label]) for label in args.fp8_variants.split(",")}  # popped below
    tokenizer = ESM2Tokenizer(1022)
    sets = {name: [tokenizer.encode(s, str(i))[0] for i, s in enumerate(seqs)]
            for name, seqs in protein_sets(random.Random(0), args.scale).items() if name != "proteome"}
    reference = {name: vnp_embed(fp32, tokens[: args.accuracy_n], 16384) for name, tokens in sets.items()}
    for label, options in variants.items():
        try:
            patches = contextlib.ExitStack()
            if options.get("inductor_norms"):
                patches.enter_context(mock.patch("vnp_core.models.fp8.quantize_activation_rows", quantize_rows))
            if options.pop("eager_norms", False):
                patches.enter_context(mock.patch.object(ResidualLayerNorm, "forward", eager_residual_norm))
            if options.pop("erf_gelu", False):
                patches.enter_context(mock.patch.object(TransformerLayer, "fc1_gelu", lambda self, h: self.activation(self.fc1(h))))
            # Dynamo would otherwise reuse the previous variant's trace: its guards do not see a patched method.
            torch._dynamo.reset()
            with torch._inductor.config.patch(options.pop("inductor", {})), patches:
                model = variant(**options)
                for name, tokens in sets.items():
                    record(f"esm2_fp8_accuracy_{label}_vs_fp32_{name}",
                           cosine_stats(vnp_embed(model, tokens[: args.accuracy_n], 16384), reference[name]))
                    n_tokens = sum(len(t) for t in tokens)
                    seconds = timed(lambda: vnp_embed(model, tokens, 65536), warmup=1, reps=args.reps)
                    record(f"esm2_fp8_throughput_{label}_{name}", {"tokens_per_s": round(n_tokens / seconds), "seconds": round(seconds, 3)})
                if label in ("fp16", "fp16_before", "fp8") and args.profile:
                    record(f"esm2_fp8_profile_{label}", kernel_profile(model, sets["virnucpro500"], 65536, top=20))
            del model
            torch.cuda.empty_cache()
        except Exception as error:  # a failing variant is recorded, not fatal
            record(f"esm2_fp8_{label}", f"failed: {error!r}")


def esm2_compile_section(args) -> None:
    """Regional torch.compile of each ESM-2 layer (attention stays an opaque op) against eager, same weights.

    Run in its own process: an inductor failure can leave a device-side assert that poisons the CUDA context.
    """
    from vnp_core.models.esm2 import ESM2Config, ESM2Tokenizer, PackedESM2

    torch.manual_seed(0)
    eager = PackedESM2.from_config(ESM2Config(*SHAPES["esm2"]), DEVICE, torch.float16, ESM2_BACKEND)
    seqs = protein_sets(random.Random(0), args.scale)["virnucpro500"]
    tokens = [ESM2Tokenizer(1022).encode(s, str(i))[0] for i, s in enumerate(seqs)]
    n_tokens = sum(len(t) for t in tokens)
    reference = vnp_embed(eager, tokens, 65536)
    seconds = timed(lambda: vnp_embed(eager, tokens, 65536), warmup=1, reps=args.reps)
    record("esm2_compile_eager_virnucpro500", {"tokens_per_s": round(n_tokens / seconds)})
    for layer in eager.layers:
        layer.compile(dynamic=True)
    compiled = vnp_embed(eager, tokens, 65536)
    record("esm2_compile_accuracy_vs_eager", cosine_stats(compiled, reference))
    seconds = timed(lambda: vnp_embed(eager, tokens, 65536), warmup=1, reps=args.reps)
    record("esm2_compile_layers_virnucpro500", {"tokens_per_s": round(n_tokens / seconds)})


# ---------------------------------------------------------------- DNABERT-S


def dna_sets(rng: np.random.Generator, scale: float) -> dict[str, list[str]]:
    def draw(n, length):
        return ["".join(rng.choice(list("ACGT"), size=length)) for _ in range(int(n * scale))]

    return {"reads150": draw(40000, 149), "chunks500": draw(10000, 499)}  # kept frames are 1 bp shorter than codons x3 + 1


def padded_token_ids(token_ids: list[np.ndarray], max_tokens: int, pad_id: int) -> list[list[np.ndarray]]:
    """Length-sorted batches, every sequence padded to its batch's longest: a padded model's work."""
    batches = []
    for batch in padded_batches([len(t) for t in token_ids], max_tokens):
        longest = max(len(token_ids[i]) for i in batch)
        batches.append([np.pad(token_ids[i], (0, longest - len(token_ids[i])), constant_values=pad_id) for i in batch])
    return batches


def dnabert_section(args, workdir: Path) -> None:
    from vnp_core.config import EmbedConfig
    from vnp_core.engine import compile_if_worth_it
    from vnp_core.models.dnabert_s_checkpoint import load_dnabert_s
    from vnp_core.models.reference import dnabert_s_reference
    from vnp_core.tiny_models import write_tiny_dnabert_s

    model_dir = write_tiny_dnabert_s(workdir / "dnabert_s_full", hidden=SHAPES["dnabert"][1], layers=SHAPES["dnabert"][0],
                                     heads=SHAPES["dnabert"][2], intermediate=SHAPES["dnabert"][3])
    sets = dna_sets(np.random.default_rng(0), args.scale)
    variants = {}
    # `unfused`: each layer's add + LayerNorm and gated GELU as separate eager ops (torch.compile fuses them
    # when it compiles) and the padding by index pairs, as main shipped them before 2026-12-02.
    candidates = [("float16", "sdpa_padded", True, False), ("float16", "sdpa_padded", True, True),
                  ("float16", "sdpa_padded", False, False), ("float16", "sdpa_padded", False, True),
                  ("float32", "sdpa_reference", False, False), ("float32", "sdpa_padded", False, False)]
    if DEVICE == "cuda":
        candidates += [("float16", "triton_varlen", False, False), ("float16", "triton_varlen", True, False)]
    for dtype, backend, compiled, unfused in candidates:
        try:
            # Loaders never compile (the engine decides per shard); compile_min_tokens=0: whatever the size.
            config = EmbedConfig(device=DEVICE, dtype=dtype, attention_backend=backend, compile_layers=compiled,
                                 compile_min_tokens=0)
            loaded = load_dnabert_s(model_dir, config)
            if unfused:
                for layer in loaded.module.encoder.layer:
                    layer.forward = types.MethodType(unfused_dnabert_s_layer, layer)
            variants[f"{dtype}_{backend}" + ("_compiled" if compiled else "") + ("_unfused" if unfused else "")] = (
                compile_if_worth_it(loaded, config, 0))
        except Exception as error:
            record(f"dnabert_load_{dtype}_{backend}", f"failed: {error!r}")
    tokenizer = next(iter(variants.values())).tokenizer

    for name, seqs in sets.items():
        subset = seqs[: args.accuracy_n]
        reference = dnabert_s_reference(model_dir, subset, device=DEVICE)
        tokens = [tokenizer.encode(s, str(i))[0] for i, s in enumerate(subset)]
        for variant, loaded in variants.items():
            try:
                record(f"dnabert_accuracy_{variant}_vs_fp32_reference_{name}", cosine_stats(vnp_embed(loaded.module, tokens, 16384), reference))
            except Exception as error:
                record(f"dnabert_accuracy_{variant}_{name}", f"failed: {error!r}")

    for name, seqs in sets.items():
        tokens = [tokenizer.encode(s, str(i))[0] for i, s in enumerate(seqs)]
        n_tokens = sum(len(t) for t in tokens)
        record(f"dnabert_tokens_{name}", {"sequences": len(seqs), "tokens": n_tokens, "mean_tokens": round(n_tokens / len(seqs), 1)})
        one_by_one = tokens[:300]
        fp32 = variants["float32_sdpa_reference"].module
        runs = {
            # The original tool's way: one sequence per call, fp32 (timed on 300 sequences, scaled).
            "one_sequence_per_call_fp32": (lambda: vnp_embed(fp32, one_by_one, 1), sum(len(t) for t in one_by_one)),
        }
        for dtype_name in ("float32", "float16"):
            key = f"{dtype_name}_sdpa_padded"
            if key in variants:
                padded = padded_token_ids(tokens, 16384, pad_id=0)
                module = variants[key].module

                def run_padded(module=module, padded=padded):
                    with torch.inference_mode():
                        for batch in padded:
                            module.embed(to_device(make_batch(batch, range(len(batch)))))
                    sync()

                runs[f"padded_batches_16k_{dtype_name}"] = (run_padded, n_tokens)
        for variant in ("float16_sdpa_padded_unfused", "float16_sdpa_padded", "float16_sdpa_padded_compiled_unfused",
                        "float16_sdpa_padded_compiled", "float16_triton_varlen", "float16_triton_varlen_compiled"):
            if variant in variants:
                for budget in (65536, 262144):
                    runs[f"vnp_packed_{variant}_{budget // 1024}k"] = (
                        lambda m=variants[variant].module, b=budget: vnp_embed(m, tokens, b), n_tokens)
        for variant, (fn, counted_tokens) in runs.items():
            try:
                seconds = timed(fn, warmup=1, reps=args.reps)
                record(f"dnabert_throughput_{variant}_{name}", {"tokens_per_s": round(counted_tokens / seconds), "seconds": round(seconds, 3)})
            except Exception as error:
                record(f"dnabert_throughput_{variant}_{name}", f"failed: {error!r}")
        if args.profile and DEVICE == "cuda":
            for variant in ("float16_sdpa_padded", "float16_sdpa_padded_compiled", "float16_triton_varlen",
                            "float16_triton_varlen_compiled"):
                if variant in variants:
                    record(f"dnabert_profile_{variant}_{name}", kernel_profile(variants[variant].module, tokens, 262144))


def attention_section(args) -> None:
    """DNABERT-S's attention alone (12 heads of 64, ALiBi) on one 256k-token pack of each length set:
    padded SDPA (pad, attend, unpad, as a layer runs it) against the Triton varlen kernel at several
    block sizes, and its agreement with the fp32 per-sequence reference."""
    from vnp_core.attention import attend, plan_attention
    from vnp_core.models.dnabert_s import alibi_slopes

    heads, head_dim = SHAPES["dnabert"][2], SHAPES["dnabert"][1] // SHAPES["dnabert"][2]
    slopes = alibi_slopes(heads).to(DEVICE)
    rng = np.random.default_rng(0)
    # Token counts of the real DNABERT-S vocabulary: ~35 a 150-bp read (25-45), ~110 a 500-bp chunk (90-130).
    shapes = {"reads150": (25, 46), "chunks500": (90, 131)}
    backends = ["sdpa_padded"] + (["triton_varlen"] if DEVICE == "cuda" else [])
    configs = [None, (32, 32), (64, 64), (64, 32), (128, 64), (64, 128)]
    for name, (lo, hi) in shapes.items():
        budget = 262144 if DEVICE == "cuda" else 2048
        lengths = rng.integers(lo, hi, size=budget // lo)
        lengths = lengths[: np.searchsorted(np.cumsum(lengths), budget)]
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=DEVICE)
        tokens, max_seqlen = int(cu[-1]), int(lengths.max())
        qkv = (torch.randn(tokens, 3, heads, head_dim, device=DEVICE) * 2).half()
        q, k, v = qkv.unbind(1)
        record(f"attention_tokens_{name}", {"sequences": len(lengths), "tokens": tokens, "max_seqlen": max_seqlen})
        reference_n = int(cu[min(200, len(lengths))])
        sub_cu = cu[: min(200, len(lengths)) + 1]
        reference = attend(*(t[:reference_n].float() for t in (q, k, v)),
                           plan_attention("sdpa_reference", sub_cu, reference_n, max_seqlen, torch.float32, slopes),
                           scale=head_dim ** -0.5)
        for backend in backends:
            for config in (configs if backend == "triton_varlen" else [None]):
                label = backend + ("" if config is None else f"_{config[0]}x{config[1]}")
                try:
                    plan = plan_attention(backend, cu, tokens, max_seqlen, torch.float16, slopes)
                    with block_sizes_fixed(config):
                        out = attend(q, k, v, plan, scale=head_dim ** -0.5)
                        seconds = timed(lambda: attend(q, k, v, plan, scale=head_dim ** -0.5), warmup=1, reps=max(args.reps, 5))
                    error = (out[:reference_n].float() - reference).abs().max().item()
                    record(f"attention_{label}_{name}", {"ms": round(seconds * 1e3, 3), "max_abs_error_vs_fp32": round(error, 5),
                                                         "tokens_per_s": round(tokens / seconds)})
                except Exception as error:
                    record(f"attention_{label}_{name}", f"failed: {error!r}")


@contextlib.contextmanager
def block_sizes_fixed(config: tuple[int, int] | None):
    """The Triton kernel's (BLOCK_M, BLOCK_N) fixed to `config` (None: its own choice)."""
    if config is None:
        yield
        return
    from vnp_core import varlen_attention

    original = varlen_attention.block_sizes
    varlen_attention.block_sizes = lambda _max_seqlen: config
    try:
        yield
    finally:
        varlen_attention.block_sizes = original


def unfused_dnabert_s_layer(self, x, plan):
    """`DnabertSLayer.forward` as main shipped it before 2026-12-02: each add, LayerNorm, GELU and product
    an eager op, and the padded attention's tokens moved by (sequence, position) pairs."""
    tokens, d = x.shape
    q, k, v = self.attention.self.Wqkv(x).view(tokens, 3, self.num_heads, -1).unbind(1)
    batch_size, length = len(plan.cu_seqlens) - 1, plan.max_seqlen
    layout = (plan.slots // length, plan.slots % length)
    padded = []
    for t in (q, k, v):
        p = t.new_zeros((batch_size, length, *t.shape[1:]))
        p[layout] = t
        padded.append(p.transpose(1, 2))
    a = torch.nn.functional.scaled_dot_product_attention(*padded, attn_mask=plan.mask, scale=q.shape[-1] ** -0.5)
    a = a.transpose(1, 2)[layout]
    x = self.attention.output.LayerNorm(self.attention.output.dense(a.reshape(tokens, d)) + x)
    gate, up = self.mlp.gated_layers(x).chunk(2, dim=-1)
    return self.mlp.layernorm(self.mlp.wo(torch.nn.functional.gelu(gate) * up) + x)


def eager_residual_norm(self, x, delta):
    """`ResidualLayerNorm.forward` as two ops, for torch.compile to fuse."""
    x = x + delta
    return x, torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def kernel_profile(module, token_ids: list[np.ndarray], max_tokens: int, top: int = 15) -> list[dict]:
    """Where one pack's GPU time goes: the `top` kernels by total device time (after a warm-up pack)."""
    from torch.profiler import ProfilerActivity, profile

    vnp_embed(module, token_ids[:20000], max_tokens)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        vnp_embed(module, token_ids[:20000], max_tokens)
        sync()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "calls": e.count, "ms": round(e.self_device_time_total / 1e3, 2),
             "share": round(e.self_device_time_total / total, 3)} for e in events[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vnp_bench"))
    parser.add_argument("--scale", type=float, default=1.0, help="Fraction of each length set's size.")
    parser.add_argument("--accuracy-n", type=int, default=256, help="Sequences per set compared against fp32.")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--sections", default="esm2,dnabert")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--esm2-variants", action="store_true", help="Also time bf16 and a fused-qkv candidate.")
    parser.add_argument("--fp8", action="store_true", help="Also ESM-2 with FP8 linear layers (Ada/Hopper), eager and compiled.")
    parser.add_argument("--fp8-variants", default="fp16,fp8_inductor_gelu,fp8", help="The esm2_fp8 section's variants.")
    parser.add_argument("--profile", action="store_true", help="Also record where the GPU time goes (ESM-2 fp16/FP8, DNABERT-S).")
    parser.add_argument("--smoke", action="store_true", help="Tiny shapes on the CPU: checks this script, measures nothing.")
    args = parser.parse_args()
    # Refused before any work: a misspelt name would otherwise surface minutes into a device call.
    if unknown := set(args.sections.split(",")) - set(SECTIONS):
        raise SystemExit(f"--sections: unknown {', '.join(map(repr, sorted(unknown)))}; expected some of {', '.join(SECTIONS)}")
    if unknown := set(args.fp8_variants.split(",")) - set(FP8_VARIANTS):
        raise SystemExit(f"--fp8-variants: unknown {', '.join(map(repr, sorted(unknown)))}; expected some of {', '.join(FP8_VARIANTS)}")
    global DEVICE, ESM2_BACKEND
    if args.smoke:
        DEVICE, ESM2_BACKEND = "cpu", "sdpa_padded"
        SHAPES.update(esm2=(2, 64, 4), dnabert=(2, 64, 4, 128))

    import transformers

    record("command", " ".join(sys.argv))
    record("commit", args.commit)
    record("gpu", torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke)")
    from importlib.metadata import version
    record("versions", {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                        "transformers": transformers.__version__, "fair-esm": version("fair-esm")})
    args.workdir.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    try:
        if "esm2" in sections:
            esm2_section(args)
        if "esm2_compile" in sections:
            esm2_compile_section(args)
        if "esm2_fp8" in sections:
            esm2_fp8_section(args)
        if "dnabert" in sections:
            dnabert_section(args, args.workdir)
        if "attention" in sections:
            attention_section(args)
    finally:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(RESULTS, indent=1, default=str))
        print_table()


def print_table() -> None:
    print("\n| measurement | value |\n|---|---|")
    for key, value in RESULTS.items():
        if isinstance(value, dict) and "tokens_per_s" in value:
            print(f"| {key} | {value['tokens_per_s']:,} tok/s |")
        elif isinstance(value, dict) and "min" in value:
            print(f"| {key} | min {value['min']:.5f} p1 {value['p1']:.5f} pass={value['pass']} pass_fp8={value['pass_fp8']} |")


if __name__ == "__main__":
    main()
