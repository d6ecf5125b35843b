"""Certification methods. They import only `certbench.verifiers.*`, never the harness.

Importing this package registers every built-in verifier.
"""

from certbench.verifiers import (  # noqa: F401  (importing registers the verifiers)
    bound_propagation,
    branch_and_bound,
    exact,
    global_lipschitz,
    lirpa,
    local_lipschitz,
    smoothing,
)
from certbench.verifiers.base import (
    ABSTAIN,
    NORMS,
    VERDICTS,
    Certificate,
    Diagnosed,
    SmoothedClassifier,
    UnsupportedLayerError,
    Verdict,
    Verifier,
    get_verifier,
    register,
    takes_option,
    verdict_code,
    verifier_names,
)

__all__ = [
    "ABSTAIN",
    "NORMS",
    "Certificate",
    "Diagnosed",
    "SmoothedClassifier",
    "UnsupportedLayerError",
    "VERDICTS",
    "Verdict",
    "Verifier",
    "get_verifier",
    "register",
    "takes_option",
    "verdict_code",
    "verifier_names",
]
