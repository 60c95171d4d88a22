"""merge-optimizer: search for the best way to merge fine-tuned LLMs."""

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input detected before any expensive work: printed as one paragraph, exit code 2."""
