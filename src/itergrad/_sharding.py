"""A batch of problems sharded over devices: `sharded_vmap`.

Nothing here schedules anything: each device runs, through `jax.shard_map`,
the program that `jax.vmap(fn)` traces to for one shard, so each device's
batched `while_loop` runs to its own shard's convergence with no collective
inside. See `docs/batches-and-devices.md` for the recipe and for why a plain
`jax.jit` over a sharded batch is not the way to do it.

Why the per-shard program is traced *outside* the `shard_map` (and replayed
inside it with `jax.core.eval_jaxpr`), with its own reverse-mode rule: with
jax 0.10 (seen with 0.10.2), arrays traced inside a `shard_map` carry the manual mesh in their
type, so `jax.eval_shape` there returns `ShapeDtypeStruct`s with a sharding,
while the outputs of Lineax's and Equinox's own primitives, and the
`ShapeDtypeStruct`s solvers build, carry none. Lineax and Equinox compare such
structures for equality (symmetric operators, closure conversion,
`ravel_vector`), so a solve traced or differentiated inside `shard_map` fails
(lineax issue #185). Traced outside any mesh, the per-shard program is exactly
the unsharded one, bit for bit; its derivative is taken the same way
(`jax.vjp` of the per-shard `jax.vmap(fn)`, outside the mesh), then run on the
shards with its residuals left on their devices, so that no rule of Lineax,
Equinox or itergrad ever runs inside the manual mesh either.
"""

import functools as ft
import importlib.metadata
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax import core as _core
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh, PartitionSpec

