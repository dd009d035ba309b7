"""The criteria ablation: RAP with every scoring criterion (RoPE-blind control included) across ratios.

    python experiments/criteria_ablation.py                  # ratios 0 / 0.1 ... 0.5, eval=quick
    python experiments/criteria_ablation.py ratio=0,0.2,0.3  # a narrower grid
Writes outputs/criteria_ablation/, docs/criteria_ablation.md, and the criteria_ablation and kept_frequency
figures in docs/figures/.
"""
import sys

from common import REPO, analyse, run_preset

root = run_preset("criteria_ablation", sys.argv[1:])
analyse([root], report=REPO / "docs" / "criteria_ablation.md", figures=REPO / "docs" / "figures",
        only=("criteria_ablation", "kept_frequency"))
