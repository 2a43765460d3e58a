"""A truncated Neumann series as a Lineax linear solver: the paper's inexact
automatic differentiation (IAD) when used inside `Implicit`."""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array

from ._validate import positive_int


def _neumann_series(operator: lx.AbstractLinearOperator, vector: Any, terms: Any) -> Any:
    """$-\\sum_{i < \\text{terms}} (I + M)^i b$; `terms` may be traced."""

    def body(_, carry):
        term, total = carry
        total = jtu.tree_map(lambda a, b: a + b, total, term)
        term = jtu.tree_map(lambda a, b: a + b, term, operator.mv(term))
        return term, total

    zeros = jtu.tree_map(lambda v: v * 0, vector)
    _, total = jax.lax.fori_loop(0, terms, body, (vector, zeros))
    return jtu.tree_map(lambda t: -t, total)


class _AbstractNeumann(lx.AbstractLinearSolver):
    """$M^{-1} b \\approx -\\sum_{i<k} (I + M)^i b$, $k$ given by
    `number_of_terms`; matrix-free, never fails (an approximation by design)."""

    @abc.abstractmethod
    def number_of_terms(self) -> Any:
        """$k$: a static integer or a traced one."""

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        if operator.in_structure() != operator.out_structure():
            raise ValueError("Neumann needs a square operator (same input and output structure).")
        return operator

    def compute(self, state, vector, options):
        solution = _neumann_series(state, vector, self.number_of_terms())
        return solution, lx.RESULTS.successful, {}

    def transpose(self, state, options):
        return state.transpose(), options

    def conj(self, state, options):
        return lx.conj(state), options

    def assume_full_rank(self):
        return True


class Neumann(_AbstractNeumann):
    """Approximate $M^{-1} b$ by the $k$-term Neumann series
    $-\\sum_{i=0}^{k-1} (I + M)^i b$.

    Inside `Implicit(linear_solver=Neumann(k), condition="fixed_point")` the
    operator is $M = J_x F(x_k, \\theta) - I$, so the estimate is
    $\\sum_{i<k} J_x F(x_k, \\theta)^i J_\\theta F(x_k, \\theta)$: the piggyback
    recursion (2) with every Jacobian frozen at the last iterate — the inexact
    AD estimator (IAD) of the paper's §2.1. Its truncation error is
    $O(\\rho^k / (1 - \\rho))$ for a $\\rho$-contraction.

    Cost: $k$ operator products (JVPs, or VJPs in reverse mode); nothing is
    materialised. The series diverges unless $\\|I + M\\| < 1$, so use it with
    `condition="fixed_point"` and a contracting step map. The solve reports
    success whatever $k$: it is an approximation by design.

    **Arguments:**

    - `k`: the number of terms, a positive integer.
    """

    k: int = eqx.field(static=True)

    def __check_init__(self):
        positive_int(self.k, "Neumann(k=...)")

    def number_of_terms(self) -> int:
        return self.k


class NeumannTail(_AbstractNeumann):
    """`Neumann` with a number of terms known only at run time (a traced
    integer; 0 gives the zero solution). Internal: the tail of
    `Truncated("auto")` beyond its stored states."""

    terms: Array

    def number_of_terms(self) -> Any:
        return self.terms
