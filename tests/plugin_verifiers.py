"""Verifiers registered through a matrix's `imports`, for harness tests: one that fails,
one that is slow enough to be interrupted mid-run, two that certify everything, one whose
certification takes a planted extra fraction of its time (the speed gate), and for the
executors one that hangs, one that crashes its process, one that eats memory and one that
holds a known amount; the same three faults in ``check_spec`` for `certbench vnncomp`, and
one whose ``check_spec`` answers unsat on everything."""

from __future__ import annotations

import os
import signal
import time

import torch

from certbench.verifiers import Certificate, Verdict, register, verdict_code
from certbench.verifiers.bound_propagation.verifier import LinearRelaxationVerifier
from certbench.verifiers.global_lipschitz import GlobalLipschitzVerifier
from certbench.verifiers.smoothing import RandomizedSmoothing
from certbench.verifiers.specification import SpecResult, SpecVerdict


@register("test-failing", "always raises (harness test)")
class FailingVerifier(GlobalLipschitzVerifier):
    name = "test-failing"

    def certify(self, x, norm, eps):
        raise RuntimeError("planted failure")


@register("test-failing-diagnostics", "global-lipschitz whose diagnostics raise (harness test)")
class FailingDiagnostics(GlobalLipschitzVerifier):
    name = "test-failing-diagnostics"

    def diagnostics(self, x, norm, eps):
        raise RuntimeError("planted diagnostic failure")


@register("test-slow", "global-lipschitz after a pause (harness test)")
class SlowVerifier(GlobalLipschitzVerifier):
    name = "test-slow"

    def __init__(self, pause: float = 0.5, **options):
        super().__init__(**options)
        self.pause = pause

    def prepare(self, model, input_shape):
        time.sleep(self.pause)
        super().prepare(model, input_shape)


@register("test-delay", "global-lipschitz plus a pause, made longer by `slowdown` (gate test)")
class DelayedVerifier(GlobalLipschitzVerifier):
    """Certifies as global-lipschitz, pauses ``pause_s``, then sleeps ``slowdown`` times
    the time spent so far: a planted slowdown of ``slowdown`` (0.5 = 50 %)."""

    name = "test-delay"

    def __init__(self, pause_s: float = 0.02, slowdown: float = 0.0, **options):
        super().__init__(**options)
        self.pause_s, self.slowdown = pause_s, slowdown

    def certify(self, x, norm, eps):
        start = time.perf_counter()
        cert = super().certify(x, norm, eps)
        time.sleep(self.pause_s)
        time.sleep(self.slowdown * (time.perf_counter() - start))
        return cert


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


@register("test-hang", "never returns from certify (executor test)")
class HangingVerifier(GlobalLipschitzVerifier):
    name = "test-hang"

    def certify(self, x, norm, eps):
        while True:
            time.sleep(1)


@register("test-crash", "kills its own process with SIGSEGV (executor test)")
class CrashingVerifier(GlobalLipschitzVerifier):
    name = "test-crash"

    def certify(self, x, norm, eps):
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)


@register("test-hog", "allocates memory without end (executor test)")
class MemoryHog(GlobalLipschitzVerifier):
    name = "test-hog"

    def certify(self, x, norm, eps):
        held = []
        while True:  # 64 MiB at a time, each written, so resident
            held.append(torch.ones(16 * 2**20))


@register("test-allocate", "certifies nothing, holding a tensor of `mib` MiB (executor test)")
class AllocatingVerifier:
    """Does nothing but hold ``mib`` MiB (float32, every page written), so a memory probe
    should read about that much."""

    name = "test-allocate"

    def __init__(self, mib: int = 512):
        self.mib = mib

    def prepare(self, model, input_shape):
        self.model = model

    def certify(self, x, norm, eps):
        held = torch.ones(self.mib * 2**18)
        with torch.no_grad():
            prediction = self.model(x).argmax(1).cpu()
        verdicts = torch.full((len(x), len(eps)), verdict_code(Verdict.NOT_CERTIFIED),
                              dtype=torch.int8)
        return Certificate(prediction, verdicts,
                           columns={"held": torch.full((len(x),), float(held.sum()))})


class _PlantedSpecFault(LinearRelaxationVerifier):
    """CROWN whose ``check_spec`` runs the planted ``fault`` instead (vnncomp tests)."""

    def __init__(self, **options):
        super().__init__("crown", **options)

    def check_spec(self, lower, upper, spec, time_limit_s):
        self.fault()


@register("test-spec-hang", "check_spec never returns (vnncomp test)")
class HangingSpecVerifier(_PlantedSpecFault):
    name = "test-spec-hang"

    def fault(self):
        while True:
            time.sleep(1)


@register("test-spec-crash", "check_spec kills its process with SIGSEGV (vnncomp test)")
class CrashingSpecVerifier(_PlantedSpecFault):
    name = "test-spec-crash"

    def fault(self):
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)


@register("test-spec-hog", "check_spec allocates memory without end (vnncomp test)")
class SpecMemoryHog(_PlantedSpecFault):
    name = "test-spec-hog"

    def fault(self):
        held = []
        while True:
            held.append(torch.ones(16 * 2**20))


@register("test-spec-liar", "check_spec answers unsat on every property (vnncomp test)")
class LyingSpecVerifier(_PlantedSpecFault):
    name = "test-spec-liar"

    def check_spec(self, lower, upper, spec, time_limit_s):
        return SpecResult(SpecVerdict.UNSAT)
