"""VNN-LIB reading: the competition files' boxes and unsafe sets, the DNF of hand-written
formulas, and one-line errors that name the file."""

from __future__ import annotations

import gzip
import re
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from certbench.data import load_dataset
from certbench.io.vnnlib import MAX_DISJUNCTS, Property, VnnlibError, read_vnnlib
from conftest import SHARED_DATA

VNNCOMP = [SHARED_DATA / "vnncomp2021", SHARED_DATA / "vnncomp2022"]
FILES = sorted(path for root in VNNCOMP if root.is_dir() for path in root.rglob("*")
               if path.name.endswith((".vnnlib", ".vnnlib.gz")))
NO_DATA = f"VNN-COMP files not found under {SHARED_DATA} (the shared data folder)"
TEST_DIR = SHARED_DATA / "vnncomp2021" / "test"
ERAN = sorted((SHARED_DATA / "vnncomp2021" / "eran" / "specs" / "mnist").glob("*.vnnlib"))
MNISTFC = sorted([*(SHARED_DATA / "vnncomp2021" / "mnistfc").glob("prop_*.vnnlib"),
                  *(SHARED_DATA / "vnncomp2022" / "mnist_fc" / "vnnlib").glob("prop_*")])


def files_or_skip(files: list[Path]) -> list:
    """Parameters for one test per file, or one skipped test when the data is absent."""
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_DATA))]
    return [pytest.param(path, id=str(path.relative_to(SHARED_DATA))) for path in files]


@cache
def parsed(path: Path) -> Property:
    return read_vnnlib(path)


def text_of(path: Path) -> str:
    return gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()


def robustness_target(prop: Property) -> int:
    """The class t when the unsafe set is one box times ``⋁_{j != t} {y_t - y_j <= 0}``."""
    (region,) = prop.regions
    targets, others = set(), []
    for matrix, offsets in region.constraints:
        assert matrix.shape == (1, prop.n_outputs) and offsets.tolist() == [0.0]
        assert sorted(matrix[0][matrix[0] != 0].tolist()) == [-1.0, 1.0]
        targets.add(int(np.flatnonzero(matrix[0] == 1)[0]))
        others.append(int(np.flatnonzero(matrix[0] == -1)[0]))
    (target,) = targets
    assert sorted(others) == [j for j in range(prop.n_outputs) if j != target]
    return target


def write(tmp_path: Path, text: str, name: str = "prop.vnnlib") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def declare(n_inputs: int, n_outputs: int) -> str:
    return "".join([*(f"(declare-const X_{i} Real)\n" for i in range(n_inputs)),
                    *(f"(declare-const Y_{j} Real)\n" for j in range(n_outputs))])


def unit_box(n_inputs: int) -> str:
    return "".join(f"(assert (>= X_{i} 0))\n(assert (<= X_{i} 1))\n" for i in range(n_inputs))


