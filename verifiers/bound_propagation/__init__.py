"""Linear-relaxation verifiers: IBP, CROWN, CROWN-IBP and alpha-CROWN, in pure torch.

`graph.py` traces a network into nodes, `operators.py` holds the bound rules of each
operation, `propagation.py` the walker that composes them, and `verifier.py` the
registered verifiers that turn margin bounds into verdicts and radii.
"""

from certbench.verifiers.bound_propagation.graph import TracedNetwork
from certbench.verifiers.bound_propagation.propagation import Ball, BoundPropagator
from certbench.verifiers.bound_propagation.verifier import (
    LinearRelaxationVerifier,
    margin_spec,
)

__all__ = ["Ball", "BoundPropagator", "LinearRelaxationVerifier", "TracedNetwork", "margin_spec"]
