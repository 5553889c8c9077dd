"""Implicit-function NNLS gradient vs backpropagation through an unrolled solver.

Gradient of sum_i U_i(x) (concept coefficients, NNLS of the feature maps against a concept bank,
averaged over locations) for a batch of images, three ways:

- "implicit": ``xcraft.ops.nnls.solve_nnls`` (FISTA + block-pivoting finish, exact to float
  precision) whose VJP solves one r x r system per location on its active set;
- "xplique": Xplique's own differentiable encoder (``TfSklearnNMFFactorizer.
  encode_differentiable``, what HolisticCraft uses: restarted FISTA, at most 200 iterations)
  given the same concept bank, with ``alpha_W=0`` so that it solves the same problem; only when
  xplique is importable (run the script with ``/tmp/xplique-venv/bin/python``);
- "unrolled": a lean FISTA of our own (fixed momentum schedule, no restart, no convergence test)
  run for 200 iterations (and more, ``--iterations``) and differentiated by autodiff through the
  loop: a faster unrolled baseline than Xplique's.

Each is measured for the NNLS part alone (gradient with respect to precomputed activations) and
end to end (gradient with respect to the images, through a small CNN). Each measurement runs in
its own subprocess with TF's BFC allocator on the CPU (``TF_CPU_ALLOCATOR_USE_BFC=true``), whose
statistics give "peak": the peak bytes allocated during one gradient call beyond those allocated
before it (the working memory of forward and backward; the median of 7 calls, since a call now
and then peaks higher when the executor happens to overlap temporaries), and "extra": that peak
minus the peak of a forward-only call, i.e. what differentiating adds (the tensors kept for the
backward pass and the backward's work space). (Resident set size is no use here: the allocator
keeps freed memory.) Times are the best of ``--repeats`` calls after a warm-up; "backward" is the
gradient call minus the forward-only call.

Accuracy is measured against an exact solution computed without xcraft: scipy's NNLS row by row,
polished on its active set, and the closed-form gradient on that set (``_exact_solution``): the
max-norm relative error of u, and the relative (l2) error of the gradient, the quantity being
benchmarked. The unrolled solver is run at 200 iterations (Xplique's setting) and at more
(``--iterations``), so that the comparison can be made at equal accuracy, for u and for the
gradient: at the fewest iterations whose u error meets ``--accuracy`` (a ladder of counts, then
every 10 iterations below the first rung that meets it, since FISTA's error is not monotone), and
those whose gradient error meets ``--grad-accuracy``. Differentiating the iterations converges
more slowly than the iterates: the unrolled gradient is still a few percent off when u is within
1e-3.

Run: ``python bench/implicit_grad.py`` (5-10 minutes on 2 cores; ``--quick`` for a smaller
problem, ``--threads 1`` for single-threaded timings that suffer less from other load).
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Iteration counts tried for the equal-accuracy comparison; below the first one that reaches the
# accuracy, every count is then tried by steps of _SCAN_STEP.
_LADDER = (200, 300, 500, 700, 1000, 1500, 2000, 3000, 5000)
_SCAN_STEP = 10
# Calls whose peak memory is measured (the median is reported).
_MEMORY_CALLS = 7


def _build_problem(n_images, size, n_concepts, seed=0):
    """A small CNN g (images -> (h, w, 256) ReLU features), images and a concept bank."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(256, 3, strides=2, padding="same", activation="relu")(x)
    g = keras.Model(inputs, x)
    images = rng.uniform(size=(n_images, size, size, 3)).astype("float32")
    activations = g(images).numpy()  # (n, h, w, 256)
    rows = activations.reshape(-1, activations.shape[-1])
    # Concepts are sums of a few observed activation vectors: non-negative and overlapping,
    # like NMF concepts of real activations.
    picks = rng.integers(0, len(rows), size=(n_concepts, 3))
    bank = rows[picks].sum(axis=1) + 1e-3
    return g, images, activations, bank.astype("float32")


