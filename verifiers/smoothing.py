"""Randomized smoothing (Cohen, Rosenfeld and Kolter 2019, "Certified Adversarial Robustness
via Randomized Smoothing"), with fixed-N CERTIFY and a sequential variant.

The smoothed classifier is g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), f the base
network. Theorem 1 (two-class form used by CERTIFY): if P(f(x + e) = c_A) >= p_A > 1/2,
then g(x + delta) = c_A for every ||delta||_2 < R = sigma * Phi^-1(p_A).

CERTIFY (Sec. 3.2, Pseudocode; the default): guess c_A as the most frequent class over
``n0`` noisy copies; count c_A over ``n`` fresh copies; p_A = the one-sided (1 - alpha)
Clopper-Pearson lower bound of the count, Beta(alpha; n_A, n - n_A + 1); abstain if
p_A <= 1/2, else return c_A with radius R. The guarantee holds with probability at least
1 - alpha over the noise: certificates are *probabilistic* (``Certificate.probabilistic``,
``alpha``).

Sequential CERTIFY (``sequential = true``): the same selection step, then the count is
looked at after n_1 = ``first_look`` draws, then at n_1 times ``look_ratio`` (1.5), its
square, ... (rounded to blocks of 1000) and finally ``n`` (J looks, fixed in advance); at
look j the lower bound is Clopper-Pearson at level alpha_j, with alpha_J = alpha / 2 at
the last look and alpha / (2 (J - 1)) at each earlier one. By the union bound,
P(p_A < LB_j for some j) <= sum_j alpha_j = alpha, so the bound at the look where
estimation stops, whatever made it stop, holds with probability at least 1 - alpha: the
same guarantee as CERTIFY's (a Bonferroni-corrected geometric grid of sample sizes). Half
of alpha goes to the last look because the points that reach it are those closest to a
threshold, where the level decides the verdict; points far from every threshold stop
early even at the smaller level (the spending pattern of group-sequential designs, e.g.
O'Brien and Fleming 1979, which keep most of alpha for the end). Confidence sequences
such as Waudby-Smith and Ramdas' betting ones are tighter and not used here.

Estimation of a sample stops at the first look where every epsilon of the grid is
decided: certified (the radius from LB_j exceeds it), or futile: even a generous
continuation to ``n`` would not certify it. That is stochastic curtailment (Lan, Simon and
Halperin 1982, "Stochastically curtailed tests in long-term clinical trials"): with k of
m draws so far, take the upper (1 - ``futility``) Clopper-Pearson bound u of p_A and the
(1 - ``futility``) quantile q of Binomial(n - m, u); if LB_J(k + q, n) would still not
certify the epsilon, it is futile. With every draw so far c_A (u = 1) this is the budget
rule "even all remaining draws c_A would not certify it". A futility stop can only lose a
certificate that running on would have given (with probability about 2 ``futility`` per
look for a point at the edge), never make one: its level does not enter the guarantee,
which is why it can be far looser (0.01) than the bounds' (alpha_j ~ 1e-4); at the
bounds' level points just below a threshold ran to ``n``. The price of the correction is
a slightly smaller radius at equal draws (LB at alpha / 2 at the last look); the gain is
that points far from the thresholds stop after a few thousand draws.

PREDICT (Sec. 3.1): the two most frequent classes over ``n`` copies, n_A and n_B; return
c_A if the two-sided binomial test of n_A against Binomial(n_A + n_B, 1/2) has p-value
<= alpha, else abstain. `RandomizedSmoothing.predict` implements it; the harness uses it
to check a certificate at an adversarial point.

l_inf: ||delta||_2 <= sqrt(d) ||delta||_inf, so the l_inf radius is R / sqrt(d) (sound,
and weak for large d, which is the point of showing it).

Sampling at inference speed: the noise is drawn on the model's device into a reused
buffer, ``batch_size`` copies at a time (by default the size with the best throughput,
measured in ``prepare``), and the *same* noise serves every sample of a batch: each
sample's count is still over draws independent of it, so each certificate keeps its
guarantee (certificates of different samples become dependent, which no per-sample claim
uses), and drawing the noise costs once per batch instead of once per sample; when it
fits in ``noise_cache_mb`` it is drawn once in ``prepare`` (timed as setup) and kept; where
the model begins with affine layers that do not widen the input (`affine_head`: an MLP's
normalisation and first Linear, in an ``nn.Sequential`` or any network whose fx graph is
a chain, ONNX imports included), what is kept is their image of the noise, and each point
enters as head(x) + [head(e) - head(0)] = head(x + e) (exact in real arithmetic; in float
it differs from the direct sum by rounding only, and the counts of the tests' networks
are unchanged). Noise comes
in blocks of ``BLOCK`` draws, each from a generator seeded by (``seed``, step, block), so
a sample's counts depend neither on the batch it came in nor on ``batch_size``. Counts are
exact (``bincount`` of the argmax), in inference mode. The noise is not clipped to
[0, 1]: the base network is defined on all of R^d (as in Cohen et al.). Columns:
``p_a_lower``, ``count_a``, ``noise_draws`` (selection plus estimation), ``time_s`` (the
batch's time shared in proportion to each sample's draws).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.special import betaincinv, ndtr, ndtri
from scipy.stats import binom, binomtest
from torch import fx, nn

from certbench.verifiers.base import (
    ABSTAIN,
    Certificate,
    Verdict,
    check_certify_call,
    register,
    verdict_code,
)
from certbench.verifiers.bound_propagation import TracedNetwork

BLOCK = 1000
"""Noise draws per seeded block; ``first_look`` and ``batch_size`` are multiples of it."""
BATCH_CANDIDATES = (1000, 2000, 5000, 10_000, 20_000)
MAX_BUFFER_ELEMENTS = 2**25  # 128 MiB of float32 per noise buffer
SELECTION, ESTIMATION, PREDICTION = 0, 1, 2  # the independent noise streams


def clopper_pearson_lower(count, n, alpha: float):
    """One-sided (1 - alpha) lower confidence bound of a binomial proportion (elementwise
    for arrays of counts and sizes)."""
    count, n = np.asarray(count, dtype=np.float64), np.asarray(n, dtype=np.float64)
    safe = np.maximum(count, 1)
    bound = np.where(count == 0, 0.0, betaincinv(safe, n - safe + 1, alpha))
    return float(bound) if bound.ndim == 0 else bound


def clopper_pearson_upper(count, n, alpha: float):
    """One-sided (1 - alpha) upper confidence bound of a binomial proportion."""
    count, n = np.asarray(count, dtype=np.float64), np.asarray(n, dtype=np.float64)
    safe = np.minimum(count, n - 1)
    bound = np.where(count == n, 1.0, betaincinv(safe + 1, n - safe, 1 - alpha))
    return float(bound) if bound.ndim == 0 else bound


def smoothing_radius(p_a_lower, sigma: float):
    """sigma * Phi^-1(p_A) (Theorem 1); 0 when p_A <= 1/2 (the method abstains);
    elementwise for arrays."""
    p = np.asarray(p_a_lower, dtype=np.float64)
    radius = np.where(p > 0.5, sigma * ndtri(np.maximum(p, 0.5)), 0.0)
    return float(radius) if radius.ndim == 0 else radius


def look_levels(alpha: float, looks: int) -> list[float]:
    """The level of each look's bound: alpha / 2 at the last, the rest shared equally by
    the earlier ones (all of alpha when there is one look: fixed-N CERTIFY)."""
    if looks == 1:
        return [alpha]
    return [alpha / (2 * (looks - 1))] * (looks - 1) + [alpha / 2]


def look_schedule(first_look: int, n: int, ratio: float = 1.5) -> list[int]:
    """The sample sizes at which sequential CERTIFY looks: first_look, then growing by
    ``ratio`` (each rounded to a whole block of draws), then n."""
    if ratio <= 1:
        raise ValueError(f"look_ratio must exceed 1, got {ratio}")
    looks, size = [], float(first_look)
    while round(size / BLOCK) * BLOCK < n:
        look = round(size / BLOCK) * BLOCK
        if not looks or look > looks[-1]:
            looks.append(look)
        size *= ratio
    return looks + [n]


Draw = Callable[[torch.Tensor, int, int], torch.Tensor]


def estimate(draw: Draw, needed: torch.Tensor, looks: list[int], alpha: float,
             futility: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count c_A with early stopping at ``looks`` (one look: fixed-N CERTIFY).

    ``draw(active, start, size)``: counts of each active sample's c_A over draws
    [start, start + size) of the estimation stream. ``needed``: (n_samples, k) the p_A
    each epsilon needs, Phi(eps_2 / sigma). Returns per sample the count, the draws used
    and the lower bound on p_A at the stopping look's level (module docstring)."""
    n_samples, n = len(needed), looks[-1]
    levels = look_levels(alpha, len(looks))
    counts = torch.zeros(n_samples, dtype=torch.int64)
    used = torch.zeros(n_samples, dtype=torch.int64)
    lower = torch.zeros(n_samples, dtype=torch.float64)
    active, start = torch.arange(n_samples), 0
    for look, level in zip(looks, levels, strict=True):
        counts[active] += draw(active, start, look - start)
        used[active], start = look, look
        k = counts[active].numpy()
        lower[active] = torch.from_numpy(clopper_pearson_lower(k, look, level))
        if look == n:
            break
        generous = binom.ppf(1 - futility, n - look, clopper_pearson_upper(k, look, futility))
        reach = clopper_pearson_lower(np.minimum(k + generous, n), n, levels[-1])
        need = needed[active].numpy()
        decided = ((lower[active].numpy()[:, None] > need) | (reach[:, None] <= need)).all(1)
        active = active[torch.from_numpy(~decided)]
        if len(active) == 0:
            break
    return counts, used, lower


