"""Linear-relaxation verifiers: IBP, CROWN, CROWN-IBP and alpha-CROWN, in pure torch.

`graph.py` traces a network into nodes through its conversion tables, `operators.py`
holds one class per operation with its bound rules (`s_shaped.py` the sigmoid and tanh
relaxations, `patches.py` the patch form of convolution coefficients), `propagation.py`
the walker that composes them, and `verifier.py` the registered verifiers that turn
margin bounds into verdicts and radii.
"""

from certbench.verifiers.bound_propagation.graph import (
    FUNCTION_OPERATIONS,
    MODULE_OPERATIONS,
    ONNX_ACTIVATIONS,
    TracedNetwork,
)
from certbench.verifiers.bound_propagation.propagation import Ball, BoundPropagator
from certbench.verifiers.bound_propagation.verifier import (
    LinearRelaxationVerifier,
    margin_spec,
)

__all__ = [
    "FUNCTION_OPERATIONS",
    "MODULE_OPERATIONS",
    "ONNX_ACTIVATIONS",
    "Ball",
    "BoundPropagator",
    "LinearRelaxationVerifier",
    "TracedNetwork",
    "margin_spec",
]
