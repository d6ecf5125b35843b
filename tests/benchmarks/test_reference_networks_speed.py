"""CROWN and alpha-CROWN on the field's reference networks, certbench's engine beside
auto_LiRPA (when installed), same batch, same specification:

- ERAN's normally trained MNIST MLP 9x200 (``models/eran_mlp_pth``), l_inf 0.015;
- ``cnn-small`` (2C2F) trained here on MNIST for one epoch, l_inf 0.02;
- oval21's ``cifar_base_kw`` (VNN-COMP 2021; Conv-Conv-FC-FC), l_inf 2/255;

each on a batch of 8 test images; and alpha-CROWN at 5 steps on the zoo's l2 networks
(LMT's and GloRo's 2C2F, at l2 1.58 and 0.3), the seeds matrix's slowest cells. Peak
memory of one call goes to extra_info. The engine's CROWN bound equals auto_LiRPA's to
1e-4 (relative), and its alpha-CROWN is at least as tight as auto_LiRPA's CROWN. Networks
come from the shared data folder (skipped with the reason where it is absent). auto_LiRPA
runs through certbench's ``lirpa:*`` verifiers: CROWN in its default patches mode and in
matrix mode, alpha-CROWN in matrix mode only (patches mode fails on alpha-CROWN for
cnn-small with auto_LiRPA 0.7.1).

``test_alpha_crown_count`` (only under --benchmark-enable: minutes) counts the images
alpha-CROWN certifies at 20 steps among the correctly classified of the first 100: ERAN
6x100 at 0.026 and 9x200 at 0.015, one timed call each, auto_LiRPA's count beside it.

Run: pytest tests/benchmarks/test_reference_networks_speed.py --benchmark-enable
     --benchmark-group-by=param:case --benchmark-columns=median,min,rounds
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from certbench import zoo
from certbench.data import load_dataset
from certbench.models import Normalize, load_checkpoint
from certbench.training.train import train_model
from certbench.verifiers import get_verifier
from certbench.verifiers.bound_propagation import margin_spec
from certbench.verifiers.lirpa import lirpa_status
from conftest import SHARED_DATA, time_margin_bounds

LIRPA, LIRPA_DETAIL = lirpa_status()
BATCH = 8


def _require(path):
    if not path.exists():
        pytest.skip(f"{path} not found (the shared data folder)")
    return path


def eran_mlp(name: str = "mnist_9_200_nat") -> nn.Module:
    """ERAN's MLP from its state dict: Flatten, then Linear/ReLU pairs (keys 1, 3, ...)."""
    path = _require(SHARED_DATA / "models" / "eran_mlp_pth" / f"{name}.pth")
    state = torch.load(path, weights_only=True, map_location="cpu")["state_dict"][0]
    weights = [state[k] for k in state if k.endswith("weight")]
    layers: list[nn.Module] = [nn.Flatten()]
    for k, w in enumerate(weights):
        layers.append(nn.Linear(w.shape[1], w.shape[0]))
        if k < len(weights) - 1:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    model.load_state_dict(state)
    return model.eval()


def cifar_base_kw() -> nn.Module:
    """oval21's cifar_base_kw (its .pth holds the weights in layer order), behind the
    CIFAR normalisation its authors use."""
    path = _require(SHARED_DATA / "vnncomp2021" / "oval21" / "nets" / "cifar_base_kw.pth")
    state = torch.load(path, weights_only=True, map_location="cpu")["state_dict"][0]
    body = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 4, 2, 1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(1024, 100), nn.ReLU(),
                         nn.Linear(100, 10))
    body.load_state_dict(dict(zip(body.state_dict(), state.values(), strict=True)))
    return nn.Sequential(Normalize((0.485, 0.456, 0.406), (0.225, 0.225, 0.225)), *body).eval()


def _test_images(name: str, count: int = BATCH) -> torch.Tensor:
    path = _require(SHARED_DATA / "eran_data" / f"{name}_test.csv")
    rows = np.loadtxt(path, delimiter=",", max_rows=count)[:, 1:] / 255
    x = torch.tensor(rows, dtype=torch.float32)
    if name == "cifar10":  # HWC order in the file
        return x.reshape(-1, 32, 32, 3).permute(0, 3, 1, 2).contiguous()
    return x.reshape(-1, 1, 28, 28)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    mnist = _require(SHARED_DATA / "mnist")
    dataset = load_dataset("mnist", mnist.parent)
    stem = tmp_path_factory.mktemp("cnn") / "cnn-small"
    cnn, _ = train_model(stem, dataset, "cnn-small", {"linear_size": 100}, "standard",
                         {"epochs": 1, "batch_size": 256}, progress=False)
    return {
        "eran-9x200": (eran_mlp, (1, 28, 28), "mnist", 0.015),
        "cnn-small-mnist": (lambda: cnn.eval(), (1, 28, 28), "mnist", 0.02),
        "cifar-base-kw": (cifar_base_kw, (3, 32, 32), "cifar10", 2 / 255),
    }


def _run(benchmark, cases, case: str, name: str, **options) -> torch.Tensor:
    build, shape, images, eps = cases[case]
    model = build()
    x = _test_images(images)
    spec = margin_spec(model(x).argmax(1), 10).detach()
    verifier = get_verifier(name, **options)
    verifier.prepare(model, shape)
    return time_margin_bounds(benchmark, verifier, x, spec, eps, rounds=5)


