"""Reader for VNN-COMP property files in VNN-LIB 1 (an SMT-LIB subset).

A file declares inputs ``X_0..X_{n-1}`` and outputs ``Y_0..Y_{m-1}`` and asserts the
*unsafe* set: an input x in the box whose output y = f(x) satisfies the output
constraints is a counterexample. The asserts are conjoined and rewritten in disjunctive
normal form, so the unsafe set reads

    U = ⋃_r  { (x, y) : l_r <= x <= u_r,  ⋁_i C_ri y <= d_ri },

one region r per distinct input box. Every output comparison ``a <= b`` (or ``b >= a``)
becomes a row ``c · y <= d`` with the constants moved to d. Strict ``<`` and ``>`` do not
occur in the competition files; they are read as ``<=`` and ``>=``, i.e. U is replaced by
its closure, which is the conservative reading when proving that U is empty.

The package index's ``vnnlib`` 0.0.1 (David Shriver, MIT, about 800 lines, one alpha
release, numpy only) was weighed and not used: it fails on assertions such as ``and``
over ``or`` (``assert row == 0``), reports problems as bare ``assert`` or "please open a
bug report", leaves a missing bound as an infinite one, and cannot resolve a ``.vnnlib``
name that exists only as ``.vnnlib.gz``. The reader below is instead a short
s-expression parser: no dependency, literals parsed exactly by ``float``, gzip read
transparently, and every mistake reported as one line naming the file and line.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np

from certbench.errors import UserError

MAX_DISJUNCTS = 10_000
"""The most disjuncts a conjunction of disjunctions may expand to (the expansion is a
product, so a short file could ask for an astronomical one); a disjunction written out
in the file is taken whole however long (nn4sys's have 10^4 and more)."""

_TOKEN = re.compile(r";[^\n]*|[()]|[^\s();]+")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_VARIABLE = re.compile(r"([XY])_(\d+)")
_COMPARISONS = {"<=": False, "<": False, ">=": True, ">": True}  # True: swap the sides
_SUPPORTED = "and, or, <=, >=, <, >, +, -, *"


class VnnlibError(UserError):
    """A VNN-LIB file that cannot be read as a property (message: file, line, mend)."""


@dataclass(frozen=True)
class Region:
    """Input box ``lower <= x <= upper`` with the unsafe outputs ``⋁_i {y : C_i y <= d_i}``."""

    lower: np.ndarray
    upper: np.ndarray
    constraints: list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Property:
    """Unsafe set ``⋃_r box_r × ⋁_i {C_ri y <= d_ri}``; the network is safe if it avoids it."""

    n_inputs: int
    n_outputs: int
    regions: list[Region]


class _List(list):
    """A parenthesised expression; ``pos`` is the index of its ``(`` among the tokens."""

    __slots__ = ("pos",)


class _Bound(NamedTuple):
    """``x_index <= value`` if ``upper`` else ``x_index >= value``."""

    index: int
    upper: bool
    value: float


class _Row(NamedTuple):
    """``sum_j coeffs[j] y_j <= d``."""

    coeffs: dict[int, float]
    d: float


def read_vnnlib(path: str | Path, n_inputs: int | None = None,
                n_outputs: int | None = None) -> Property:
    """The unsafe set asserted by a ``.vnnlib`` or ``.vnnlib.gz`` file.

    A name ``x.vnnlib`` that exists only as ``x.vnnlib.gz`` is read from the latter.
    ``n_inputs`` / ``n_outputs``, when given, must equal the declared counts.
    Raises VnnlibError for anything that is not such a property.
    """
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".gz").exists():
        path = path.with_name(path.name + ".gz")
    if not path.is_file():
        raise VnnlibError(f"{path}: no such file (nor {path.name}.gz): check the path")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt") as file:
                text = file.read()
        else:
            text = path.read_text()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise VnnlibError(f"{path}: cannot be read as a text file ({error})") from None
    return _Reader(path, text).property(n_inputs, n_outputs)


