"""Gradients of one fixed set of problems, saved so that two versions of
itergrad can be compared (the solver-contract redesign's "gradients before
and after agree" check).

Each case is a solver on a small fixed instance and each estimator its
Jacobian of the solution w.r.t. theta (`jax.jacfwd`, or `jax.jacrev` for the
reverse-only `Unroll`). Only the API that both the pre-redesign commit
(59788e3) and today's main share is used.

    git worktree add /tmp/old 59788e3
    PYTHONPATH=/tmp/old/src python benchmarks/redesign_gradients.py --save /tmp/old.npz
    python benchmarks/redesign_gradients.py --save /tmp/new.npz --compare /tmp/old.npz

`--compare` prints, per solver and estimator, max |J_new - J_old| / max |J_old|.
"""

import argparse

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np

import itergrad as ig

jax.config.update("jax_enable_x64", True)


def estimators():
    return {
        "OneStep": (ig.OneStep(), jax.jacfwd),
        "Truncated(5)": (ig.Truncated(5), jax.jacfwd),
        "Implicit(optimality)": (ig.Implicit(), jax.jacfwd),
        "Implicit(fixed_point)": (ig.Implicit(condition="fixed_point"), jax.jacfwd),
        "Implicit(Neumann 60)": (
            ig.Implicit(linear_solver=ig.Neumann(60), condition="fixed_point"),
            jax.jacfwd,
        ),
        "Unroll(reverse)": (ig.Unroll(), jax.jacrev),
        "Unroll(forward)": (ig.Unroll("forward"), jax.jacfwd),
    }


def cases():
    key = jr.key(0)
    A = jr.normal(jr.fold_in(key, 1), (6, 3)) / 4.0

    def step_map(x, theta):
        return 0.5 * jnp.tanh(x) + A @ theta

    yield "step map", lambda est: (
        lambda th: ig.iterate(step_map, jnp.zeros(6), th, estimator=est,
                              max_steps=200).value
    ), jnp.array([0.1, -0.2, 0.3])

    ridge = ig.problems.ridge_data(jr.fold_in(key, 2), 40, 5, kappa=10.0,
                                   design_condition=100.0)
    w = jnp.ones(40)
    L, mu = (float(v) for v in ridge.smoothness(w))
    gd = ig.GradientDescent(ridge.objective, stepsize="1/L", L=L)
    hb = ig.HeavyBall(ridge.objective, stepsize=4 / (L**0.5 + mu**0.5) ** 2,
                      momentum=((L / mu) ** 0.5 - 1) ** 2 / ((L / mu) ** 0.5 + 1) ** 2)
    for name, solver in (("GradientDescent", gd), ("HeavyBall", hb)):
        yield name, (lambda s: lambda est: (
            lambda th: ig.solve(s, jnp.zeros(5), th, estimator=est,
                                max_steps=5000, rtol=1e-12, atol=1e-12).value
        ))(solver), w

    logistic = ig.problems.logistic_data(jr.fold_in(key, 3), 60, 6)
    dense = ig.Newton(logistic.objective)
    cg = ig.Newton(logistic.objective,
                   linear_solver=lx.CG(rtol=1e-12, atol=1e-12, max_steps=200))
    for name, solver in (("Newton dense", dense), ("Newton CG", cg)):
        yield name, (lambda s: lambda est: (
            lambda th: ig.solve(s, jnp.zeros(logistic.n), th, estimator=est,
                                rtol=1e-12, atol=1e-12).value
        ))(solver), jnp.ones(60)

    qp = ig.problems.random_qp(jr.fold_in(key, 4), 12, 3, 6)
    yield "InteriorPointQP (b)", lambda est: (
        lambda b: ig.solve(ig.InteriorPointQP(), None,
                           ig.problems.QP(qp.Q, qp.q, qp.A, b, qp.G, qp.h), estimator=est,
                           rtol=1e-12, atol=1e-12).value
    ), qp.b


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", required=True)
    parser.add_argument("--compare")
    args = parser.parse_args()
    out = {}
    for case, make, theta in cases():
        for name, (est, jac) in estimators().items():
            try:
                J = np.asarray(jax.jit(jac(make(est)))(theta))
            except Exception as e:  # noqa: BLE001  (recorded, not hidden)
                print(f"{case:22s} {name:22s} raised {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:90]}")
                continue
            out[f"{case}|{name}"] = J
    np.savez(args.save, **out)
    if args.compare:
        old = np.load(args.compare)
        print("| solver | estimator | max rel. difference |\n|---|---|---:|")
        for k, J in out.items():
            case, name = k.split("|")
            if k not in old:
                print(f"| {case} | {name} | (no old value) |")
                continue
            diff = np.max(np.abs(J - old[k])) / np.max(np.abs(old[k]))
            print(f"| {case} | {name} | {diff:.1e} |")


if __name__ == "__main__":
    main()
