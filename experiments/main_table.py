"""The main table: RAP, RAP with a low-rank V, Palu-style and EliteKV-style at ratios 0 / 0.2 / 0.3.

    python experiments/main_table.py                       # eval=quick on SmolLM2 (the preset's defaults)
    python experiments/main_table.py eval=paper model=llama3-8b
Writes outputs/main_table/ (one folder per job), docs/main_table.md and the figures in docs/figures/.
"""
import sys

from common import REPO, analyse, run_preset

root = run_preset("main_table", sys.argv[1:])
analyse([root], report=REPO / "docs" / "main_table.md", figures=REPO / "docs" / "figures",
        only=("ratio_curves", "pareto"))