try:  # jax >= 0.6: `jax.shard_map`, whose replication check is `check_vma`
    from jax import shard_map as _jax_shard_map

    def _shard_map(f, mesh, in_specs, out_specs):
        return _jax_shard_map(
            f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

except ImportError:  # pragma: no cover  (older jax, down to pyproject's 0.4.30)
    from jax.experimental.shard_map import shard_map as _old_shard_map

    def _shard_map(f, mesh, in_specs, out_specs):
        return _old_shard_map(
            f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False
        )


def sharded_vmap(
    fn: Callable[..., Any],
    mesh: Mesh | None = None,
    *,
    axis_name: str | Sequence[str] | None = None,
    in_axes: Any = 0,
) -> Callable[..., Any]:
    """`jax.vmap(fn)` with the batch split over the devices of `mesh`: each
    device solves its own shard, to that shard's own convergence.

    `jax.vmap` of a solve is one `while_loop` that runs until *every* instance
    has converged. Under a plain `jax.jit` with the batch sharded over
    devices, XLA keeps that meaning: every iteration of every loop all-reduces
    "is any instance still running?" across the devices, so they iterate in
    lock-step until the slowest instance of the whole batch is done.
    `sharded_vmap` runs instead, on each device through `jax.shard_map`, the
    program of `jax.vmap(fn)` on that device's shard: one loop per device, no
    collective anywhere in the solve, and the numbers of the unsharded
    `jax.vmap(fn)` (an instance's iterates and steps do not depend on the
    other instances).

    **Arguments:**

    - `fn`: the function of *one* instance, e.g.
      `lambda qp: ig.solve(ig.InteriorPointQP(), None, qp).value`. It may return
      any pytree (a whole `Solution`); every output gets a leading batch axis.
    - `mesh`: a `jax.sharding.Mesh`; default: a one-axis mesh (`"batch"`) over
      all of `jax.devices()`.
    - `axis_name`: the mesh axis (or axes) the batch is split over; default:
      every axis of `mesh`.
    - `in_axes`: as `jax.vmap`'s, but each entry is `0` (a leading batch axis,
      split over the devices) or `None` (the same for every instance,
      replicated on every device); a tuple with one entry per positional
      argument, or one entry for all. Default: every argument batched.

    **Returns:** a function of the batched arguments (pytrees of arrays; close
    over anything else), whose outputs are `fn`'s stacked on a leading axis
    and sharded over `axis_name`. It is compiled as one program (`jax.jit`);
    inside a user's `jax.jit` it is inlined.

    **Derivatives:** reverse mode (`jax.grad`, `jax.vjp`, `jax.jacrev`)
    goes through it with any estimator: each shard's `jax.vmap(fn)` is
    differentiated exactly as the unsharded one is, and its residuals stay on
    their devices. Derivatives are taken with respect to the *arguments*:
    pass what you differentiate as an argument (`in_axes=None` for one shared
    by the whole batch, whose gradient is summed over the devices once, at
    the end), not as an array `fn` closes over (JAX then raises "Detected
    differentiation of a custom_vjp function with respect to a closed-over
    value"). Forward mode (`jax.jvp`, `jax.jacfwd`) does not go through it:
    take it inside `fn`, e.g. `sharded_vmap(lambda t: jax.jvp(f, (t,), (v,)))`.

    A batch whose size is not a multiple of the number of shards is padded
    with copies of its last instance, whose results are dropped.

    **Example** (runs as written on one device too):

    ```python
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    from jax.sharding import Mesh
    import itergrad as ig

    jax.config.update("jax_enable_x64", True)
    mesh = Mesh(jax.devices()[:4], ("batch",))  # up to 4 devices
    qps = jax.vmap(lambda k: ig.problems.random_qp(k, n=20, m=5, p=10))(
        jr.split(jr.key(0), 8)
    )

    def loss(qp):  # one instance
        return 0.5 * jnp.sum(ig.solve(ig.InteriorPointQP(), None, qp).value ** 2)

    losses = jax.jit(ig.sharded_vmap(loss, mesh))(qps)
    total = lambda q: ig.sharded_vmap(loss, mesh)(q).sum()
    grads = eqx.filter_jit(eqx.filter_grad(total))(qps)
    ```

    On a CPU, several host devices come from
    `XLA_FLAGS="--xla_force_host_platform_device_count=16"`, set before `jax`
    is imported. With jaxlib 0.10.x, create several times as many host
    devices as the mesh uses (16 for the mesh of 4 above): jaxlib's batched
    LAPACK kernels wait on XLA's CPU thread pool, which has max(cores, host
    devices) threads, and deadlock when every thread of the pool waits
    (`sharded_vmap` warns when fewer than twice the mesh's devices are
    spare; `docs/batches-and-devices.md`).
    """
    if not callable(fn):
        raise TypeError(
            f"sharded_vmap: `fn` must be callable, got {type(fn).__name__}."
        )
    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    elif not isinstance(mesh, Mesh):
        raise TypeError(
            "sharded_vmap: `mesh` must be a jax.sharding.Mesh, e.g. "
            f"`Mesh(jax.devices(), ('batch',))`, got {type(mesh).__name__}."
        )
    if axis_name is None:
        axes = tuple(mesh.axis_names)
    elif isinstance(axis_name, str):
        axes = (axis_name,)
    else:
        axes = tuple(axis_name)
    for name in axes:
        if name not in mesh.axis_names:
            raise ValueError(
                f"sharded_vmap: `axis_name` {name!r} is not an axis of the mesh "
                f"(its axes: {tuple(mesh.axis_names)})."
            )
    shards = int(np.prod([mesh.shape[name] for name in axes]))
    _warn_if_pool_can_deadlock(mesh)
    batch_spec = PartitionSpec(axes[0] if len(axes) == 1 else axes)

    def batched(*args):
        axes_tree = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        if len(axes_tree) != len(args):
            raise ValueError(
                f"sharded_vmap: `in_axes` has {len(axes_tree)} entries for "
                f"{len(args)} positional arguments."
            )
        leaves, in_tree = jtu.tree_flatten(args)
        leaf_axes = []
        for axis, arg in zip(axes_tree, args):
            if axis not in (0, None):
                raise ValueError(
                    "sharded_vmap: each entry of `in_axes` must be 0 (batched on "
                    f"the leading axis) or None (shared by every instance), got "
                    f"{axis!r}; move the batch axis first (jnp.moveaxis)."
                )
            leaf_axes += [axis] * len(jtu.tree_leaves(arg))
        leaves = [jnp.asarray(leaf) for leaf in leaves]
        if any(a == 0 and leaf.ndim == 0 for leaf, a in zip(leaves, leaf_axes)):
            raise ValueError(
                "sharded_vmap: an argument batched with `in_axes=0` has a scalar "
                "leaf (no batch axis); give it `in_axes=None` or close over it."
            )
        sizes = {leaf.shape[0] for leaf, a in zip(leaves, leaf_axes) if a == 0}
        if len(sizes) != 1:
            raise ValueError(
                "sharded_vmap: the batched arguments (`in_axes=0`) must share one "
                f"leading batch size, got {sorted(sizes) or 'no batched argument'}."
            )
        (size,) = sizes
        pad = (-size) % shards
        if pad:
            leaves = [
                jnp.concatenate([leaf, jnp.repeat(leaf[-1:], pad, axis=0)])
                if a == 0
                else leaf
                for leaf, a in zip(leaves, leaf_axes)
            ]
        local = [
            jax.ShapeDtypeStruct(
                (leaf.shape[0] // shards,) + leaf.shape[1:] if a == 0 else leaf.shape,
                leaf.dtype,
            )
            for leaf, a in zip(leaves, leaf_axes)
        ]

        def per_shard(*local_leaves):
            return jax.vmap(fn, in_axes=axes_tree)(
                *jtu.tree_unflatten(in_tree, local_leaves)
            )

        out_shape = jax.eval_shape(per_shard, *local)
        program = _Program(
            per_shard, jtu.tree_leaves(out_shape), mesh, axes, batch_spec
        )
        out = cast(list, _run(program, tuple(a == 0 for a in leaf_axes), *leaves))
        if pad:
            out = [leaf[:size] for leaf in out]
        return jtu.tree_unflatten(jtu.tree_structure(out_shape), out)

    return jax.jit(batched)


def _warn_if_pool_can_deadlock(mesh: Mesh) -> None:
    """Warn where jaxlib 0.10's batched LAPACK kernels can deadlock XLA's CPU
    thread pool (docs/batches-and-devices.md): the pool has max(cores, host
    devices) threads, each busy device holds one, and a batched
    factorisation blocks its thread until tasks queued on the same pool are
    done. With no thread to spare, every device can end up waiting."""
    devices = list(np.asarray(mesh.devices).flat)
    if devices[0].platform != "cpu" or len(devices) < 2:
        return
    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return
    version = tuple(int(v) for v in jaxlib_version.split(".")[:3] if v.isdigit())
    # The parallel batch path appears in jaxlib 0.10.0 and is reported to be
    # compiled out of open-source builds from 0.11.1 on.
    if not (0, 10, 0) <= version < (0, 11, 1):
        return
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (not Linux)
        cores = os.cpu_count() or 1
    pool = max(cores, len(jax.devices("cpu")))
    # One device's program can have two factorisations in flight (XLA runs
    # independent operations concurrently): keep twice the mesh in reserve.
    if 2 * len(devices) >= pool:
        warnings.warn(
            f"sharded_vmap: the mesh uses {len(devices)} CPU devices and XLA's "
            f"CPU thread pool has {pool} threads (max(cores, host devices)). "
            f"With jaxlib {jaxlib_version}, batched LAPACK calls (the "
            "factorisations of vmapped Newton and QP steps) wait on that pool "
            "and can deadlock when every thread does so at once. Create several "
            "times as many host devices as the mesh uses, e.g. XLA_FLAGS="
            f"--xla_force_host_platform_device_count={4 * len(devices)} and "
            f"Mesh(jax.devices()[:{len(devices)}], ...); see "
            "docs/batches-and-devices.md.",
            RuntimeWarning,
            stacklevel=3,
        )


class _Program:
    """The per-shard program `fn` (`jax.vmap` of the user's function), with
    the mesh it runs on."""

    def __init__(self, fn, local_outs, mesh, axes, batch_spec):
        self.fn, self.local_outs = fn, local_outs  # per-shard outputs
        self.mesh, self.axes, self.batch_spec = mesh, axes, batch_spec
        self.shards = int(np.prod([mesh.shape[name] for name in axes]))

    def local(self, x, sharded):
        """The per-shard shape of a global operand."""
        shape = (x.shape[0] // self.shards,) + x.shape[1:] if sharded else x.shape
        return jax.ShapeDtypeStruct(shape, x.dtype)

    def on_shards(self, fn, operands, sharded, reduce=()):
        """Trace `fn` on per-shard shapes here, outside any mesh, and run the
        traced program on every shard through `shard_map`: operands with
        `sharded` split over the batch axes, the others replicated; every
        output split over the batch axes, except the indices in `reduce`,
        summed over the shards."""
        structs = [self.local(x, s) for x, s in zip(operands, sharded)]
        closed = jax.make_jaxpr(fn)(*structs)
        n_out = len(closed.out_avals)

        def body(*xs):
            outs = _core.eval_jaxpr(closed.jaxpr, closed.consts, *xs)
            return [
                jax.lax.psum(o, self.axes) if i in reduce else o
                for i, o in enumerate(outs)
            ]

        specs = tuple(self.batch_spec if s else PartitionSpec() for s in sharded)
        out_specs = [
            PartitionSpec() if i in reduce else self.batch_spec for i in range(n_out)
        ]
        return _shard_map(body, self.mesh, specs, out_specs)(*operands)


def _inexact(x) -> bool:
    return bool(jnp.issubdtype(x.dtype, jnp.inexact))


@ft.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _run(program: _Program, sharded: tuple[bool, ...], *operands):
    """`program` on every shard; differentiable in reverse mode with the
    per-shard program differentiated outside the manual mesh (module
    docstring)."""
    return program.on_shards(
        lambda *xs: jtu.tree_leaves(program.fn(*xs)), operands, sharded
    )


def _run_fwd(program, sharded, *primals):
    # `symbolic_zeros=True`: each primal says whether it is differentiated, so
    # that the backward pass computes only the cotangents that are used.
    operands = [p.value for p in primals]
    wanted = [i for i, p in enumerate(primals) if p.perturbed and _inexact(p.value)]

    def forward(*xs):
        def of_wanted(*ws):
            ys = list(xs)
            for i, w in zip(wanted, ws):
                ys[i] = w
            return jtu.tree_leaves(program.fn(*ys))

        out, vjp = jax.vjp(of_wanted, *[xs[i] for i in wanted])
        residuals, program.vjp_tree = jtu.tree_flatten(vjp)
        # A leading axis of one per shard: residuals of any shape leave
        # `shard_map` and come back into it, each to its own device.
        return list(out) + [r[None] for r in residuals]

    flat = program.on_shards(forward, operands, sharded)
    n_out = len(flat) - program.vjp_tree.num_leaves
    program.wanted = wanted
    return flat[:n_out], flat[n_out:]


def _run_bwd(program, sharded, residuals, cotangents):
    n_res = len(residuals)
    # Only nonzero cotangents of floating outputs travel; the others (integer
    # outputs such as steps and result codes, unused outputs) are made here.
    live = [
        _inexact(o) and not isinstance(ct, SymbolicZero)
        for o, ct in zip(program.local_outs, cotangents)
    ]
    cts = [ct for ct, keep in zip(cotangents, live) if keep]

    def backward(*xs):
        vjp = jtu.tree_unflatten(program.vjp_tree, [r[0] for r in xs[:n_res]])
        given = iter(xs[n_res:])
        full = [
            next(given)
            if keep
            else jnp.zeros(o.shape, o.dtype)
            if _inexact(o)
            else np.zeros(o.shape, jax.dtypes.float0)
            for o, keep in zip(program.local_outs, live)
        ]
        return list(vjp(full))

    # Arguments shared by the shards (`in_axes=None`): their cotangent is the
    # sum of every shard's, one psum at the very end.
    shared = {j for j, i in enumerate(program.wanted) if not sharded[i]}
    grads = program.on_shards(
        backward, list(residuals) + cts, [True] * (n_res + len(cts)), reduce=shared
    )
    out: list = [None] * len(sharded)
    for i, g in zip(program.wanted, grads):
        out[i] = g
    return tuple(out)


_run.defvjp(_run_fwd, _run_bwd, symbolic_zeros=True)
