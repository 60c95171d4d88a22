"""`python -m optimizer [overrides]`: run or resume the study `study_name` (see conf/config.yaml)."""

from optimizer.cli import hydra_entry  # first: it sets the environment before heavy imports
from optimizer.runner import run  # noqa: I001

if __name__ == "__main__":
    hydra_entry(run)()
