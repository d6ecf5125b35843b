"""certbench: a comparative verification benchmark suite for certified robustness.

Kept light on purpose: importing `certbench.verifiers` runs this file first.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``certbench.evaluate`` (api.py), imported on first use."""
    if name == "evaluate":
        from certbench.api import evaluate

        return evaluate
    raise AttributeError(f"module 'certbench' has no attribute {name!r}")
