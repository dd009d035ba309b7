"""Entry point: `python run.py [overrides]`, or `python run.py -m ratio=0.2,0.3 ...` for a sweep."""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rap.errors import RapError
from rap.harness import resolvers  # registers the resolvers the configs use


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from rap.harness.job import run_job
    from rap.harness.summary import print_summary

    try:
        hydra_cfg = HydraConfig.get()
        launcher = OmegaConf.to_container(hydra_cfg.launcher) if "launcher" in hydra_cfg else None
        print_summary(run_job(cfg, hydra_cfg.runtime.output_dir, launcher))
    except RapError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    problem = resolvers.unknown_model_presets(sys.argv[1:], Path(__file__).parent / "conf")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
