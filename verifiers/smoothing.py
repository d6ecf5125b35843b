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

Sequential CERTIFY (``sequential = true``): the same selection step, then the count of
c_A is looked at every n / 100 draws (`look_sizes`; 1000 for n = 100 000) up to ``cap``
times n (1.1). Each p_A value that matters, t_0 = 1/2 (predict rather than abstain) and
t_e = Phi(eps_e / sigma) for each epsilon of the grid (as an l2 radius), is tested with
its own exact group-sequential boundaries (`group_sequential`: H0: p_A <= t rejected at
the first look whose count reaches c_j(t), alpha spent as alpha (n_j / n_cap)^
``spending_power`` by Lan and DeMets' error-spending recursion), and t_e counts as proved
only when every smaller threshold is proved too (fixed-sequence testing of nested
hypotheses). Guarantee: each test wrongly rejects with probability at most alpha whatever
the stopping rule does (the boundaries are computed for every look, and stopping only
takes looks away), and a wrong claim "p_A > t_e" needs the test of the smallest
threshold at or above the true p_A to reject wrongly, so with probability at least
1 - alpha every proved threshold holds: the verdicts have CERTIFY's guarantee for the
stopped count. Reported: ``p_a_lower`` = the largest threshold proved (0 where not even
1/2 is), the radius = the largest certified epsilon, so the sequential mode answers the
grid, not a continuous radius. The test of 1/2 never keeps a sample running: one that
has not proved it when every epsilon is decided abstains. Compared with a union bound
over the looks (what this mode did before, alpha / (2 (J - 1)) at each of J looks), the
exact recursion counts how strongly successive looks are correlated, so a look after
every block costs almost nothing; the 10 % of draws past n go to the points closest to a
threshold, whose power would otherwise fall short of fixed N's because part of alpha was
spent early.

Estimation of a sample stops at the first look where every threshold is decided: proved,
or futile: even a generous continuation to the cap would not reach the last look's
boundary. That is stochastic curtailment (Lan, Simon and Halperin 1982, "Stochastically
curtailed tests in long-term clinical trials"): with k of m draws so far, take the upper
(1 - ``futility``) Clopper-Pearson bound u of p_A and the (1 - ``futility``) quantile q
of Binomial(n_cap - m, u); if k + q stays below the last boundary, the threshold is
futile (and so is every larger one). A futility stop can only lose a certificate that
running on would have given, never make one (the boundaries do not count on it: it is
non-binding), so its level does not enter the guarantee and can be far looser (0.05)
than the bounds'. Checked at every look it gives up about 2 % of the certificates of a
point just above a threshold (tests).

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
uses), and drawing the noise costs once per batch instead of once per sample; when it fits
in ``noise_cache_mb`` it is drawn once in ``prepare`` (timed as setup) and kept; where the
model begins with affine layers that do not widen the input (`affine_head`: an MLP's
normalisation and first Linear, a CNN's normalisation; in an ``nn.Sequential`` or any
network whose fx graph is a chain, ONNX imports included), what is kept is their image of
the noise, and each point enters as head(x) + [head(e) - head(0)] = head(x + e) (exact in
real arithmetic; in float it differs from the direct sum by rounding only, and the counts
of the tests' networks are unchanged). Noise comes in blocks of ``BLOCK`` draws, each from
a generator seeded by (``seed``, step, block), so a sample's counts depend neither on the
batch it came in nor on ``batch_size``. Counts are exact (``bincount`` of the argmax), in
inference mode. The noise is not clipped to [0, 1]: the base network is defined on all of
R^d (as in Cohen et al.). Columns: ``p_a_lower``, ``count_a``, ``noise_draws`` (selection
plus estimation), ``time_s`` (the batch's time shared in proportion to each sample's
draws).
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

from certbench.verifiers import group_sequential
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
"""Noise draws per seeded block; looks and ``batch_size`` are multiples of it."""
BATCH_CANDIDATES = (1000, 2000, 5000, 10_000, 20_000)
MAX_BUFFER_ELEMENTS = 2**25  # 128 MiB of float32 per noise buffer
SELECTION, ESTIMATION, PREDICTION = 0, 1, 2  # the independent noise streams
LOOKS = 100
"""Sequential CERTIFY looks about this many times up to n (`look_sizes`)."""


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


def look_sizes(n: int, cap: float) -> tuple[int, ...]:
    """The sample sizes at which sequential CERTIFY looks: every ``step`` draws up to
    ``cap`` times n, step the whole number of blocks nearest n / ``LOOKS`` (1000 draws
    for the paper's n = 100 000), so the boundaries cost about LOOKS * cap convolutions."""
    if cap < 1:
        raise ValueError(f"cap must be at least 1, got {cap}")
    step = BLOCK * max(1, round(n / (LOOKS * BLOCK)))
    top = max(step, round(cap * n / step) * step)
    return tuple(range(step, top + 1, step))


Draw = Callable[[torch.Tensor, int, int], torch.Tensor]


def sequential_estimate(draw: Draw, n_samples: int, thresholds: np.ndarray,
                        looks: tuple[int, ...], alpha: float, power: float = 1.0,
                        futility: float = 0.05
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count c_A at ``looks`` and stop once every threshold is decided (module docstring).

    ``draw(active, start, size)``: counts of each active sample's c_A over draws
    [start, start + size) of the estimation stream. ``thresholds``: increasing p_A
    values to test (1/2, then what each epsilon needs). Returns per sample the count,
    the draws used and (n_samples, len(thresholds)) whether p_A > threshold is proved;
    a threshold counts as proved only when every smaller one is (fixed-sequence
    testing), so all of them together hold with probability 1 - alpha. The first
    threshold (1/2) is tested at every look but does not keep a sample running."""
    cap = looks[-1]
    bounds = np.stack([group_sequential.boundaries(float(t), looks, alpha, power)
                       for t in thresholds])  # (thresholds, looks)
    counts = torch.zeros(n_samples, dtype=torch.int64)
    used = torch.zeros(n_samples, dtype=torch.int64)
    proved = np.zeros((n_samples, len(thresholds)), dtype=bool)
    active, start = torch.arange(n_samples), 0
    for j, look in enumerate(looks):
        counts[active] += draw(active, start, look - start)
        used[active], start = look, look
        rows, k = active.numpy(), counts[active].numpy()
        proved[rows] |= k[:, None] >= bounds[:, j]
        if look == cap:
            break
        generous = binom.ppf(1 - futility, cap - look, clopper_pearson_upper(k, look, futility))
        futile = ((k + generous)[:, None] < bounds[:, -1]) & ~proved[rows]
        out_of_reach = np.logical_or.accumulate(futile, axis=1)  # fixed sequence
        decided = (proved[rows] | out_of_reach)[:, 1:].all(1)
        active = active[torch.from_numpy(~decided)]
        if len(active) == 0:
            break
    return counts, used, torch.from_numpy(np.logical_and.accumulate(proved, axis=1))


def affine_head(model: nn.Module, input_shape: Sequence[int], device: torch.device
                ) -> tuple[nn.Module, nn.Module]:
    """(head, tail) with model = tail o head, head the longest run of leading steps of
    the model as a chain (`as_chain`) that is affine (every operation of its traced
    graph linear: a normalisation, Flatten, Linear, Conv2d, ...) and whose output has no
    more elements than the input; (Identity, model) where there is none (a model that
    is no chain, or one whose first step widens). Since head(x + e) = head(x) + head(e)
    - head(0), the head's image of the cached noise serves every point: its layers (the
    first Linear of an MLP; a convolutional network's input normalisation, as its first
    convolution widens) are paid once per noise draw in ``prepare`` instead of once per
    draw and point."""
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
    if best == 0:
        return none
    return chain[:best], chain[best:]


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
    decided (looks every n / 100 draws up to ``cap`` times ``n``, alpha spent as
    alpha tau^``spending_power``, an epsilon given up at level ``futility``; see the
    module docstring); ``batch_size``: noisy copies
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
        cap: float = 1.1,
        spending_power: float = 1.0,
        futility: float = 0.05,
        noise_cache_mb: float = 512,
    ):
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if n0 < 1 or n < 1:
            raise ValueError("n0 and n must be at least 1")
        if batch_size is not None and (batch_size < BLOCK or batch_size % BLOCK):
            raise ValueError(f"batch_size must be a positive multiple of {BLOCK}")
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
        if not 0 < futility < 0.5:
            raise ValueError(f"futility must lie in (0, 0.5), got {futility}")
        if spending_power <= 0:
            raise ValueError(f"spending_power must be positive, got {spending_power}")
        look_sizes(n, cap)  # checks cap
        self.sigma, self.n0, self.n, self.alpha = sigma, n0, n, alpha
        self.batch_size, self.seed = batch_size, seed
        self.sequential, self.cap = sequential, cap
        self.spending_power, self.futility = spending_power, futility
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
        most = look_sizes(self.n, self.cap)[-1] if self.sequential else self.n
        if (self.n0 + most) * self.input_dim * 4 <= self.noise_cache_mb * 2**20:
            self.head, self.tail = affine_head(model, self.input_shape, self.device)
            with torch.inference_mode():
                zero = self.head(torch.zeros((1, *self.input_shape), device=self.device))
            for stream, size in ((SELECTION, self.n0), (ESTIMATION, most)):
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
        needed = ndtr(grid.numpy() / self.sigma)  # the p_A each epsilon needs

        def draw(active: torch.Tensor, start: int, size: int) -> torch.Tensor:
            counts = self.class_counts(x[active.to(x.device)], ESTIMATION, start, size)
            return counts.gather(1, guess[active][:, None]).squeeze(1)

        if self.sequential:
            thresholds = np.unique(np.concatenate([[0.5], needed]))
            count_a, used, proved = sequential_estimate(
                draw, len(x), thresholds, look_sizes(self.n, self.cap), self.alpha,
                self.spending_power, self.futility)
            # p_A's lower bound: the largest threshold proved (0 where not even 1/2 is)
            best = proved.sum(1)
            p_a_lower = torch.from_numpy(np.concatenate([[0.0], thresholds]))[best]
            certified = proved[:, np.searchsorted(thresholds, needed)]
            predicts = proved[:, 0]
            radius = torch.where(certified, grid, 0.0).amax(1) / scale
        else:
            count_a = draw(torch.arange(len(x)), 0, self.n)
            used = torch.full((len(x),), self.n, dtype=torch.int64)
            p_a_lower = torch.from_numpy(clopper_pearson_lower(count_a.numpy(), self.n,
                                                               self.alpha))
            radius = torch.from_numpy(smoothing_radius(p_a_lower.numpy(), self.sigma)) / scale
            certified = radius[:, None] > torch.tensor(eps, dtype=torch.float64)
            predicts = p_a_lower > 0.5
        prediction = torch.where(predicts, guess, torch.full_like(guess, ABSTAIN))
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
