"""What produced a result: rap's version and git state, the package versions, and the hardware. Every job
stores these in ``metrics.json`` and the W&B config as ``env_*`` keys, so results from different environments
are never mixed up silently (``analysis/report.py`` flags columns that differ)."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = {"torch": "torch", "transformers": "transformers", "lm_eval": "lm-eval", "datasets": "datasets",
            "hydra_core": "hydra-core"}
REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state() -> dict:
    """The commit of the checkout rap runs from and whether it had uncommitted changes (None outside git)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain") if commit else None
    return {"env_git_commit": commit, "env_git_dirty": None if status is None else bool(status)}


def package_versions() -> dict:
    out = {}
    for key, dist in PACKAGES.items():
        try:
            out[f"env_{key}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[f"env_{key}"] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def describe_environment(device, dtype) -> dict:
    """``env_*`` keys for one job that runs on ``device`` in ``dtype``."""
    import torch

    import rap

    return {
        "env_rap_version": rap.__version__, **git_state(),
        "env_python": platform.python_version(), **package_versions(),
        "env_device": str(device), "env_device_name": device_name(device),
        "env_dtype": str(dtype).replace("torch.", ""), "env_threads": torch.get_num_threads(),
        "env_platform": platform.platform(),
    }
