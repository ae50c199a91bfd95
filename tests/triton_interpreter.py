"""Triton kernels tested without a GPU: a test file's kernel cases run again in a subprocess with
`TRITON_INTERPRET=1`, where Triton runs the same kernels on the CPU in NumPy. The variable takes
effect when a kernel is defined, so it cannot be switched on inside this process.

A kernel test file marks its cases `runs_here` and defines
`test_every_case_passes_in_tritons_interpreter = interpreter_rerun(__file__)`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_here = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                               reason="on a GPU; without one, test_every_case_passes_in_tritons_interpreter runs it")


def interpreter_rerun(test_file: str):
    """The test that runs `test_file` in Triton's interpreter where its cases cannot run here."""

    @pytest.mark.skipif(torch.cuda.is_available() or INTERPRETED,
                        reason="runs the cases above where they cannot run: without a GPU, outside the interpreter")
    @pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package (the dev extra)")
    def test_every_case_passes_in_tritons_interpreter():
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                                env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        summary = result.stdout.strip().splitlines()[-1]
        assert "1 skipped" in summary and "failed" not in summary, summary  # every case ran but this one

    return test_every_case_passes_in_tritons_interpreter
