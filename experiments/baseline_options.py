"""The baselines' own options at RAP's budget: Palu-style (svd/whiten x per-head/group/joint x uniform/fisher_uniform)
and EliteKV-style (greedy/uniform/contribution elite pairs), with the uncompressed baseline for the ratios.

    python experiments/baseline_options.py [overrides]
Writes outputs/baseline_options/ and docs/baseline_options.md.
"""
import sys

from common import REPO, analyse, run_preset, run_single

overrides = sys.argv[1:]
root = run_preset("baseline_options", overrides)
run_preset("elitekv_options", overrides)
run_single([*overrides, "sweep=baseline_options", "ratio=0"])  # the baseline row
analyse([root], report=REPO / "docs" / "baseline_options.md")