def affine_head(model: nn.Module, input_shape: Sequence[int], device: torch.device
                ) -> tuple[nn.Module, nn.Module]:
    """(head, tail) with model = tail o head, head the longest run of leading steps of
    the model as a chain (`as_chain`) that is affine (every operation of its traced
    graph linear: a normalisation, Flatten, Linear, Conv2d, ...) and whose output has no
    more elements than the input; (Identity, model) where there is none with parameters
    (a model that is no chain, or a first layer that widens). Since head(x + e) =
    head(x) + head(e) - head(0), the head's image of the cached noise serves every
    point: its first layer is paid once per noise draw in ``prepare`` instead of once
    per draw and point."""
    none = (nn.Identity(), model)
    chain = as_chain(model)
    if chain is None:
        return none
    size, best, shape = math.prod(input_shape), 0, tuple(input_shape)
    for k, module in enumerate(chain, start=1):
        try:
            traced = TracedNetwork(nn.Sequential(copy.deepcopy(module).cpu()), shape)
        except Exception:  # anything the tracer does not take ends the affine run
            break
        if not all(node.op.linear for node in traced.nodes[1:]):
            break
        with torch.inference_mode():
            shape = tuple(module(torch.zeros((1, *shape), device=device)).shape[1:])
        if math.prod(shape) <= size:
            best = k
    head = chain[:best]
    if not any(True for _ in head.parameters()):
        return none
    return head, chain[best:]


