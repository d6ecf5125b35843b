"""Branch and bound (``bab``) is complete: on small networks it agrees with the exact MILP
on every point and epsilon, its certificates survive attacks and dense grids, each of its
counterexamples changes the prediction inside the ball, and an exhausted budget reads
``timeout``, never ``not_certified``. Its parts are checked alone: beta-CROWN bounds of
split domains hold on sampled points of the domain, BaBSR splits unstable neurons, and
filtered smart branching picks the candidate whose worse child it bounds best."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from test_exact import SMALL_MODELS  # the same small networks as the MILP's tests
from torch import nn

from certbench.run.attacks import pgd
from certbench.verifiers import Verdict, get_verifier, verdict_code
from certbench.verifiers.bound_propagation import Ball, BoundPropagator, TracedNetwork
from certbench.verifiers.bound_propagation.propagation import AlphaOptimiser
from certbench.verifiers.branch_and_bound.branching import babsr, flat_decisions, fsb, neuron_scores
from certbench.verifiers.branch_and_bound.domains import DomainBounder, Domains
from certbench.verifiers.falsification import box_pgd
from certbench.verifiers.specification import OutputSpec, SpecVerdict
from conftest import DIGITS_SHAPE, random_model

CERTIFIED, FALSIFIED, TIMEOUT = (verdict_code(v) for v in (
    Verdict.CERTIFIED, Verdict.FALSIFIED, Verdict.TIMEOUT))


def _check_counterexamples(model, x, eps, norm, cert):
    for (n, k), point in cert.counterexamples.items():
        delta = (point - x[n]).flatten()
        size = delta.abs().max() if norm == "inf" else delta.norm()
        assert size <= eps[k] * (1 + 1e-5) + 1e-6
        assert 0 <= point.min() and point.max() <= 1
        with torch.no_grad():
            assert model(point).argmax(1) != model(x[n : n + 1]).argmax(1)
    assert len(cert.counterexamples) == int((cert.verdicts == FALSIFIED).sum())


@pytest.mark.parametrize("branching", ["babsr", "fsb"])
@pytest.mark.parametrize("arch", sorted(SMALL_MODELS))
def test_bab_agrees_with_the_exact_milp_on_every_point(arch, branching):
    arch_args, seed, eps = SMALL_MODELS[arch]
    model = random_model(arch, seed=seed, **arch_args)
    x = torch.rand(6, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(5))
    exact = get_verifier("exact", time_limit_s=60)
    exact.prepare(model, DIGITS_SHAPE)
    truth = exact.certify(x, "inf", eps)
    bab = get_verifier("bab", time_limit_s=60, branching=branching)
    bab.prepare(model, DIGITS_SHAPE)
    cert = bab.certify(x, "inf", eps)
    assert (truth.verdicts == CERTIFIED).any() and (truth.verdicts == FALSIFIED).any()
    assert torch.equal(cert.verdicts, truth.verdicts)
    _check_counterexamples(model, x, eps, "inf", cert)
    decided = (cert.verdicts == CERTIFIED) | (cert.columns["falsify_s"] > 0)
    assert (cert.columns["bab_domains"][decided] >= 1).all()


def test_bab_decides_points_that_crown_leaves_open_on_a_trained_model(trained, digits):
    """A GloRo MLP at an epsilon where CROWN certifies some points, not all: bab decides
    every point, certifies everything alpha-CROWN does, and agrees with the MILP."""
    model = trained["mlp-gloro"]
    x, eps = digits.x_test[:8], [0.08]
    verdicts = {}
    for name in ("alpha-crown", "bab", "exact"):
        verifier = get_verifier(name)
        verifier.prepare(model, DIGITS_SHAPE)
        verdicts[name] = verifier.certify(x, "inf", eps).verdicts
    assert ((verdicts["bab"] == CERTIFIED) | (verdicts["bab"] == FALSIFIED)).all()
    assert (verdicts["bab"][verdicts["alpha-crown"] == CERTIFIED] == CERTIFIED).all()
    assert torch.equal(verdicts["bab"], verdicts["exact"])


@pytest.mark.parametrize("arch", ["mlp", "cnn-small"])
def test_bab_l2_certificates_survive_attacks_and_counterexamples_hold(arch):
    """No exact l2 reference exists here (it would need an MIQP): bab's l2 certificates
    are checked against PGD with restarts from the same points, its counterexamples by a
    forward pass, and it must certify everything alpha-CROWN certifies."""
    arch_args, seed, _ = SMALL_MODELS[arch]
    model = random_model(arch, seed=seed, **arch_args)
    x = torch.rand(6, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(5))
    eps = [0.05, 0.2, 0.5]
    bab = get_verifier("bab", time_limit_s=60)
    bab.prepare(model, DIGITS_SHAPE)
    cert = bab.certify(x, "2", eps)
    alpha = get_verifier("alpha-crown")
    alpha.prepare(model, DIGITS_SHAPE)
    bound = alpha.certify(x, "2", eps)
    assert (cert.verdicts[bound.verdicts == CERTIFIED] == CERTIFIED).all()
    assert (cert.verdicts == CERTIFIED).any() and (cert.verdicts == FALSIFIED).any()
    y = cert.prediction
    for k, e in enumerate(eps):
        _, broken = pgd(model, x, y, e, "2", steps=100, restarts=10)
        assert not (broken & (cert.verdicts[:, k] == CERTIFIED)).any()
    _check_counterexamples(model, x, eps, "2", cert)


def _sectors_model() -> nn.Module:
    """A 2-D classifier of three sectors around (0.5, 0.5), trained in a second."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    points = torch.rand(2000, 2)
    angle = torch.atan2(points[:, 1] - 0.5, points[:, 0] - 0.5)
    labels = ((angle + torch.pi) / (2 * torch.pi / 3)).long().clamp(max=2)
    optimiser = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(300):
        loss = nn.functional.cross_entropy(model(points), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.mark.parametrize("input_split_dims", [8, 0], ids=["input-splits", "relu-splits"])
def test_bab_certified_region_matches_a_dense_grid_in_two_dimensions(input_split_dims):
    """Centres on a 7 x 7 grid over a 2-D network's three decision regions, l_inf balls:
    bab certifies exactly the balls in which a 201 x 201 grid finds no other class (up to
    balls where only a sliver, thinner than the grid, crosses the boundary: there bab
    must answer falsified with a confirmed point); by input splitting (the default for
    two inputs) and by ReLU splitting alike."""
    model = _sectors_model()
    axis = torch.linspace(0.05, 0.95, 7)
    centers = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    eps = [0.03, 0.08]
    bab = get_verifier("bab", time_limit_s=60, input_split_dims=input_split_dims)
    bab.prepare(model, (2,))
    cert = bab.certify(centers, "inf", eps)
    assert ((cert.verdicts == CERTIFIED) | (cert.verdicts == FALSIFIED)).all()
    _check_counterexamples(model, centers, eps, "inf", cert)
    offsets = torch.linspace(-1, 1, 201)
    grid = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), -1).reshape(-1, 2)
    disagree = 0
    for n, center in enumerate(centers):
        for k, e in enumerate(eps):
            points = (center + e * grid).clamp(0, 1)
            with torch.no_grad():
                changed = bool((model(points).argmax(1) != cert.prediction[n]).any())
            if changed:
                assert cert.verdicts[n, k] == FALSIFIED, (center, e)
            elif cert.verdicts[n, k] != CERTIFIED:
                disagree += 1
    assert (cert.verdicts == CERTIFIED).sum() > 15 and (cert.verdicts == FALSIFIED).sum() > 15
    assert disagree <= 2


