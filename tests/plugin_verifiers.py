"""Verifiers registered through a matrix's `imports`, for harness tests: one that fails,
one that is slow enough to be interrupted mid-run."""

from __future__ import annotations

import time

from certbench.verifiers import register
from certbench.verifiers.global_lipschitz import GlobalLipschitzVerifier


@register("test-failing", "always raises (harness test)")
class FailingVerifier(GlobalLipschitzVerifier):
    name = "test-failing"

    def certify(self, x, norm, eps):
        raise RuntimeError("planted failure")


@register("test-slow", "global-lipschitz after a pause (harness test)")
class SlowVerifier(GlobalLipschitzVerifier):
    name = "test-slow"

    def __init__(self, pause: float = 0.5, **options):
        super().__init__(**options)
        self.pause = pause

    def prepare(self, model, input_shape):
        time.sleep(self.pause)
        super().prepare(model, input_shape)
