"""Benchmark xcraft's TensorFlow NMF against scikit-learn's on activation-shaped matrices.

The matrix imitates pooled post-ReLU activations: a planted non-negative rank-r product with
sparse gamma-distributed factors, plus Gaussian noise (``--noise`` times the signal's std),
shifted down and clipped at zero (about 40 % of the entries are exact zeros; the best rank-r
relative error is about 0.2). Both libraries start from the same kind of init (``nndsvda``)
with the same ``tol`` and ``max_iter``; the relative errors ‖A − UW‖_F / ‖A‖_F are recomputed
here in float64 from the returned factors. Times are medians of ``--repeat`` fits, after one
untimed warm-up fit that traces the tf.functions.

Run from the repository root: ``python bench/nmf.py`` (defaults: n=20000, p=2048, r=25) or
``python bench/nmf.py -h``.
"""

import argparse
import time
import warnings

import numpy as np
from sklearn.decomposition import NMF as SklearnNMF
from sklearn.exceptions import ConvergenceWarning

from xcraft.ops.nmf import NMF

# Shape of the planted factors: each concept is present in ~30 % of the crops and touches ~20 %
# of the channels, with heavy-tailed (gamma 0.5) strengths, like pooled ReLU feature maps.
SAMPLE_DENSITY, CHANNEL_DENSITY, GAMMA_SHAPE = 0.3, 0.2, 0.5
SHIFT = 0.05  # downward shift before the ReLU, in units of the clean matrix's std


def make_activations(n, p, r, noise=0.3, seed=0):
    """Return a (n, p) float32 non-negative matrix with a planted rank-r structure.

    ``noise`` is the std of the Gaussian noise in units of the clean matrix's std.
    """
    rng = np.random.default_rng(seed)
    u = rng.gamma(GAMMA_SHAPE, size=(n, r)) * (rng.uniform(size=(n, r)) < SAMPLE_DENSITY)
    w = rng.gamma(GAMMA_SHAPE, size=(r, p)) * (rng.uniform(size=(r, p)) < CHANNEL_DENSITY)
    clean = u @ w  # (n, r) @ (r, p) = (n, p)
    scale = clean.std()
    noisy = clean + scale * (noise * rng.standard_normal(size=clean.shape) - SHIFT)
    return np.maximum(noisy, 0.0).astype(np.float32)


def relative_error(a, u, w):
    a64 = a.astype(np.float64)
    return float(np.linalg.norm(a64 - u.astype(np.float64) @ w.astype(np.float64))
                 / np.linalg.norm(a64))


def run(make_model, a, repeat):
    """Return (median wall s, median CPU s, relative error, n_iter) of ``repeat`` fits.

    CPU time (all threads of this process) is reported too because wall time on a shared
    machine depends on what else runs.
    """
    walls, cpus = [], []
    for _ in range(repeat):
        model = make_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            wall, cpu = time.perf_counter(), time.process_time()
            u = model.fit_transform(a)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    error = relative_error(a, u, model.components_)
    return float(np.median(walls)), float(np.median(cpus)), error, model.n_iter_


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="rows (crops)")
    parser.add_argument("--p", type=int, default=2048, help="columns (channels)")
    parser.add_argument("--r", type=int, default=25, help="rank (concepts)")
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--repeat", type=int, default=1, help="timed fits per line (median)")
    parser.add_argument("--noise", type=float, default=0.3, help="noise std / signal std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solvers", nargs="+", default=["hals", "mu"], choices=["hals", "mu"])
    args = parser.parse_args(argv)

    a = make_activations(args.n, args.p, args.r, args.noise, args.seed)
    print(f"A: {a.shape} float32, {np.mean(a == 0):.0%} zeros, rank {args.r}, "
          f"tol={args.tol}, max_iter={args.max_iter}, repeat={args.repeat}")
    common = dict(init="nndsvda", max_iter=args.max_iter, random_state=0)
    # Warm-up: trace (and XLA-compile) the tf.functions for this shape, so that no timed line
    # pays for it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for solver in args.solvers:
            NMF(args.r, solver=solver, init="nndsvda", max_iter=2).fit(a)

    # The two libraries stop on different quantities (scikit-learn's cd: the size of the
    # coordinate steps; ours: the relative decrease of the error), so ours is also run with a
    # hundredth of the tolerance, to compare at equal or lower error.
    print(f"{'solver':<9}{'ours tol':>9}{'clock':>6}{'ours s':>8}{'sklearn s':>10}{'ratio':>7}"
          f"{'ours err':>10}{'sk err':>9}{'ratio':>9}{'iters':>9}")
    for ours in args.solvers:
        theirs = {"hals": "cd", "mu": "mu"}[ours]
        wall_sk, cpu_sk, err_sk, n_iter_sk = run(
            lambda s=theirs: SklearnNMF(args.r, solver=s, tol=args.tol, **common), a, args.repeat
        )
        for tol in (args.tol, args.tol / 100):
            wall, cpu, err, n_iter = run(
                lambda s=ours, t=tol: NMF(args.r, solver=s, tol=t, **common), a, args.repeat
            )
            for clock, t, t_sk in (("wall", wall, wall_sk), ("cpu", cpu, cpu_sk)):
                print(f"{ours + '/' + theirs:<9}{tol:>9.0e}{clock:>6}{t:>8.2f}{t_sk:>10.2f}"
                      f"{t / t_sk:>7.2f}{err:>10.5f}{err_sk:>9.5f}{err / err_sk:>9.5f}"
                      f"{f'{n_iter}/{n_iter_sk}':>9}")


if __name__ == "__main__":
    main()
