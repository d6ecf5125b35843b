"""Randomized smoothing against theory: on a linear base classifier p_A and the radius have
closed forms (Cohen et al. 2019, Sec. 3.2 and Appendix), the radius follows from the count
by Clopper-Pearson, the boundary abstains, and PREDICT's test behaves."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import beta
from scipy.stats import norm as normal
from torch import fx, nn

from certbench.io.onnx_import import load_onnx
from certbench.models import build_model
from certbench.verifiers import ABSTAIN, VERDICTS, Verdict, get_verifier
from certbench.verifiers.smoothing import affine_head
from conftest import DIGITS_SHAPE, SHARED_DATA

SIGMA = 0.25


def linear_classifier(seed: int = 0) -> nn.Module:
    """Two classes, f_0 - f_1 = w.x + b: the smoothed p_A is Phi(|w.x + b| / (sigma |w|))."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    return model.eval()


def distance_to_boundary(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = (model[1].weight[0] - model[1].weight[1]).detach().double()
    b = float((model[1].bias[0] - model[1].bias[1]).detach())
    return ((x.flatten(1).double() @ w + b).abs() / w.norm())


def points_at(model: nn.Module, distances: list[float], seed: int = 1) -> torch.Tensor:
    """Inputs at the given signed distances from the decision boundary."""
    torch.manual_seed(seed)
    w = (model[1].weight[0] - model[1].weight[1]).detach()
    b = float((model[1].bias[0] - model[1].bias[1]).detach())
    x = torch.rand(len(distances), 64)
    offset = (x @ w + b) / w.norm()
    x = x + (torch.tensor(distances) - offset)[:, None] * w / w.norm()
    return x.view(-1, *DIGITS_SHAPE)


def test_counts_and_radius_match_the_closed_form():
    model = linear_classifier()
    distances = [0.1, 0.3, -0.5, 0.8]
    x = points_at(model, distances)
    exact = distance_to_boundary(model, x)
    assert torch.allclose(exact, torch.tensor(distances).abs().double(), atol=1e-5)
    verifier = get_verifier("smoothing", sigma=SIGMA, n=100_000, alpha=0.001)
    verifier.prepare(model, DIGITS_SHAPE)
    cert = verifier.certify(x, "2", [0.05, 0.25, 0.5])
    assert cert.probabilistic and cert.alpha == 0.001
    n = 100_000
    for i, d in enumerate(distances):
        p_a = normal.cdf(abs(d) / SIGMA)
        count = int(cert.columns["count_a"][i])
        assert abs(count / n - p_a) < 5 * math.sqrt(p_a * (1 - p_a) / n)
        p_lower = beta.ppf(0.001, count, n - count + 1)
        assert cert.columns["p_a_lower"][i] == pytest.approx(p_lower, rel=1e-12)
        assert float(cert.radius[i]) == pytest.approx(SIGMA * normal.ppf(p_lower), rel=1e-12)
        # R is below the exact distance (w.p. 1 - alpha) and close to it for large n
        p_low = p_a - 6 * math.sqrt(p_a * (1 - p_a) / n)
        assert SIGMA * normal.ppf(p_low) <= float(cert.radius[i]) <= abs(d)
        assert int(cert.prediction[i]) == (0 if d > 0 else 1)
    names = [[VERDICTS[c].value for c in row] for row in cert.verdicts.tolist()]
    assert names[1] == ["certified", "certified", "not_certified"]
    assert names[3] == ["certified"] * 3


def test_boundary_point_abstains():
    model = linear_classifier()
    x = points_at(model, [0.0, 0.001])
    verifier = get_verifier("smoothing", sigma=SIGMA, n=10_000)
    verifier.prepare(model, DIGITS_SHAPE)
    cert = verifier.certify(x, "2", [0.01])
    assert (cert.prediction == ABSTAIN).all()
    assert (cert.radius == 0).all()
    assert all(VERDICTS[c] is Verdict.ABSTAIN for c in cert.verdicts.flatten().tolist())
    assert (verifier.predict(x, n=10_000) == ABSTAIN).all()


def test_predict_returns_the_class_far_from_the_boundary():
    model = linear_classifier()
    x = points_at(model, [0.6, -0.6])
    verifier = get_verifier("smoothing", sigma=SIGMA, n=1_000)
    verifier.prepare(model, DIGITS_SHAPE)
    assert verifier.predict(x).tolist() == [0, 1]


def test_linf_radius_is_the_l2_radius_over_sqrt_d_and_batches_do_not_matter():
    model = linear_classifier()
    x = points_at(model, [0.2, 0.4, 0.6])
    verifier = get_verifier("smoothing", sigma=SIGMA, n=5_500, batch_size=1000)
    verifier.prepare(model, DIGITS_SHAPE)
    l2 = verifier.certify(x, "2", [0.1])
    linf = verifier.certify(x, "inf", [0.01])
    assert torch.allclose(linf.radius, l2.radius / 8.0)
    reversed_batch = verifier.certify(x.flip(0), "2", [0.1])
    assert torch.equal(reversed_batch.columns["count_a"].flip(0), l2.columns["count_a"])
    alone = verifier.certify(x[1:2], "2", [0.1])
    assert torch.equal(alone.columns["count_a"], l2.columns["count_a"][1:2])
    other = get_verifier("smoothing", sigma=SIGMA, n=5_500, batch_size=3000)
    other.prepare(model, DIGITS_SHAPE)  # the noise is seeded per block, not per batch
    assert torch.equal(other.certify(x, "2", [0.1]).columns["count_a"], l2.columns["count_a"])


def test_noise_trained_model_is_certified_where_the_base_is_right(trained, digits):
    model = trained["mlp-noise"]
    verifier = get_verifier("smoothing", sigma=SIGMA, n=2_000)
    verifier.prepare(model, DIGITS_SHAPE)
    x, y = digits.x_test[:50], digits.y_test[:50]
    cert = verifier.certify(x, "2", [0.25, 0.5])
    certified = (cert.verdicts == 0) & (cert.prediction == y)[:, None]
    assert certified[:, 0].float().mean() > 0.5
    # a certified prediction at radius R is the smoothed classifier's prediction (PREDICT)
    ok = cert.radius > 0
    predicted = verifier.predict(x[ok], n=2_000)
    decided = predicted != ABSTAIN
    assert decided.float().mean() > 0.9
    assert (predicted[decided] == cert.prediction[ok][decided]).all()


def test_bad_options_are_refused():
    with pytest.raises(TypeError, match="smoothing"):
        get_verifier("smoothing", sigmaa=0.5)
    with pytest.raises(ValueError, match="alpha"):
        get_verifier("smoothing", alpha=0.7)


def _counts_equal_the_uncached_path(model: nn.Module, shape) -> tuple[nn.Module, torch.Tensor]:
    """The head the cached verifier found and its counts at 4 points over 3000 draws,
    after checking that they equal those of the whole network run on x + noise."""
    cached = get_verifier("smoothing", sigma=SIGMA, n=3000)
    cached.prepare(model, shape)
    plain = get_verifier("smoothing", sigma=SIGMA, n=3000, noise_cache_mb=0)
    plain.prepare(model, shape)  # no cache: the whole network on x + noise
    assert isinstance(plain.head, nn.Identity)
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(2))
    counts = cached.class_counts(x, 1, 0, 3000)
    assert torch.equal(counts, plain.class_counts(x, 1, 0, 3000))
    return cached.head, counts


