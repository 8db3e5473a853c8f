"""mmbench-merge entry point.

    python run.py                                      # the embedded default: the offline MiniBench
    python run.py model=qwen2vl method=optmerge        # one run
    python run.py -m method=ties,tsv method.scaling=0.3,0.5,1.0   # a grid
"""

import hydra
from omegaconf import DictConfig

from mmbench_merge.app import main_app
from mmbench_merge.config import register_configs
from mmbench_merge.preflight import one_line_errors

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    main_app(cfg)


if __name__ == "__main__":
    with one_line_errors():  # a bad key / type / option: one `error:` line, exit 2
        main()