class _Reader:
    """One file's text, its declarations, and errors that name the file and line."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text
        self.variables: dict[str, tuple[str, int]] = {}  # "X_3" -> ("X", 3)

    def error(self, message: str, token: int | None = None) -> VnnlibError:
        """VnnlibError naming the file and the line of the token-th token."""
        where = ""
        if token is not None:
            pos = next(islice(_TOKEN.finditer(self.text), token, None)).start()
            where = f":{self.text.count(chr(10), 0, pos) + 1}"
        return VnnlibError(f"{self.path}{where}: {message}")

    def commands(self) -> Iterator[_List]:
        """The top-level expressions, each a nested list of atoms (strings), yielded as
        each closes (so that the whole tree never lives at once)."""
        top: list = []
        stack, current = [top], top
        for k, token in enumerate(_TOKEN.findall(self.text)):
            if token == "(":
                node = _List()
                node.pos = k
                current.append(node)
                stack.append(node)
                current = node
            elif token == ")":
                if current is top:
                    raise self.error("unbalanced parentheses: this ')' closes nothing; "
                                     "remove it", k)
                stack.pop()
                current = stack[-1]
                if current is top:
                    yield top.pop()
            elif token[0] != ";":
                if current is top:
                    raise self.error(f"'{token}' outside parentheses; every command is "
                                     "written (command ...)", k)
                current.append(token)
        if current is not top:
            raise self.error("unbalanced parentheses: this '(' is never closed; add ')'",
                             stack[1].pos)

    def asserts(self) -> Iterator[_List]:
        """The (assert ...) commands, reading the declarations between them."""
        for node in self.commands():
            head = node[0] if node else None
            if head == "declare-const":
                self.declare(node)
            elif head == "assert" and len(node) == 2:
                yield node
            else:
                raise self.error(f"unknown command {_show(node)}: expected "
                                 "(declare-const X_i Real) or (assert ...)", node.pos)

    def property(self, n_inputs: int | None, n_outputs: int | None) -> Property:
        """The asserts' DNF, its disjuncts grouped by their input box (top-level bounds
        intersected with the disjunct's own)."""
        common, rest = self.conjoin(self.formula(node[1], node.pos) for node in self.asserts())
        n_in = self.count("X", "inputs", n_inputs)
        n_out = self.count("Y", "outputs", n_outputs)
        lower, upper = np.full(n_in, -np.inf), np.full(n_in, np.inf)
        _tighten(lower, upper, common)
        common_rows = [atom for atom in common if isinstance(atom, _Row)]
        boxes: dict[bytes, Region] = {}
        for number, atoms in enumerate(rest):
            low, up = lower.copy(), upper.copy()
            _tighten(low, up, atoms)
            self.check_box(low, up, number if len(rest) > 1 else None)
            rows = common_rows + [atom for atom in atoms if isinstance(atom, _Row)]
            matrix = np.zeros((len(rows), n_out))
            for i, row in enumerate(rows):
                matrix[i, list(row.coeffs)] = list(row.coeffs.values())
            offsets = np.array([row.d for row in rows], dtype=np.float64)
            region = boxes.setdefault(low.tobytes() + up.tobytes(), Region(low, up, []))
            region.constraints.append((matrix, offsets))
        return Property(n_in, n_out, list(boxes.values()))

    def declare(self, node: _List) -> None:
        """Record ``(declare-const X_i Real)`` or ``(declare-const Y_j Real)``."""
        if len(node) != 3 or node[2] != "Real" or not isinstance(node[1], str):
            raise self.error(f"bad declaration {_show(node)}: write (declare-const X_i "
                             "Real)", node.pos)
        match = _VARIABLE.fullmatch(node[1])
        if match is None:
            raise self.error(f"declares '{node[1]}': variables are named X_<i> (inputs) "
                             "or Y_<i> (outputs)", node.pos)
        if node[1] in self.variables:
            raise self.error(f"'{node[1]}' is declared twice; remove one", node.pos)
        self.variables[node[1]] = (match[1], int(match[2]))

    def count(self, letter: str, what: str, expected: int | None) -> int:
        """Number of declared variables named letter_i, which must be i = 0..n-1."""
        indices = {i for name, i in self.variables.values() if name == letter}
        n = len(indices)
        if n and max(indices) != n - 1:
            missing = min(set(range(n)) - indices)
            raise self.error(f"declares {what} up to {letter}_{max(indices)} but not "
                             f"{letter}_{missing}; declare {letter}_0..{letter}_{max(indices)}")
        if expected is not None and n != expected:
            raise self.error(f"declares {n} {what}, the network has {expected}: is this "
                             "property for another network?")
        return n

    def formula(self, node, parent: int) -> list[list]:
        """The formula as DNF: a list of conjunctions, each a list of _Bound and _Row."""
        if not isinstance(node, _List) or not node:
            raise self.error(f"expected a formula (and, or, <=, >=), got {_show(node)}",
                             parent)
        head = node[0]
        if head == "and":
            common, rest = self.conjoin([self.formula(child, node.pos) for child in node[1:]])
            return [common + atoms for atoms in rest]
        if head == "or":  # as many disjuncts as the file spells out: no limit needed
            return [atoms for child in node[1:] for atoms in self.formula(child, node.pos)]
        if isinstance(head, str) and head in _COMPARISONS:
            if len(node) != 3:
                raise self.error(f"({head} ...) takes two arguments, got {len(node) - 1}",
                                 node.pos)
            left, right = node[1:] if not _COMPARISONS[head] else node[:0:-1]
            return [[self.atom(left, right, node)]]
        raise self.error(f"unknown operator '{_show(head)}' in {_show(node)}; supported: "
                         f"{_SUPPORTED}", node.pos)

    def conjoin(self, dnfs: Iterable[list[list]]) -> tuple[list, list[list]]:
        """AND of DNFs as (common, rest), meaning ``common ∧ ⋁_{atoms in rest} atoms``."""
        common: list = []
        rest: list[list] = [[]]
        for dnf in dnfs:
            if len(dnf) == 1:
                common.extend(dnf[0])
                continue
            if len(rest) > 1 and len(rest) * len(dnf) > MAX_DISJUNCTS:
                raise self.error(f"the asserts expand to more than {MAX_DISJUNCTS} "
                                 "disjuncts in disjunctive normal form; split the "
                                 "property into several files")
            rest = [atoms + more for atoms in rest for more in dnf]
        return common, rest

    def atom(self, left, right, node: _List) -> _Bound | _Row:
        """``left <= right`` as an input bound or an output row ``c · y <= d``."""
        if isinstance(left, str) and isinstance(right, str):  # variable vs number: fast
            variable, number, sign = self.variables.get(left), right, 1.0
            if variable is None:
                variable, number, sign = self.variables.get(right), left, -1.0
            if variable is not None and _NUMBER.fullmatch(number):
                if variable[0] == "X":
                    return _Bound(variable[1], sign > 0, float(number))
                return _Row({variable[1]: sign}, sign * float(number))
        coeffs: dict[tuple[str, int], float] = {}
        constant = (self.linear(left, 1.0, coeffs, node)
                    + self.linear(right, -1.0, coeffs, node))
        coeffs = {key: value for key, value in coeffs.items() if value}
        if len(coeffs) == 1:
            ((letter, i), value), = coeffs.items()
            if letter == "X":
                return _Bound(i, value > 0, -constant / value)
        letters = {letter for letter, _ in coeffs}
        if letters == {"Y"}:
            return _Row({j: value for (_, j), value in coeffs.items()}, -constant)
        problem = ("relates inputs to outputs" if letters == {"X", "Y"} else
                   "relates several inputs" if letters == {"X"} else "has no variable")
        raise self.error(f"{_show(node)} {problem}; an input constraint compares one X_i "
                         "with a number, an output constraint involves only Y_j", node.pos)

    def linear(self, term, sign: float, coeffs: dict, node: _List) -> float:
        """Add ``sign * term``'s coefficients to coeffs and return its constant part."""
        if isinstance(term, str):
            key = self.variables.get(term)
            if key is not None:
                coeffs[key] = coeffs.get(key, 0.0) + sign
                return 0.0
            if _NUMBER.fullmatch(term):
                return sign * float(term)
            raise self.error(f"undeclared variable '{term}' in {_show(node)}; add "
                             f"(declare-const {term} Real)", node.pos)
        head, args = (term[0], term[1:]) if term else (None, [])
        if head == "+" and args:
            return sum(self.linear(arg, sign, coeffs, term) for arg in args)
        if head == "-" and len(args) == 1:
            return self.linear(args[0], -sign, coeffs, term)
        if head == "-" and args:
            return self.linear(args[0], sign, coeffs, term) + sum(
                self.linear(arg, -sign, coeffs, term) for arg in args[1:])
        if head == "*" and args:
            factor, variable = sign, None
            for arg in args:
                if isinstance(arg, str) and _NUMBER.fullmatch(arg):
                    factor *= float(arg)
                elif variable is None:
                    variable = arg
                else:
                    raise self.error(f"{_show(term)} is not linear: multiply a variable "
                                     "by numbers only", term.pos)
            return factor if variable is None else self.linear(variable, factor, coeffs,
                                                               term)
        raise self.error(f"unknown operator in term {_show(term)}; supported: "
                         "numbers, X_i, Y_j, +, -, *", term.pos)

    def check_box(self, lower: np.ndarray, upper: np.ndarray, number: int | None) -> None:
        """Every input needs finite bounds with lower <= upper."""
        where = "" if number is None else f" (in disjunct {number} of the DNF)"
        for bounds, side, op in ((lower, "lower", ">="), (upper, "upper", "<=")):
            missing = np.flatnonzero(~np.isfinite(bounds))
            if missing.size:
                i = missing[0]
                more = f" (nor do {missing.size - 1} more inputs)" if missing.size > 1 else ""
                raise self.error(f"input X_{i} has no {side} bound{where}{more}; add "
                                 f"(assert ({op} X_{i} <number>))")
        empty = np.flatnonzero(lower > upper)
        if empty.size:
            i = empty[0]
            raise self.error(f"empty input box{where}: X_{i} >= {float(lower[i])!r} and "
                             f"X_{i} <= {float(upper[i])!r}; check the bounds of X_{i}")


def _tighten(lower: np.ndarray, upper: np.ndarray, atoms: list) -> None:
    """Intersect the box in place with the _Bound atoms."""
    for atom in atoms:
        if isinstance(atom, _Bound):
            if atom.upper:
                upper[atom.index] = min(upper[atom.index], atom.value)
            else:
                lower[atom.index] = max(lower[atom.index], atom.value)


def _show(node, limit: int = 60) -> str:
    """The expression as written (roughly), cut to ``limit`` characters."""
    text = (f"({' '.join(_show(child, limit) for child in node)})"
            if isinstance(node, list) else str(node))
    return text if len(text) <= limit else text[:limit - 4] + " ...)"