def test_input_splitting_agrees_with_the_exact_milp_on_a_five_input_network():
    """A random 5-40-40-4 ReLU network (the shape of a control network such as ACAS Xu):
    on l_inf balls from small to large, bab by input splitting answers what the MILP
    answers, its counterexamples confirmed, splitting where CROWN alone leaves balls open."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 4)).eval()
    x = torch.rand(6, 5, generator=torch.Generator().manual_seed(8))
    eps = [0.01, 0.05, 0.15]
    exact = get_verifier("exact", time_limit_s=60)
    exact.prepare(model, (5,))
    truth = exact.certify(x, "inf", eps)
    bab = get_verifier("bab", time_limit_s=60, attack_restarts=1, attack_steps=1)
    bab.prepare(model, (5,))
    cert = bab.certify(x, "inf", eps)
    assert (truth.verdicts == CERTIFIED).any() and (truth.verdicts == FALSIFIED).any()
    assert torch.equal(cert.verdicts, truth.verdicts)
    _check_counterexamples(model, x, eps, "inf", cert)
    assert (cert.columns["bab_lp_leaves"].nan_to_num() == 0).all()  # no ReLU-split leaves
    assert cert.columns["bab_input_boxes"].nan_to_num().max() > 2
    assert cert.columns["bab_domains"].nan_to_num().max() <= 1  # the root only


def test_hopeless_projects_the_proven_volume_over_the_budget():
    from certbench.verifiers.branch_and_bound.input_split import (
        PROBE_ROUNDS,
        PROBE_SHARE,
        hopeless,
    )

    enough = PROBE_ROUNDS
    assert not hopeless(0.0, 0.5 * PROBE_SHARE * 100, 100, enough)  # too early to judge
    assert not hopeless(0.0, 50, 100, PROBE_ROUNDS - 1)  # too few rounds
    assert hopeless(0.1, 50, 100, enough)  # 10 % in 50 s: 500 s for all
    assert not hopeless(0.6, 50, 100, enough)  # 60 % in 50 s: done within 100 s


@pytest.mark.parametrize("abandon", [False, True])
def test_input_splitting_probe_and_its_handover_agree_with_the_milp(monkeypatch, abandon):
    """Inputs between ``input_split_dims`` and ``input_split_probe_dims`` coordinates:
    input splitting runs as a probe; abandoned (forced here: no share of the time, one
    round), ReLU splitting takes over. Either way the answers are the MILP's, and the
    method names the split that decided."""
    from certbench.verifiers.branch_and_bound import input_split

    if abandon:  # hopeless after the first round
        monkeypatch.setattr(input_split, "hopeless", lambda *args: args[3] >= 1)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(),
                          nn.Linear(30, 3)).eval()
    exact = get_verifier("exact", time_limit_s=60)
    exact.prepare(model, (12,))
    bab = get_verifier("bab", time_limit_s=60, attack_restarts=1, attack_steps=1)
    bab.prepare(model, (12,))
    c = torch.tensor([[1.0, -1.0, 0.0]])
    methods, verdicts = set(), []
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):
        center = torch.rand(1, 12, generator=gen)
        lower, upper = center - 0.08, center + 0.08
        with torch.no_grad():
            value = float((model(center) @ c.T)[0, 0])
        spec = OutputSpec(((c, torch.tensor([value - 0.05])),))  # unsafe: y0 - y1 <= v - .05
        truth = exact.check_spec(lower, upper, spec, 60).verdict
        answer = bab.check_spec(lower, upper, spec, 60)
        assert answer.verdict == truth
        verdicts.append(truth)
        methods.add(answer.method)
    assert SpecVerdict.UNSAT in verdicts
    expected = "bab: input split, then relu split" if abandon else "bab: input split"
    assert expected in methods


def test_box_bounds_of_input_splitting_hold_on_sampled_points():
    """bound_boxes: on 64 random boxes of a random 3-input network, the bound never
    exceeds the property's value at 2000 points sampled in the box (corners included)."""
    from certbench.verifiers.branch_and_bound.input_split import bound_boxes

    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                          nn.Linear(20, 3)).eval()
    prop = BoundPropagator(TracedNetwork(model, (3,)))
    lower = torch.rand(64, 3)
    upper = lower + 0.3 * torch.rand(64, 3)
    c = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]])
    d = torch.tensor([0.1, -0.2])
    value, coefficients = bound_boxes(prop, lower, upper, c, d)
    assert coefficients.shape == (64, 2, 3)
    t = torch.rand(64, 2000, 3)
    t[:, :8] = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
    points = lower[:, None] + t * (upper - lower)[:, None]
    with torch.no_grad():
        truth = ((model(points.reshape(-1, 3)) @ c.T - d).max(1).values.reshape(64, -1))
    assert (value <= truth.min(1).values + 1e-5).all()