def _unrolled_fista(a, bank, n_iter):
    """FISTA on every row of ``a`` (N, p), differentiable by autodiff through the loop."""
    import tensorflow as tf

    gram = tf.matmul(bank, bank, transpose_b=True)  # (r, r)
    step = 1.0 / tf.reduce_max(tf.linalg.eigvalsh(gram))
    b = tf.matmul(a, bank, transpose_b=True)  # (N, r)

    def body(i, u, y, t):
        u_new = tf.nn.relu(y - step * (tf.matmul(y, gram) - b))
        t_new = 0.5 * (1.0 + tf.sqrt(1.0 + 4.0 * t * t))
        y_new = u_new + ((t - 1.0) / t_new) * (u_new - u)
        return i + 1, u_new, y_new, t_new

    u0 = tf.zeros_like(b)
    _, u, _, _ = tf.while_loop(lambda i, *_: i < n_iter, body,
                               (tf.constant(0), u0, u0, tf.constant(1.0)),
                               maximum_iterations=n_iter)
    return u


def _xplique_encoder(bank, n_iter):
    """Xplique's differentiable NNLS (HolisticCraft's encoder), with ``bank`` as its concepts.

    HolisticCraft's own factorizer adds an L2 penalty (``alpha_W=1e-2``), i.e. it solves another
    problem; here it gets ``alpha_W=0`` so that both sides solve the same NNLS, and its other
    defaults (restarted FISTA from a diagonal-scaled start, ``tol=1e-4`` on the relative change,
    at most ``n_iter`` iterations).
    """
    from xplique.concepts.tf.factorizer import TfSklearnNMFFactorizer

    encoder = TfSklearnNMFFactorizer(n_components=int(bank.shape[0]), alpha_W=0.0,
                                     max_iter=n_iter)
    encoder._concept_bank_w = bank.numpy()  # no public setter: the fitted bank is this field
    return encoder


def _concept_sum(activations, bank, solver, n_iter):
    """sum over images and concepts of U(x) = mean over locations of NNLS(A(x)_l, W)."""
    import tensorflow as tf

    from xcraft.ops.nnls import solve_nnls

    rows = tf.reshape(activations, (-1, activations.shape[-1]))  # (N, p)
    if solver == "implicit":
        u = solve_nnls(rows, bank)
    elif solver == "xplique":
        u = _xplique_encoder(bank, n_iter).encode_differentiable(rows)
    else:
        u = _unrolled_fista(rows, bank, n_iter)
    u = tf.reshape(u, (activations.shape[0], -1, bank.shape[0]))  # (n, L, r)
    return tf.reduce_sum(tf.reduce_mean(u, axis=1)), u


def _exact_solution(activations, bank):
    """u* and the exact gradient of the concept sum with respect to the activations, in float64.

    Independent of xcraft: u* comes from ``scipy.optimize.nnls`` row by row, then is polished on
    its support S (u_S = b_S G_SS^{-1}, b = a W^T, G = W W^T). The gradient of
    sum_i mean_l u_i(a_l) with respect to a row a_l is (1/L 1_S) G_SS^{-1} W_S, wherever the
    active set is locally constant (strict complementarity, which holds for these random rows).
    Returns u* (N, r) and the gradient with the shape of ``activations``.
    """
    import numpy as np
    from scipy.optimize import nnls

    bank = np.asarray(bank, np.float64)
    rows = activations.reshape(-1, activations.shape[-1]).astype(np.float64)
    n_locations = rows.shape[0] // activations.shape[0]
    gram = bank @ bank.T
    u = np.zeros((rows.shape[0], bank.shape[0]))
    gradient = np.zeros_like(rows)
    for i, row in enumerate(rows):
        support = nnls(bank.T, row)[0] > 0
        if not support.any():
            continue
        inverse = np.linalg.inv(gram[np.ix_(support, support)])
        u[i, support] = (bank[support] @ row) @ inverse
        gradient[i] = (np.full(support.sum(), 1.0 / n_locations) @ inverse) @ bank[support]
    return u, gradient.reshape(activations.shape)


def _relative_error(value, exact, norm="max"):
    """max |value - exact| / max |exact| (``norm="max"``) or ||value - exact|| / ||exact||."""
    import numpy as np

    difference = np.asarray(value, np.float64).reshape(exact.shape) - exact
    if norm == "max":
        return float(np.max(np.abs(difference)) / np.max(np.abs(exact)))
    return float(np.linalg.norm(difference) / np.linalg.norm(exact))