def as_chain(model: nn.Module) -> nn.Sequential | None:
    """The model as an ``nn.Sequential`` of its steps: itself if it is one; else, where
    its ``torch.fx`` graph (an ONNX import's, or a trace) is a chain, every node
    taking the one before it as its only non-constant input (so no node is used twice),
    one small graph module per step; None for any other graph (a residual connection, several
    inputs) or a model fx cannot trace. Why by hand: fx's ``split_module`` cuts a graph
    where it is told to, but finding where the affine run ends takes the steps one by
    one anyway, and a chain of steps is all that needs."""
    if type(model) is nn.Sequential:
        return model
    try:
        graph_module = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow and the like: not a chain we can see
        return None
    steps, previous = [], None
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            continue
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
        if node.op == "placeholder":
            if previous is not None:
                return None
        elif inputs != [previous]:
            return None
        elif node.op != "output":
            steps.append(_step(graph_module, node, previous))
        previous = node
    return nn.Sequential(*steps)


def _step(graph_module: fx.GraphModule, node: fx.Node, previous: fx.Node) -> fx.GraphModule:
    """One node of a chain as a graph module of its own (its constants copied along)."""
    graph = fx.Graph()
    env = {previous: graph.placeholder("x")}
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            env[arg] = graph.node_copy(arg)
    graph.output(graph.node_copy(node, env.__getitem__))
    return fx.GraphModule(graph_module, graph)