def test_an_exhausted_budget_is_a_timeout_not_a_failure_to_certify():
    model = random_model("mlp", seed=4, widths=[64, 64, 64])
    x = torch.rand(3, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(2))
    crown = get_verifier("crown")
    crown.prepare(model, DIGITS_SHAPE)
    bab = get_verifier("bab", time_limit_s=1e-3, attack_restarts=1, attack_steps=1)
    bab.prepare(model, DIGITS_SHAPE)
    eps = [0.05]
    open_ = crown.certify(x, "inf", eps).verdicts != CERTIFIED
    cert = bab.certify(x, "inf", eps)
    assert open_.any()
    assert ((cert.verdicts == TIMEOUT) | (cert.verdicts == FALSIFIED))[open_].all()


def test_bab_refuses_activations_it_cannot_split():
    model = nn.Sequential(nn.Linear(2, 4), nn.Sigmoid(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="bab has no split that makes it linear for Sigmoid"):
        get_verifier("bab").prepare(model, (2,))


def _root(model, x, eps, rows):
    prop = BoundPropagator(TracedNetwork(model, x.shape[1:]))
    ball = Ball(x, eps, "inf")
    bounds = prop.intermediate_bounds(ball, "crown")
    optimiser = AlphaOptimiser(prop, rows[None], ball, bounds, 0.1)
    optimiser.run(prop.backward(prop.net.output, rows[None], ball, bounds), 5)
    lower = {i: b[0].clone() for i, b in optimiser.reference.items()}
    upper = {i: b[1].clone() for i, b in optimiser.reference.items()}
    domain = Domains(
        lower=lower, upper=upper,
        signs={i: torch.zeros_like(v, dtype=torch.int8) for i, v in lower.items()},
        alphas={a: p.detach().clone() for a, p in optimiser.alphas[prop.net.output].items()},
        betas={i: v.new_zeros(1, len(rows), *v.shape[1:]) for i, v in lower.items()},
        value=torch.tensor([-torch.inf]), depth=torch.zeros(1, dtype=torch.long),
        branch=torch.full((1, 2), -1, dtype=torch.long))
    return prop, ball, domain


def _two_hidden_layer_root():
    """A 3-12-12-2 network's root domain at 0.5 +- 0.3 for f_0 - f_1, bounded once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                          nn.Linear(12, 2)).eval()
    rows = torch.tensor([[1.0, -1.0]])
    prop, ball, domain = _root(model, torch.full((1, 3), 0.5), 0.3, rows)
    bounder = DomainBounder(prop, ball, rows, torch.zeros(1))
    coefficients = bounder.bound(domain, 0, float("inf"))
    return model, rows, prop, ball, domain, bounder, coefficients


def test_split_domain_bounds_hold_on_sampled_points_of_each_domain():
    """Three rounds of splitting on BaBSR's choice: every child's beta-CROWN bound is at
    most the objective at every sampled input whose pre-activations have the child's
    signs, and optimising beta never loosens the bound it starts from."""
    model, rows, prop, ball, domains, bounder, coefficients = _two_hidden_layer_root()
    samples = ball.center + (2 * torch.rand(20000, 3) - 1) * 0.3
    hidden = {}
    with torch.no_grad():
        h = samples
        for i, layer in enumerate(model):
            h = layer(h)
            if isinstance(layer, nn.Linear) and i < len(model) - 1:
                hidden[len(hidden)] = h.clone()
        objective = h @ rows[0]
    for _ in range(3):
        domains.branch = babsr(prop, domains.lower, domains.upper, coefficients)
        assert (domains.branch[:, 0] >= 0).all()  # unstable neurons remain to split
        children = domains.split(prop.relu_inputs)
        start = children.value.clone()
        coefficients = bounder.bound(children, 20, float("inf"))
        assert (children.value >= start).all()
        for c in range(len(children)):
            inside = torch.ones(len(samples), dtype=torch.bool)
            for position, node in enumerate(prop.relu_inputs):
                signs = children.signs[node][c]
                z = hidden[position]
                inside &= ((signs == 0) | (signs * z >= 0)).all(1)
            if inside.any():
                assert children.value[c] <= objective[inside].min() + 1e-5
        domains = children


def test_no_optimisation_step_starts_after_the_deadline():
    """At a passed deadline the root's alpha-CROWN and a round's beta-CROWN take no Adam
    step (parameters untouched) and return finite bounds no looser than CROWN's: a timeout
    is not late by a whole round. With time left, the same calls do move the parameters."""
    model, rows, prop, ball, domain, bounder, coefficients = _two_hidden_layer_root()
    domain.branch = babsr(prop, domain.lower, domain.upper, coefficients)
    for deadline, moved in ((time.perf_counter() - 1, False), (float("inf"), True)):
        children = domain.split(prop.relu_inputs)
        start = {a: p.clone() for a, p in children.alphas.items()}
        bounder.bound(children, 5, float("inf"), deadline=deadline)
        changed = any(not torch.equal(start[a], p) for a, p in children.alphas.items())
        assert changed == moved
        assert torch.isfinite(children.value).all()

        bounds = prop.intermediate_bounds(ball, "crown")
        optimiser = AlphaOptimiser(prop, rows[None], ball, bounds, 0.1)
        first = {a: p.clone() for a, p in optimiser.alphas[prop.net.output].items()}
        crown = prop.backward(prop.net.output, rows[None], ball, bounds)
        best = optimiser.run(crown, 5, deadline=deadline)
        assert (best >= crown).all()
        changed = any(not torch.equal(first[a], p)
                      for a, p in optimiser.alphas[prop.net.output].items())
        assert changed == moved


def test_the_attack_and_the_search_start_nothing_after_the_deadline():
    """PGD at a passed deadline evaluates its starting points once and takes no step;
    bab with no time left answers timeout right after its CROWN pass, without attacking.
    With time left, PGD takes its steps."""
    model, rows, *_ = _two_hidden_layer_root()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    lower, upper = torch.full((1, 3), 0.2), torch.full((1, 3), 0.8)
    violation = OutputSpec(((rows, torch.full((1,), -1e9)),)).violation  # never reached
    for deadline, forward_passes in ((time.perf_counter() - 1, 1), (float("inf"), 11)):
        calls.clear()
        box_pgd(model, lower, upper, violation, steps=10, restarts=2, deadline=deadline)
        assert len(calls) == forward_passes

    verifier = get_verifier("bab")
    verifier.prepare(model, (3,))
    # every output is unsafe (f_0 <= f_1 or f_1 <= f_0): only the deadline keeps PGD off it
    spec = OutputSpec(((rows, torch.zeros(1)), (-rows, torch.zeros(1))))
    result = verifier.check_spec(lower, upper, spec, time_limit_s=1e-9)
    assert result.verdict == SpecVerdict.TIMEOUT
    assert result.columns["falsify_s"] == 0.0


def test_a_crown_pass_stops_between_chunks_of_rows_at_the_deadline():
    """A propagator whose deadline has passed starts no chunk of an intermediate node's
    rows; bab turns that into timeout and leaves the propagator without a deadline."""
    from certbench.verifiers.bound_propagation.propagation import DeadlineExceeded

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 4)).eval()
    prop = BoundPropagator(TracedNetwork(model, (5,)))
    ball = Ball(torch.rand(1, 5), 0.5, "inf", clip=False)
    prop.deadline = time.perf_counter() - 1
    with pytest.raises(DeadlineExceeded):
        prop.intermediate_bounds(ball, "crown")
    prop.deadline = float("inf")
    prop.intermediate_bounds(ball, "crown")

    bab = get_verifier("bab")
    bab.prepare(model, (5,))
    spec = OutputSpec(((torch.tensor([[1.0, -1.0, 0.0, 0.0]]), torch.zeros(1)),))
    result = bab.check_spec(ball.center - 0.5, ball.center + 0.5, spec, time_limit_s=1e-9)
    assert result.verdict == SpecVerdict.TIMEOUT
    assert bab.propagator.deadline == float("inf")


def test_babsr_picks_an_unstable_neuron_and_reports_leaves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.full((1, 3), 0.5)
    rows = torch.tensor([[1.0, -1.0]])
    prop, ball, domain = _root(model, x, 0.3, rows)
    coefficients = DomainBounder(prop, ball, rows, torch.zeros(1)).bound(domain, 0, 0.0)
    (position, index), = babsr(prop, domain.lower, domain.upper, coefficients).tolist()
    node = prop.relu_inputs[position]
    assert domain.lower[node].flatten()[index] < 0 < domain.upper[node].flatten()[index]
    stable = {i: v.clamp(min=0) for i, v in domain.lower.items()}
    assert babsr(prop, stable, domain.upper, coefficients).tolist() == [[-1, -1]]


def _worse_child(prop, bounder, domain, offsets, flat: int) -> float:
    """The bound FSB estimates for splitting neuron ``flat``: one pass per child with the
    parent's slopes and multipliers, the worse of the two."""
    trial = domain.take(slice(None))
    trial.branch = flat_decisions(torch.tensor([flat]), torch.tensor([True]), offsets)
    children = trial.split(prop.relu_inputs)
    with torch.no_grad():
        return float(bounder._pass(children, children.alphas, children.betas).amax(1).min())


def test_fsb_picks_its_best_candidate_which_is_never_worse_than_babsrs():
    """On a 3-hidden-layer network: FSB's neuron is unstable, and its estimated worse
    child is the best among all the candidates it considers, BaBSR's pick among them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 2)).eval()
    rows = torch.tensor([[1.0, -1.0]])
    prop, ball, domain = _root(model, torch.full((1, 10), 0.5), 0.15, rows)
    bounder = DomainBounder(prop, ball, rows, torch.zeros(1))
    coefficients = bounder.bound(domain, 0, float("inf"))
    score, intercept, offsets = neuron_scores(prop, domain.lower, domain.upper, coefficients)
    (position, index), = fsb(bounder, domain, coefficients).tolist()
    node = prop.relu_inputs[position]
    assert domain.lower[node].flatten()[index] < 0 < domain.upper[node].flatten()[index]
    chosen = _worse_child(prop, bounder, domain, offsets, int(offsets[position]) + index)
    candidates = [*score[0].topk(3).indices.tolist(), *(-intercept[0]).topk(3).indices.tolist()]
    assert all(chosen >= _worse_child(prop, bounder, domain, offsets, f) - 1e-6
               for f in candidates)
    (b_position, b_index), = babsr(prop, domain.lower, domain.upper, coefficients).tolist()
    assert int(offsets[b_position]) + b_index in candidates
    assert chosen > float(domain.value[0])  # the split helps both children
