"""Where a GPU step's fixed cost goes, phase by phase, in a fresh process as the device process starts.

    CUDA_VISIBLE_DEVICES=0 python bench/startup_profile.py --esm2 esm2_3B_random.pt --dnabert-s dnabert_s_random
"""

from __future__ import annotations

import argparse
import time

START = time.perf_counter()
phases: list[tuple[str, float]] = []


def mark(name: str) -> None:
    phases.append((name, time.perf_counter() - START - sum(seconds for _, seconds in phases)))


def first_packs(model, tokenized) -> None:
    """Two small packs of different sizes: the compilation for fixed sizes, then the dynamic one."""
    import torch

    with torch.inference_mode():
        for pack in (range(3), range(3, 7)):
            model.module.embed(tokenized.batch(list(pack)).to(model.device))
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--esm2", required=True)
    parser.add_argument("--dnabert-s", required=True)
    args = parser.parse_args()
    import torch
    mark("import torch")
    import polars  # noqa: F401
    mark("import polars")
    import vnp_core.engine  # noqa: F401
    mark("import vnp_core.engine (rest)")
    torch.zeros(1, device="cuda")
    mark("CUDA context")
    import torch._dynamo
    import torch._inductor
    mark("import torch._dynamo/_inductor")
    from pathlib import Path

    from vnp_core.config import EmbedConfig
    from vnp_core.engine import compile_if_worth_it, tokenize
    from vnp_core.models import model_spec
    # compile_min_tokens=0: the layers are compiled whatever the size, so the warm-up phases time the
    # compilation (wrapping is free; tracing happens at the first pack).
    config = EmbedConfig(device="cuda", dtype="float16", compile_min_tokens=0)
    dnabert = compile_if_worth_it(model_spec("dnabert_s").load(Path(args.dnabert_s), config), config, 0)
    mark("load DNABERT-S")
    seqs = ["ACGTTGCAAGGCTTAACG" * (5 + i % 20) for i in range(2000)]
    tokenized = tokenize(dnabert.tokenizer, [str(i) for i in range(len(seqs))], seqs, 0)
    mark("tokenise 2000")
    first_packs(dnabert, tokenized)
    mark("compile DNABERT-S (warm-up)")
    esm = compile_if_worth_it(model_spec("esm2").load(Path(args.esm2), config), config, 0)
    mark("load ESM-2")
    proteins = ["MKVLAGHWYTRE" * (3 + i % 10) for i in range(2000)]
    first_packs(esm, tokenize(esm.tokenizer, [str(i) for i in range(len(proteins))], proteins, 0))
    mark("compile ESM-2 (warm-up)")
    for name, seconds in phases:
        print(f"{name:34s} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