@register("smoothing", "randomized smoothing, Gaussian noise (Cohen et al. 2019); probabilistic")
class RandomizedSmoothing:
    """CERTIFY and PREDICT of Cohen et al.; defaults are the paper's (N0 = 100,
    N = 100 000, alpha = 0.001). ``sequential``: stop estimating once every epsilon is
    decided (looks at ``first_look``, growing by ``look_ratio``, up to ``n``; an epsilon
    is given up at level ``futility``, see the module docstring); ``batch_size``: noisy copies
    per forward pass, measured in ``prepare`` when not given; ``noise_cache_mb``: when
    the selection and estimation noise (float32) fits in this, it is drawn once in
    ``prepare`` (setup) and reused by every point, as its image under `affine_head`'s
    layers where there are some."""

    name = method = "smoothing"

    def __init__(
        self,
        sigma: float = 0.25,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        batch_size: int | None = None,
        seed: int = 0,
        sequential: bool = False,
        first_look: int = 1000,
        look_ratio: float = 1.5,
        futility: float = 0.01,
        noise_cache_mb: float = 512,
    ):
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if n0 < 1 or n < 1:
            raise ValueError("n0 and n must be at least 1")
        if batch_size is not None and (batch_size < BLOCK or batch_size % BLOCK):
            raise ValueError(f"batch_size must be a positive multiple of {BLOCK}")
        if first_look < BLOCK or first_look % BLOCK:
            raise ValueError(f"first_look must be a positive multiple of {BLOCK}")
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
        if not 0 < futility < 0.5:
            raise ValueError(f"futility must lie in (0, 0.5), got {futility}")
        look_schedule(first_look, n, look_ratio)  # checks look_ratio
        self.sigma, self.n0, self.n, self.alpha = sigma, n0, n, alpha
        self.batch_size, self.seed = batch_size, seed
        self.sequential, self.first_look = sequential, first_look
        self.look_ratio, self.futility = look_ratio, futility
        self.noise_cache_mb = noise_cache_mb
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model.eval()
        self.input_shape = tuple(input_shape)
        self.input_dim = math.prod(input_shape)
        self.device = next(iter(model.parameters()), torch.empty(0)).device
        with torch.inference_mode():
            self.classes = model(torch.zeros((1, *self.input_shape), device=self.device)).shape[1]
        self._buffers: dict[str, torch.Tensor] = {}
        self._cache: dict[int, torch.Tensor] = {}
        self.head, self.tail = nn.Identity(), model
        if (self.n0 + self.n) * self.input_dim * 4 <= self.noise_cache_mb * 2**20:
            self.head, self.tail = affine_head(model, self.input_shape, self.device)
            with torch.inference_mode():
                zero = self.head(torch.zeros((1, *self.input_shape), device=self.device))
            for stream, size in ((SELECTION, self.n0), (ESTIMATION, self.n)):
                image = torch.empty((size, *zero.shape[1:]), device=self.device)
                noise = torch.empty((BLOCK, *self.input_shape), device=self.device)
                with torch.inference_mode():
                    for start in range(0, size, BLOCK):
                        m = min(BLOCK, size - start)
                        block = self.head(self._noise(noise, stream, start, m))
                        torch.sub(block, zero, out=image[start : start + m])
                self._cache[stream] = image
        self.batch = self.batch_size or self._fastest_batch()

    @torch.inference_mode()
    def _fastest_batch(self) -> int:
        """The candidate batch size with the most noisy copies per second, each timed as
        certification runs them (noise, or the cached head's image of it, added to a
        point into a buffer; the tail's forward pass; argmax; the median of three after
        a warm-up); a larger size is kept only when it gains 10 % or more (one-off
        timings favour large batches that lose in steady state when their activations
        leave the cache)."""
        best, best_rate = BATCH_CANDIDATES[0], 0.0
        point = self.head(torch.zeros((1, *self.input_shape), device=self.device))[0]
        for size in BATCH_CANDIDATES:
            if size * point.numel() > MAX_BUFFER_ELEMENTS:
                break
            noise = torch.randn((size, *point.shape), device=self.device)
            noisy = torch.empty_like(noise)
            seconds = []
            for _ in range(4):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                started = time.perf_counter()
                self.tail(torch.add(noise, point, out=noisy)).argmax(1).cpu()
                seconds.append(time.perf_counter() - started)
            rate = size / sorted(seconds[1:])[1]
            if rate < 1.10 * best_rate:
                break
            best, best_rate = size, rate
        return best

    def _block_generator(self, stream: int, block: int) -> torch.Generator:
        digest = hashlib.blake2b(f"{self.seed}:{stream}:{block}".encode(), digest_size=8)
        seed = int.from_bytes(digest.digest(), "little") & (2**63 - 1)
        return torch.Generator(device=self.device).manual_seed(seed)

    def _noise(self, out: torch.Tensor, stream: int, start: int, size: int) -> torch.Tensor:
        """Draws [start, start + size) of a noise stream (start a multiple of BLOCK) into
        ``out``, scaled by sigma."""
        for offset in range(0, size, BLOCK):
            m = min(BLOCK, size - offset)
            torch.randn((m, *self.input_shape), generator=self._block_generator(
                stream, (start + offset) // BLOCK), out=out[offset : offset + m])
        return out[:size].mul_(self.sigma)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor kept between calls (fresh large tensors cost page faults on
        every call); reallocated only when a larger or differently typed one is needed."""
        size = math.prod(shape)
        kept = self._buffers.get(name)
        if kept is None or kept.numel() < size or kept.dtype != dtype:
            kept = self._buffers[name] = torch.empty(size, device=self.device, dtype=dtype)
        return kept[:size].view(shape)

    @torch.inference_mode()
    def class_counts(self, x: torch.Tensor, stream: int, start: int, size: int
                     ) -> torch.Tensor:
        """(len(x), classes) counts of the base network's classes over draws
        [start, start + size) of ``stream``, the same draws for every sample. A forward
        pass holds ``batch`` rows: one piece of the noise for one sample, or, when the
        pieces are short (the selection step), several samples with the same piece."""
        piece = min(self.batch, size)
        group = max(1, self.batch // piece)
        cached = self._cache.get(stream)
        head, network = self.head, self.tail  # cached noise is the head's image of it
        if cached is None or cached.dtype != x.dtype:
            cached, head, network = None, nn.Identity(), self.model
        x = head(x)
        row_shape = x.shape[1:]
        noisy = self._buffer("noisy", (min(group, len(x)) * piece, *row_shape), x.dtype)
        total = torch.zeros((len(x), self.classes), dtype=torch.int64, device=self.device)
        for offset in range(0, size, piece):
            m = min(piece, size - offset)
            if cached is not None:
                block = cached[start + offset : start + offset + m]
            else:
                noise = self._buffer("noise", (piece, *self.input_shape), x.dtype)
                block = self._noise(noise, stream, start + offset, m)
            for first in range(0, len(x), group):
                points = x[first : first + group]
                rows = noisy[: len(points) * m].view(len(points), m, *row_shape)
                torch.add(block, points[:, None], out=rows)
                labels = network(rows.view(-1, *row_shape)).argmax(1)
                shift = torch.arange(len(points), device=self.device) * self.classes
                total[first : first + len(points)] += torch.bincount(
                    (labels.view(len(points), m) + shift[:, None]).view(-1),
                    minlength=len(points) * self.classes).view(len(points), self.classes)
        return total.cpu()

    def certify(self, x: torch.Tensor, norm: str, eps: Sequence[float]) -> Certificate:
        check_certify_call(self.model, norm)
        started = time.perf_counter()
        x = x.to(self.device)
        guess = self.class_counts(x, SELECTION, 0, self.n0).argmax(1)
        scale = math.sqrt(self.input_dim) if norm == "inf" else 1.0
        grid = torch.tensor(eps, dtype=torch.float64) * scale  # as l2 radii
        needed = torch.from_numpy(ndtr(grid.numpy() / self.sigma)).expand(len(x), -1)

        def draw(active: torch.Tensor, start: int, size: int) -> torch.Tensor:
            counts = self.class_counts(x[active.to(x.device)], ESTIMATION, start, size)
            return counts.gather(1, guess[active][:, None]).squeeze(1)

        looks = ([self.n] if not self.sequential
                 else look_schedule(self.first_look, self.n, self.look_ratio))
        count_a, used, p_a_lower = estimate(draw, needed, looks, self.alpha, self.futility)
        prediction = torch.where(p_a_lower > 0.5, guess, torch.full_like(guess, ABSTAIN))
        radius = torch.from_numpy(smoothing_radius(p_a_lower.numpy(), self.sigma)) / scale
        certified = radius[:, None] > torch.tensor(eps, dtype=torch.float64)
        not_certified = torch.where(
            prediction == ABSTAIN, verdict_code(Verdict.ABSTAIN),
            verdict_code(Verdict.NOT_CERTIFIED),
        )
        verdicts = torch.where(
            certified, verdict_code(Verdict.CERTIFIED), not_certified[:, None]
        ).to(torch.int8)
        draws = used + self.n0
        seconds = (time.perf_counter() - started) * draws.double() / draws.sum()
        return Certificate(
            prediction=prediction, verdicts=verdicts, radius=radius,
            columns={"p_a_lower": p_a_lower, "count_a": count_a, "noise_draws": draws,
                     "time_s": seconds},
            probabilistic=True, alpha=self.alpha,
        )

    def predict(self, x: torch.Tensor, n: int | None = None, alpha: float | None = None
                ) -> torch.Tensor:
        """PREDICT for each input of the batch: the class, or ABSTAIN."""
        check_certify_call(self.model, "2")
        n, alpha = n or self.n, alpha or self.alpha
        counts = self.class_counts(x.to(self.device), PREDICTION, 0, n)
        out = torch.full((len(x),), ABSTAIN, dtype=torch.int64)
        for i, row in enumerate(counts):
            top2 = row.topk(2)
            n_a, n_b = int(top2.values[0]), int(top2.values[1])
            if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
                out[i] = int(top2.indices[0])
        return out