def dnf(region) -> set[frozenset]:
    """The region's disjuncts as sets of rows (c, d), independent of order."""
    return {frozenset((tuple(c), d) for c, d in zip(matrix.tolist(), offsets.tolist(), strict=True))
            for matrix, offsets in region.constraints}


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """MNIST test images as (10000, 784) float64 in [0, 1] and their labels."""
    if not (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST files not found in {SHARED_DATA / 'mnist'} (the shared data folder)")
    data = load_dataset("mnist", SHARED_DATA)
    return data.x_test.reshape(-1, 784).double().numpy(), data.y_test.numpy()


@pytest.mark.parametrize("path", files_or_skip(FILES))
def test_competition_file_is_a_finite_box_and_images_have_a_robustness_property(path):
    prop = parsed(path)
    for region in prop.regions:
        assert np.isfinite(region.lower).all() and np.isfinite(region.upper).all()
        assert (region.lower <= region.upper).all()
    if path.parent != TEST_DIR and (prop.n_inputs, prop.n_outputs) in {(784, 10), (3072, 10)}:
        robustness_target(prop)  # the image benchmarks state local robustness
    if prop.n_inputs == 784:
        assert (prop.regions[0].lower >= 0).all() and (prop.regions[0].upper <= 1).all()


@pytest.mark.parametrize("path", files_or_skip(ERAN))
def test_eran_box_is_the_clipped_eps_ball_of_the_named_mnist_image(path, mnist_test):
    images, labels = mnist_test
    match = re.fullmatch(r"mnist_spec_idx_(\d+)_eps_(\d+\.\d+)\.vnnlib", path.name)
    index, eps = int(match[1]), float(match[2])
    prop = parsed(path)
    (region,) = prop.regions
    np.testing.assert_allclose(region.lower, np.clip(images[index] - eps, 0, 1), atol=1e-7)
    np.testing.assert_allclose(region.upper, np.clip(images[index] + eps, 0, 1), atol=1e-7)
    assert robustness_target(prop) == labels[index]


@pytest.mark.parametrize("path", files_or_skip(MNISTFC))
def test_mnistfc_box_is_the_clipped_eps_ball_of_an_mnist_image_of_its_label(path, mnist_test):
    images, labels = mnist_test
    eps = float(re.search(r"_(\d+\.\d+)\.vnnlib", path.name)[1])
    label = int(re.search(r"label: (\d)", text_of(path))[1])
    prop = parsed(path)
    (region,) = prop.regions
    inside = (region.lower > 0) & (region.upper < 1)
    middle = (region.lower + region.upper) / 2
    image = np.abs(images[:, inside] - middle[inside]).max(axis=1).argmin()
    np.testing.assert_allclose(region.lower, np.clip(images[image] - eps, 0, 1), atol=1e-7)
    np.testing.assert_allclose(region.upper, np.clip(images[image] + eps, 0, 1), atol=1e-7)
    assert labels[image] == label == robustness_target(prop)


@pytest.mark.skipif(not FILES, reason=NO_DATA)
def test_instances_csv_names_resolve_to_gzipped_files():
    for csv in sorted(path for root in VNNCOMP for path in root.rglob("*instances.csv")):
        name = csv.read_text().splitlines()[0].split(",")[1]
        assert parsed(csv.parent / name).n_outputs >= 1


@pytest.mark.skipif(not FILES, reason=NO_DATA)
def test_largest_file_parses_in_well_under_a_second():
    largest = max(FILES, key=lambda path: len(text_of(path)))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        read_vnnlib(largest)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.25


@pytest.mark.skipif(not TEST_DIR.is_dir(), reason=NO_DATA)
def test_vnncomp_sanity_files_give_the_hand_written_regions():
    prop = read_vnnlib(TEST_DIR / "test_prop.vnnlib", n_inputs=5, n_outputs=5)
    (region,) = prop.regions
    assert region.lower.tolist() == [-0.30353115613746867, -0.009549296585513092,
                                     0.4933803235848431, 0.3, 0.3]
    assert region.upper.tolist() == [-0.29855281193475053, 0.009549296585513092,
                                     0.49999999998567607, 0.5, 0.5]
    ((matrix, offsets),) = region.constraints
    assert matrix.tolist() == [[1, -1, 0, 0, 0], [1, 0, -1, 0, 0], [1, 0, 0, -1, 0],
                               [1, 0, 0, 0, -1]]
    assert offsets.tolist() == [0, 0, 0, 0]

    expected = {"test_nano": ([[1.0]], [-1.0]), "test_tiny": ([[-1.0]], [-100.0]),
                "test_small": ([[-1.0]], [-100.0])}
    for name, (rows, offset) in expected.items():
        prop = read_vnnlib(TEST_DIR / f"{name}.vnnlib", n_inputs=1, n_outputs=1)
        (region,) = prop.regions
        assert (region.lower.tolist(), region.upper.tolist()) == ([-1.0], [1.0])
        ((matrix, offsets),) = region.constraints
        assert (matrix.tolist(), offsets.tolist()) == (rows, offset)


def test_comparisons_become_rows_c_y_le_d_with_constants_on_either_side(tmp_path):
    path = write(tmp_path, declare(2, 2) + """
        (assert (>= 1 X_0)) (assert (<= -1 X_0))      ; -1 <= X_0 <= 1
        (assert (>= X_1 0.5)) (assert (< X_1 2.5e0))   ; strict read as <=
        (assert (>= Y_0 3))     ; -y0 <= -3
        (assert (>= 2 Y_1))     ;  y1 <= 2
        (assert (<= -1 Y_0))    ; -y0 <= 1
        (assert (> Y_1 Y_0))    ;  y0 - y1 <= 0
    """)
    (region,) = read_vnnlib(path).regions
    assert (region.lower.tolist(), region.upper.tolist()) == ([-1, 0.5], [1, 2.5])
    assert dnf(region) == {frozenset({((-1.0, 0.0), -3.0), ((0.0, 1.0), 2.0),
                                      ((-1.0, 0.0), 1.0), ((1.0, -1.0), 0.0)})}


def test_linear_expression_moves_constants_to_the_right(tmp_path):
    path = write(tmp_path, declare(1, 3) + unit_box(1)
                 + "(assert (<= (+ Y_0 (* 2 Y_1)) (- Y_2 3)))\n"
                 + "(assert (>= (* -0.5 (- Y_0 4)) (+ 1 (- Y_1) Y_1 Y_1)))\n")
    (region,) = read_vnnlib(path).regions
    # y0 + 2 y1 - y2 <= -3;   y1 + 1 <= -0.5 y0 + 2  <=>  0.5 y0 + y1 <= 1
    assert dnf(region) == {frozenset({((1.0, 2.0, -1.0), -3.0), ((0.5, 1.0, 0.0), 1.0)})}


def test_nested_or_and_expand_to_disjunctive_normal_form(tmp_path):
    path = write(tmp_path, declare(1, 3) + unit_box(1) + """
        (assert (or (and (<= Y_0 1) (or (<= Y_1 2) (<= Y_2 3))) (<= Y_0 Y_1)))
    """)
    (region,) = read_vnnlib(path).regions
    assert dnf(region) == {
        frozenset({((1.0, 0.0, 0.0), 1.0), ((0.0, 1.0, 0.0), 2.0)}),
        frozenset({((1.0, 0.0, 0.0), 1.0), ((0.0, 0.0, 1.0), 3.0)}),
        frozenset({((1.0, -1.0, 0.0), 0.0)}),
    }


def test_top_level_output_asserts_are_conjoined_with_an_or(tmp_path):
    path = write(tmp_path, declare(1, 3) + unit_box(1) + """
        (assert (or (<= Y_0 0) (<= Y_1 0)))
        (assert (<= Y_2 5))
        (assert (or (and (<= Y_2 4)) (<= Y_2 -4)))
    """)
    (region,) = read_vnnlib(path).regions
    y0, y1, y2 = ((1.0, 0.0, 0.0), 0.0), ((0.0, 1.0, 0.0), 0.0), ((0.0, 0.0, 1.0), 5.0)
    low, high = ((0.0, 0.0, 1.0), -4.0), ((0.0, 0.0, 1.0), 4.0)
    assert dnf(region) == {frozenset({y0, y2, high}), frozenset({y0, y2, low}),
                           frozenset({y1, y2, high}), frozenset({y1, y2, low})}


def test_disjuncts_with_their_own_input_bounds_group_into_regions(tmp_path):
    path = write(tmp_path, declare(2, 2) + """
        (assert (>= X_0 0)) (assert (<= X_0 1))
        (assert (or
            (and (>= X_1 0) (<= X_1 1) (<= Y_0 0))
            (and (<= X_1 1) (>= X_1 0) (<= Y_1 0))
            (and (>= X_1 1) (<= X_1 2) (<= X_0 0.5) (<= Y_0 Y_1))))
    """)
    first, second = read_vnnlib(path).regions
    assert (first.lower.tolist(), first.upper.tolist()) == ([0, 0], [1, 1])
    assert dnf(first) == {frozenset({((1.0, 0.0), 0.0)}), frozenset({((0.0, 1.0), 0.0)})}
    assert (second.lower.tolist(), second.upper.tolist()) == ([0, 1], [0.5, 2])
    assert dnf(second) == {frozenset({((1.0, -1.0), 0.0)})}


def test_gzip_file_is_read_also_when_named_without_gz(tmp_path):
    text = declare(1, 1) + unit_box(1) + "(assert (<= Y_0 -0.29855281193475053))\n"
    (tmp_path / "prop.vnnlib.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("prop.vnnlib", "prop.vnnlib.gz"):
        prop = read_vnnlib(tmp_path / name, n_inputs=1, n_outputs=1)
        (region,) = prop.regions
        assert region.constraints[0][1].tolist() == [-0.29855281193475053]


def test_dnf_larger_than_the_limit_is_refused(tmp_path):
    count = int(np.ceil(np.log2(MAX_DISJUNCTS + 1)))
    path = write(tmp_path, declare(1, 2) + unit_box(1)
                 + "(assert (or (<= Y_0 0) (<= Y_1 0)))\n" * count)
    with pytest.raises(VnnlibError, match="prop.vnnlib: .*more than 10000 disjuncts"):
        read_vnnlib(path)


ERRORS = {
    "unclosed": ("(assert (<= X_0 1)\n", r":5: unbalanced parentheses: this '\(' is never closed"),
    "extra ')'": ("(assert (<= X_0 1)))\n", r":5: unbalanced parentheses: this '\)' closes"),
    "unknown operator": ("(assert (= X_0 1))\n", r":5: unknown operator '='"),
    "undeclared": ("(assert (<= X_7 1))\n", r":5: undeclared variable 'X_7'"),
    "input and output": ("(assert (<= X_0 Y_0))\n", r":5: .* relates inputs to outputs"),
    "two inputs": ("(assert (<= X_0 X_1))\n", r":5: .* relates several inputs"),
    "nonlinear": ("(assert (<= (* Y_0 Y_1) 1))\n", r":5: .* is not linear"),
    "unknown command": ("(check-sat)\n", r":5: unknown command \(check-sat\)"),
}


@pytest.mark.parametrize("body, message", ERRORS.values(), ids=ERRORS.keys())
def test_syntax_error_names_file_and_line(tmp_path, body, message):
    path = write(tmp_path, declare(2, 1) + unit_box(2).replace("\n", " ") + "\n" + body)
    with pytest.raises(VnnlibError, match="prop.vnnlib" + message) as error:
        read_vnnlib(path)
    assert "\n" not in str(error.value)


def test_input_without_a_lower_bound_is_an_error(tmp_path):
    path = write(tmp_path, declare(2, 1) + "(assert (>= X_0 0)) (assert (<= X_0 1))\n"
                 "(assert (<= X_1 1))\n")
    with pytest.raises(VnnlibError, match=r"prop.vnnlib: input X_1 has no lower bound"):
        read_vnnlib(path)


def test_empty_box_is_an_error(tmp_path):
    path = write(tmp_path, declare(1, 1) + "(assert (>= X_0 0.5)) (assert (<= X_0 0.25))\n")
    with pytest.raises(VnnlibError, match=r"prop.vnnlib: empty input box: X_0 >= 0.5"):
        read_vnnlib(path)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(VnnlibError, match=r"absent.vnnlib: no such file"):
        read_vnnlib(tmp_path / "absent.vnnlib")


def test_declared_count_must_match_the_network(tmp_path):
    path = write(tmp_path, declare(2, 1) + unit_box(2))
    assert read_vnnlib(path, n_inputs=2, n_outputs=1).n_inputs == 2
    with pytest.raises(VnnlibError, match=r"prop.vnnlib: declares 2 inputs, the network has "
                                          r"3072: is this property for another network\?"):
        read_vnnlib(path, n_inputs=3072)
    with pytest.raises(VnnlibError, match=r"prop.vnnlib: declares 1 outputs, the network has 10"):
        read_vnnlib(path, n_outputs=10)
