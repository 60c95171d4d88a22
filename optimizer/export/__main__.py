"""`python -m optimizer.export study_name=S [trial=N]`: (re-)export a trial of an existing study."""

from optimizer.cli import hydra_entry
from optimizer.export.cli import export

hydra_entry(export)()
