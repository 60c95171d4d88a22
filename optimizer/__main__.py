"""`python -m optimizer [overrides]`: run or resume the study `study_name` (see conf/config.yaml)."""

from optimizer.cli import hydra_entry
from optimizer.runner import run

if __name__ == "__main__":
    hydra_entry(run)()
