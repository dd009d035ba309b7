import os
from pathlib import Path

import pytest

# Tests never reach the hub or W&B servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: each worker's torch gets its share of the cores
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
TINY = ("tiny-llama", "tiny-mistral", "tiny-qwen2")


@pytest.fixture(scope="session")
def data_dir():
    from rap.data import resolve_data_dir

    d = resolve_data_dir()
    if d is None:
        pytest.skip("no data dir: set RAP_DATA_DIR or put the data in <repo>/../shared/data")
    return d


def compose(*overrides):
    """The job config as run.py would see it (without Hydra's own node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import rap.harness.resolvers  # noqa: F401  (the configs' resolvers)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
