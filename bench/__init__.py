"""certbench: a comparative verification benchmark suite for certified robustness.

Kept light on purpose: importing `certbench.verifiers` runs this file first.
"""

__version__ = "0.1.0"
