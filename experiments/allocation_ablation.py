"""Uniform against global allocation of RAP's budget across layers.

    python experiments/allocation_ablation.py [overrides]
Writes outputs/allocation_ablation/ and docs/allocation_ablation.md.
"""
import sys

from common import REPO, analyse, run_preset

root = run_preset("allocation_ablation", sys.argv[1:])
analyse([root], report=REPO / "docs" / "allocation_ablation.md")
