"""Words for a run's settings, shared by the run names (``rap.harness.resolvers``) and the report labels (each
method's ``Method.label``). No torch here: run.py imports the resolvers before Hydra parses the command line."""
from __future__ import annotations


def grouping(group_size) -> str:
    """A grouping of KV heads as run names say it: ``joint`` for 0, ``head`` for 1, else ``g<size>`` (capped at the
    KV heads when the model has fewer; the plan and the report label record the grouping that ran)."""
    g = int(group_size)
    return "joint" if g <= 0 else "head" if g == 1 else f"g{g}"


def grouping_words(group_size) -> str:
    """The grouping as a report label says it: joint, per head, g=4."""
    return {"head": "per head", "joint": "joint"}.get(grouping(group_size), f"g={int(group_size)}")


def low_rank_v_words(group_size) -> str:
    """RAP's value latent: per KV head (the cost of channel pruning), or joint over a group of heads."""
    return "low-rank V" if int(group_size) == 1 else f"low-rank V, {grouping_words(group_size)}"


def qk_norm_words(row) -> str | None:
    """The QK-norm mode as it ran (metrics.json's ``qk_norm``; absent on models without QK-norm)."""
    mode = row.get("qk_norm")
    return f"QK-norm {mode}" if isinstance(mode, str) else None


def default_size(row) -> str:
    """The job's calibration batch as "n × seqlen" (tokens per sequence)."""
    return f"{row.get('cfg.calibration.n_samples')} × {row.get('cfg.calibration.seqlen')}"


def whiten_size(row) -> str:
    """The batch the whitening Grams read: ``calibration.whiten`` where set, else the job's batch."""
    size = row.get("cfg.calibration.whiten")
    return f"{size[0]} × {size[1]}" if isinstance(size, list | tuple) else default_size(row)


def option(row, key: str, default=None):
    """A method option of a flat result row (``cfg.method.<key>``)."""
    return row.get(f"cfg.method.{key}", default)
