"""Verifiers registered through a matrix's `imports`, for harness tests: one that fails,
one that is slow enough to be interrupted mid-run, two that certify everything."""

from __future__ import annotations

import time

import torch

from certbench.verifiers import register
from certbench.verifiers.global_lipschitz import GlobalLipschitzVerifier
from certbench.verifiers.smoothing import RandomizedSmoothing


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


@register("test-liar", "certifies every sample at every radius (harness test)")
class LyingVerifier(GlobalLipschitzVerifier):
    name = "test-liar"

    def certify(self, x, norm, eps):
        cert = super().certify(x, norm, eps)
        cert.verdicts.zero_()  # code 0 is "certified"
        cert.radius.fill_(10.0)
        return cert


@register("test-smoothing-liar", "randomized smoothing claiming every radius (harness test)")
class LyingSmoothing(RandomizedSmoothing):
    name = "test-smoothing-liar"

    def certify(self, x, norm, eps):
        cert = super().certify(x, norm, eps)
        with torch.no_grad():
            cert.prediction = self.model(x).argmax(1).cpu()
        cert.verdicts.zero_()
        cert.radius.fill_(10.0)
        return cert