@pytest.mark.parametrize(("arch", "args", "head"), [
    ("mlp", {"widths": [48, 32]}, 3),  # Normalize, Flatten, Linear(64 -> 48)
    ("mlp", {"widths": [96, 32]}, 2),  # Normalize, Flatten; the first Linear widens
    ("cnn-small", {"linear_size": 32}, 1),  # Normalize; the first conv widens (16x4x4 > 64)
])
def test_the_cached_noise_passes_the_first_layer_once_and_the_counts_do_not_change(
        arch, args, head):
    torch.manual_seed(0)
    model = build_model(arch, DIGITS_SHAPE, 10, (0.5,), (0.5,), args).eval()
    cached_head, counts = _counts_equal_the_uncached_path(model, DIGITS_SHAPE)
    assert len(cached_head) == head
    assert counts.sum(1).tolist() == [3000] * 4 and (counts.max(1).values < 3000).any()


class _Wrapped(nn.Module):
    """A model that is no ``nn.Sequential`` (the shape of most users' code)."""

    def __init__(self, inner: nn.Module, residual: bool = False):
        super().__init__()
        self.inner, self.residual = inner, residual

    def forward(self, x):
        h = self.inner[1](self.inner[0](x))  # normalised and flattened
        if self.residual:  # a second use of the flattened input: no chain
            h = h + torch.relu(h)
        for layer in list(self.inner)[2:]:
            h = layer(h)
        return h


def test_a_model_whose_graph_is_a_chain_is_cut_like_a_sequential():
    """Wrapped in a module of its own, the digits MLP still gets its affine head (traced
    by fx, cut into steps); with a residual connection it keeps the whole network."""
    torch.manual_seed(0)
    mlp = build_model("mlp", DIGITS_SHAPE, 10, (0.5,), (0.5,), {"widths": [48, 32]}).eval()
    head, _ = _counts_equal_the_uncached_path(_Wrapped(mlp).eval(), DIGITS_SHAPE)
    assert not isinstance(head, nn.Identity)
    assert sum(p.numel() for p in head.parameters()) == 64 * 48 + 48  # the first Linear
    head, tail = affine_head(_Wrapped(mlp, residual=True), DIGITS_SHAPE, torch.device("cpu"))
    assert isinstance(head, nn.Identity) and isinstance(tail, _Wrapped)


def test_an_onnx_mlp_gets_its_first_layer_cached():
    """VNN-COMP's mnist_fc 256x2, imported from ONNX (a torch.fx graph module): the head
    is its reshape and first Linear (784 -> 256), and the counts do not change."""
    path = SHARED_DATA / "vnncomp2022" / "mnist_fc" / "onnx" / "mnist-net_256x2.onnx"
    if not path.exists() and not path.with_suffix(".onnx.gz").exists():
        pytest.skip(f"{path} not found (the shared data folder)")
    network = load_onnx(path)
    head, _ = _counts_equal_the_uncached_path(network.module, network.input_shape)
    layers = [m for m in head.modules() if not isinstance(m, (nn.Sequential, fx.GraphModule))]
    assert [type(m) for m in layers] == [nn.Linear] and layers[0].in_features == 784
