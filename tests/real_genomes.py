"""The real genomes the tests read: `../shared/data/real/` beside the checkout (its SOURCES.md says
where each comes from). Nothing is downloaded."""

from pathlib import Path

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
FLU = REAL_DATA / "influenza_a_california_07_2009.fasta"
PHIX = REAL_DATA / "phiX174.fasta"