CASES = ["eran-9x200", "cnn-small-mnist", "cifar-base-kw"]


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("case", CASES)
def test_engine(benchmark, cases, case, method):
    assert torch.isfinite(_run(benchmark, cases, case, method)).all()


@pytest.mark.skipif(not LIRPA, reason=f"optional backend absent: {LIRPA_DETAIL}")
@pytest.mark.parametrize("method,conv_mode", [
    ("crown", "patches"),  # auto_LiRPA's default
    ("crown", "matrix"),
    ("alpha-crown", "matrix"),  # patches mode fails on cnn-small with 0.7.1
])
@pytest.mark.parametrize("case", CASES)
def test_auto_lirpa(benchmark, cases, case, method, conv_mode):
    theirs = _run(benchmark, cases, case, f"lirpa:{method}", conv_mode=conv_mode)
    build, shape, images, eps = cases[case]
    model, x = build(), _test_images(images)
    spec = margin_spec(model(x).argmax(1), 10).detach()
    ours = get_verifier(method)
    ours.prepare(model, shape)
    with torch.no_grad():
        engine = ours.margin_lower_bounds(x, spec, eps, "inf")
    if method == "crown":
        torch.testing.assert_close(engine, theirs, rtol=1e-4, atol=1e-4)
    else:  # never looser than auto_LiRPA's CROWN
        crown = get_verifier("lirpa:crown")
        crown.prepare(model, shape)
        with torch.no_grad():
            reference = crown.margin_lower_bounds(x, spec, eps, "inf")
        assert (engine >= reference - 1e-4 * reference.abs().clamp(min=1)).all()


@pytest.mark.parametrize("network,eps", [("lmt-mnist-2c2f", 1.58), ("gloro-mnist-2c2f", 0.3)])
def test_alpha_crown_l2_on_a_zoo_network(benchmark, network, eps):
    """alpha-CROWN (5 steps, the seeds matrix's setting) on a committed zoo network at its
    l2 radius: the matrix's slowest cells. Its bounds are never below CROWN's."""
    model, card = load_checkpoint(zoo.network_stem(f"zoo:{network}"))
    x = _test_images("mnist")
    spec = margin_spec(model(x).argmax(1), 10).detach()
    verifier = get_verifier("alpha-crown", alpha_iterations=5)
    verifier.prepare(model, tuple(card["input_shape"]))
    bounds = time_margin_bounds(benchmark, verifier, x, spec, eps, rounds=3, norm="2")
    crown = get_verifier("crown")
    crown.prepare(model, tuple(card["input_shape"]))
    with torch.no_grad():
        assert (bounds >= crown.margin_lower_bounds(x, spec, eps, "2") - 1e-4).all()


def _labels(name: str, count: int) -> torch.Tensor:
    path = _require(SHARED_DATA / "eran_data" / f"{name}_test.csv")
    return torch.tensor(np.loadtxt(path, delimiter=",", max_rows=count)[:, 0]).long()



def _certified(verifier, model, x, spec, eps) -> tuple[int, float]:
    """Certified count and CPU seconds of one call."""
    verifier.prepare(model, (1, 28, 28))
    started = time.process_time()
    bounds = verifier.margin_lower_bounds(x, spec, eps, "inf")
    return int((bounds.min(1).values > 0).sum()), time.process_time() - started


@pytest.mark.parametrize("network,eps", [("mnist_6_100_nat", 0.026), ("mnist_9_200_nat", 0.015)])
def test_alpha_crown_count(benchmark, network, eps):
    """Images certified by alpha-CROWN (20 Adam steps, lr 0.1) among the correctly
    classified of the first 100, all in one batch, one timed call; auto_LiRPA's count
    and CPU time beside it where installed (extra_info, and printed with -s). The
    engine certifies at least auto_LiRPA's count."""
    if benchmark.disabled:
        pytest.skip("a long case (minutes): runs under --benchmark-enable")
    model = eran_mlp(network)
    x, labels = _test_images("mnist", 100), _labels("mnist", 100)
    with torch.no_grad():
        right = model(x).argmax(1) == labels
    x, spec = x[right], margin_spec(labels[right], 10)
    options = {"alpha_iterations": 20, "alpha_lr": 0.1}
    ours = benchmark.pedantic(_certified, (get_verifier("alpha-crown", **options), model, x,
                                           spec, eps), rounds=1, iterations=1)
    benchmark.extra_info.update(certified=ours[0], of=len(x), cpu_s=round(ours[1], 1))
    line = f"{network} eps {eps}: engine {ours[0]} of {len(x)} in {ours[1]:.1f} CPU s"
    if LIRPA:
        theirs = _certified(get_verifier("lirpa:alpha-crown", **options), model, x, spec, eps)
        benchmark.extra_info.update(lirpa_certified=theirs[0], lirpa_cpu_s=round(theirs[1], 1))
        line += f"; auto_LiRPA {theirs[0]} in {theirs[1]:.1f} CPU s"
        assert ours[0] >= theirs[0]
    print(line)
