"""Run every SPIN round in one command: `python train.py model=tiny loss=hinge lam=0.5 rounds=3`.

Hydra composes conf/train.yaml with the command line's overrides; spinlab.cli runs the rounds
(spinlab.run) and ends with the run's exit status. Running the same command again resumes.
"""

import sys

import hydra
from omegaconf import DictConfig

from spinlab import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    cli.main(cfg)


if __name__ == "__main__":
    cli.check_command_line(sys.argv[1:])
    main()
