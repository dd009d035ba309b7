"""Which RoPE pairs each criterion keeps, per layer (fraction of KV heads), from the criteria ablation's saved
plans: no model is run.

    python experiments/frequency_map.py [outputs/criteria_ablation] [--out docs/figures]
"""
import argparse

from common import REPO

from analysis.collect import collect
from analysis.figures import kept_frequency, save

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("roots", nargs="*", default=[str(REPO / "outputs" / "criteria_ablation")])
ap.add_argument("--out", default=str(REPO / "docs" / "figures"))
a = ap.parse_args()
df, _ = collect(*a.roots)
for path in save(kept_frequency(df), a.out):
    print(path)