def _run_errors(n_images, size, n_concepts, ladder, accuracy, grad_accuracy):
    """Accuracy of the unrolled solvers after each iteration count of ``ladder`` (prints JSON).

    {solver: {"u": {count: error}, "grad": {count: error}}} for "unrolled" and, where it imports,
    "xplique": the max-norm relative error of u and the relative (l2) error of the gradient of
    the concept sum with respect to the activations, both against :func:`_exact_solution`.
    Xplique's encoder may stop before ``count`` (its own tol on the relative change). FISTA's
    error is not monotone in the iteration count, so for the lean solver every count from the
    first rung to the first rung whose u meets ``accuracy`` is tried, by steps of
    ``_SCAN_STEP``: the equal-accuracy line then uses the fewest iterations that meet it (the
    count most favourable to the unrolled solver), not the next rung. Gradients are dearer to
    scan: for ``grad_accuracy`` only the counts between the first rung that meets it and the
    rung before are tried.
    """
    import tensorflow as tf

    _, _, activations, bank = _build_problem(n_images, size, n_concepts)
    exact_u, exact_grad = _exact_solution(activations, bank)
    features = tf.constant(activations)
    bank_t = tf.constant(bank)

    def lean(n):
        with tf.GradientTape() as tape:
            tape.watch(features)
            total, u = _concept_sum(features, bank_t, "unrolled", n)
        return u, tape.gradient(total, features)

    solvers = {"unrolled": tf.function(lambda n: lean(n))}
    try:
        import xplique.concepts.tf.factorizer  # noqa: F401

        def xplique_solver(n):
            # One graph per count: Xplique's loop bound is a Python int.
            with tf.GradientTape() as tape:
                tape.watch(features)
                total, u = _concept_sum(features, bank_t, "xplique", int(n))
            return u, tape.gradient(total, features)

        solvers["xplique"] = xplique_solver
    except ImportError:
        pass

    def measure(name, n):
        u, gradient = solvers[name](tf.constant(n))
        return (_relative_error(u.numpy(), exact_u),
                _relative_error(gradient.numpy(), exact_grad, norm="l2"))

    errors = {}
    for name in solvers:
        results = {n: measure(name, n) for n in ladder}
        errors[name] = {"u": {n: e[0] for n, e in results.items()},
                        "grad": {n: e[1] for n, e in results.items()}}
    lean_errors = errors["unrolled"]

    def scan(counts):
        for n in counts:
            if n not in lean_errors["u"]:
                lean_errors["u"][n], lean_errors["grad"][n] = measure("unrolled", n)

    first = min((n for n in ladder if lean_errors["u"][n] <= accuracy), default=None)
    if first is not None:
        scan(range(ladder[0] + _SCAN_STEP, first, _SCAN_STEP))
    first = min((n for n in ladder if lean_errors["grad"][n] <= grad_accuracy), default=None)
    if first is not None and first != ladder[0]:
        below = ladder[ladder.index(first) - 1]
        scan(range(below + _SCAN_STEP, first, _SCAN_STEP))
    print(json.dumps(errors))


