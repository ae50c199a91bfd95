"""The library never reaches the Dagster layer: `vnp_core` imports no Dagster and no `vnp_assets`."""

from __future__ import annotations

import json
import subprocess
import sys


def test_importing_every_core_module_loads_no_dagster_and_no_asset_layer() -> None:
    # A fresh interpreter: this test session has imported Dagster already.
    # A module of GPU kernels needs Triton, which CUDA builds of torch bring and CPU builds do not.
    program = (
        "import importlib, json, pkgutil, sys, vnp_core\n"
        "for module in pkgutil.walk_packages(vnp_core.__path__, 'vnp_core.'):\n"
        "    try:\n"
        "        importlib.import_module(module.name)\n"
        "    except ModuleNotFoundError as missing:\n"
        "        if missing.name != 'triton':\n"
        "            raise\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] in ('dagster', 'vnp_assets'))))\n"
    )
    found = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(found.stdout.splitlines()[-1]) == []


# Issue 18's budget for the product (vnp_core and vnp_assets): lines that hold code, that is, neither
# blank nor only a comment nor inside a docstring. 5,500 then; +100 for issue 16's FP8 mode (its
# layers, precision in the store's identity, and the validation's call agreement: ~130 lines); +50
# for its GELU kernel (29 lines) and the lease of a GPU-less host's one slot; +20 for the compile
# cache's hits and misses in a shard's log line, and a failed validation's criteria in its error line;
# +20 for ESM-2's residual adds left to the next LayerNorm, the GELU kernel's rows in two blocks and
# the seconds compiling at a shard's first pack; +50 for `vnp run` running one-at-a-time GPU steps in
# its own process (a small sample's embedding stage 3.8x faster) with a merge worker for large samples;
# +10 for a spare started once the waiting one is taken (a GPU host's validation imports meanwhile);
# +10 for the shard workers waiting for each other before the shards are handed out.
# +90: the FP8 ops as three custom ops, two more Triton kernels, and memory formats pickled by name
# (Inductor's cache key the same in a Ray actor as in a device process).
# +15: a URL refused where a path is wanted (the door, the settings), a failed Ray Client connect
# retried on each of Ray's three ways of saying its server died, then undone, and a retry's process
# tags, copied from its parent, left unjudged.
# +6: a run on Ray leaves its caller's process unconnected, as it found it (Ray ends a connected
# process 60 s after its cluster has gone). +1: the layers' floats traced as constants (each model
# traced once at a process's first pack, not twice).
# +68: the fused ops of both models (add + LayerNorm, gated GELU: two Triton kernels and their custom
# ops), ESM-2's fc1 GELU in cuBLASLt's epilogue, the padded attention's flat slots: ESM-2 fp16 +8%,
# DNABERT-S eager +33-36% on an H200.
# +58: DNABERT-S's attention as one Triton kernel over the pack with ALiBi, and its custom op
# (DNABERT-S 1.31M -> 1.70-1.77M tokens/s on an H200), and uncompiled models' kernels kept in the
# compile cache; FlexAttention's back end (-36) removed, 9x slower than that kernel.
CODE_LINE_BUDGET = 5998


def code_lines(source: str) -> int:
    import ast
    import io
    import tokenize

    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    skipped = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines = {line for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type not in skipped
             for line in range(token.start[0], token.end[0] + 1)}
    return len(lines - docstrings)


def test_the_product_stays_within_its_line_budget() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [path for package in ("vnp_core", "vnp_assets") for path in (root / package).rglob("*.py")]
    assert code_lines('"""A docstring."""\n\n# a comment\nx = (1,\n     2)  # two lines of code\n') == 2
    total = sum(code_lines(path.read_text()) for path in files)
    assert total <= CODE_LINE_BUDGET, f"{total} lines of code in vnp_core and vnp_assets, over {CODE_LINE_BUDGET}"