def _run_case(case, n_images, size, n_concepts, repeats):
    """Time and memory of one case; runs in a subprocess and prints JSON."""
    import numpy as np
    import tensorflow as tf

    part, solver = case.split("/")
    n_iter = int(solver.split("-")[1]) if solver.startswith(("unrolled", "xplique")) else 0
    solver = solver.split("-")[0]
    g, images, activations, bank = _build_problem(n_images, size, n_concepts)
    bank = tf.constant(bank)

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            features = g(x) if part == "full" else x
            total, u = _concept_sum(features, bank, solver, n_iter)
        return tape.gradient(total, x), u

    @tf.function
    def forward(x):
        features = g(x) if part == "full" else x
        return _concept_sum(features, bank, solver, n_iter)[1]

    x = tf.constant(images if part == "full" else activations)
    grad, u = gradient(x)  # trace and warm up
    forward(x)

    def peak_bytes(call):
        """Peak bytes TF's (BFC) CPU allocator holds during ``call()`` beyond those before it."""
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        call()
        return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before

    # The working memory of forward + backward (tape included), and of a forward-only call: the
    # difference is what differentiating costs (tensors kept for the backward pass and the
    # backward's own work space). The median over several calls: which temporaries are alive
    # at once depends on how the executor happens to schedule independent ops, and a call now
    # and then peaks higher than the others.
    memory = float(np.median([peak_bytes(lambda: gradient(x)[0].numpy())
                              for _ in range(_MEMORY_CALLS)]))
    forward_memory = float(np.median([peak_bytes(lambda: forward(x).numpy())
                                      for _ in range(_MEMORY_CALLS)]))
    grad, u = gradient(x)

    wall, cpu, forward_wall = [], [], []
    for _ in range(repeats):  # interleaved, so that load from other processes hits both alike
        w0, c0 = time.perf_counter(), time.process_time()
        gradient(x)[0].numpy()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        w0 = time.perf_counter()
        forward(x).numpy()
        forward_wall.append(time.perf_counter() - w0)

    exact_u, exact_grad = _exact_solution(activations, bank.numpy())
    if part == "full":
        # The exact gradient with respect to the images: g's VJP of the exact one with respect
        # to its features.
        with tf.GradientTape() as tape:
            tape.watch(x)
            inner = tf.reduce_sum(g(x) * tf.constant(exact_grad, tf.float32))
        exact_grad = tape.gradient(inner, x).numpy().astype(np.float64)
    print(json.dumps({
        "case": case, "wall": min(wall), "cpu": min(cpu), "forward_wall": min(forward_wall),
        "memory": memory, "extra": memory - forward_memory,
        "u_error": _relative_error(u.numpy(), exact_u),
        "grad_error": _relative_error(grad.numpy(), exact_grad, norm="l2"),
        "n_rows": int(np.prod(activations.shape[:-1])),
        "activation_shape": list(activations.shape),
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--concepts", type=int, default=25)
    parser.add_argument("--iterations", type=int, nargs="+", default=[200, 2000],
                        help="unrolled FISTA iteration counts to compare with")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="TF intra-op threads (0: all)")
    parser.add_argument("--accuracy", type=float, default=1e-3,
                        help="also time the unrolled solver at the fewest iterations (a "
                             "ladder up to 5000, then every 10 below the first rung that meets "
                             "it) whose u error is at most this (default: 1e-3, the float32 "
                             "tolerance of solve_nnls' values); 0: skip")
    parser.add_argument("--grad-accuracy", type=float, default=1e-2,
                        help="the same for the relative (l2) error of the gradient (default: "
                             "1e-2; unrolled FISTA does not reach 1e-3 by 5000 iterations here)")
    parser.add_argument("--quick", action="store_true", help="16 images of 32x32, 3 repeats")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.images, args.size, args.repeats = 16, 32, 3
    if args.case:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        if args.case == "errors":
            _run_errors(args.images, args.size, args.concepts, _LADDER, args.accuracy,
                        args.grad_accuracy)
        else:
            _run_case(args.case, args.images, args.size, args.concepts, args.repeats)
        return

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="2")
    def run(case):
        command = [sys.executable, os.path.abspath(__file__), "--case", case,
                   "--images", str(args.images), "--size", str(args.size),
                   "--concepts", str(args.concepts), "--repeats", str(args.repeats),
                   "--threads", str(args.threads), "--accuracy", str(args.accuracy),
                   "--grad-accuracy", str(args.grad_accuracy)]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return json.loads(output.stdout.strip().splitlines()[-1])

    iterations = sorted(set(args.iterations))
    try:
        import xplique.concepts.tf.factorizer  # noqa: F401

        xplique_iterations = [200]
    except ImportError:
        xplique_iterations = []
        print("xplique is not importable here: no 'xplique-*' lines (see bench/README.md)")
    # (solver, quantity) -> fewest iterations reaching the accuracy on that quantity
    matched = {}
    thresholds = {"u": args.accuracy, "grad": args.grad_accuracy}
    labels = {"u": "u rel. error", "grad": "gradient rel. (l2) error"}
    if args.accuracy > 0:
        for name, by_quantity in run("errors").items():
            for quantity, errors in by_quantity.items():
                errors = {int(n): e for n, e in errors.items()}
                label, threshold = labels[quantity], thresholds[quantity]
                print(f"{name}, {label} by iterations: "
                      + ", ".join(f"{n}: {e:.1e}" for n, e in sorted(errors.items())
                                  if n in _LADDER))
                count = min((n for n, e in errors.items() if e <= threshold), default=None)
                if count is None:
                    print(f"{name}: no iteration count up to {max(errors)} reaches {label} <= "
                          f"{threshold:g}")
                    continue
                if count not in _LADDER:
                    print(f"{name}: fewest iterations reaching {label} <= {threshold:g} "
                          f"(scanned by {_SCAN_STEP}): {count} ({errors[count]:.1e})")
                matched[name, quantity] = count
                if name == "unrolled":
                    iterations = sorted(set(iterations) | {count})
                else:
                    xplique_iterations = sorted(set(xplique_iterations) | {count})
    unrolled = ([f"xplique-{n}" for n in xplique_iterations]
                + [f"unrolled-{n}" for n in iterations])
    cases = [f"{part}/{solver}" for part in ("nnls", "full") for solver in ["implicit", *unrolled]]
    results = {case: run(case) for case in cases}

    first = results["nnls/implicit"]
    print(f"{args.images} images {args.size}x{args.size}, activations "
          f"{tuple(first['activation_shape'])} -> {first['n_rows']} NNLS rows, "
          f"r = {args.concepts}")
    print(f"{'case':20s} {'grad wall s':>11s} {'grad cpu s':>10s} {'fwd wall s':>10s} "
          f"{'bwd wall s':>10s} {'peak MB':>8s} {'extra MB':>8s} {'u rel. error':>12s} "
          f"{'grad rel. err':>13s}")
    for case in cases:
        r = results[case]
        print(f"{case:20s} {r['wall']:11.3f} {r['cpu']:10.3f} {r['forward_wall']:10.3f} "
              f"{r['wall'] - r['forward_wall']:10.3f} {r['memory'] / 2**20:8.1f} "
              f"{r['extra'] / 2**20:8.1f} {r['u_error']:12.2e} {r['grad_error']:13.2e}")
    for part in ("nnls", "full"):
        ours = results[f"{part}/implicit"]
        for solver in unrolled:
            theirs = results[f"{part}/{solver}"]
            backward = (theirs["wall"] - theirs["forward_wall"]) / max(
                ours["wall"] - ours["forward_wall"], 1e-9)
            print(f"{part}: {solver} / implicit: gradient time {theirs['wall'] / ours['wall']:.1f}x"
                  f" (cpu {theirs['cpu'] / ours['cpu']:.1f}x, backward alone {backward:.1f}x), "
                  f"peak memory {theirs['memory'] / max(ours['memory'], 1):.1f}x, "
                  f"extra memory for the gradient {theirs['extra'] / 2**20:.1f} MB vs "
                  f"{ours['extra'] / 2**20:.1f} MB")
    for (name, quantity), count in matched.items():
        ours, theirs = results["nnls/implicit"], results[f"nnls/{name}-{count}"]
        label, threshold = labels[quantity], thresholds[quantity]
        key = "u_error" if quantity == "u" else "grad_error"
        print(f"equal accuracy ({label} <= {threshold:g}): {name} needs {count} iterations; "
              f"NNLS gradient time {theirs['wall'] / ours['wall']:.1f}x, peak memory "
              f"{theirs['memory'] / max(ours['memory'], 1):.1f}x those of the implicit one "
              f"(target >= 5x and >= 10x); at that count its {label} is "
              f"{theirs[key]:.1e} (u {theirs['u_error']:.1e}, gradient "
              f"{theirs['grad_error']:.1e}), ours {ours['u_error']:.1e} and "
              f"{ours['grad_error']:.1e}")


if __name__ == "__main__":
    main()
