"""Benchmark the coupled NMF: our HALS against the paper's MU, and memory with streaming vs not.

The blocks are those of the embedded Fashion-MNIST CNN on its 2 000 embedded test images: the
pixels (784 columns) and the layers ``pool1`` (14×14×32 = 6 272) and ``pool2`` (7×7×64 = 3 136),
channel-major, not pooled, with the default Frobenius block weights (α_b = 1 / ‖X_b‖², so the
objective J = ½ Σ_b e_b², e_b the blocks' relative errors).

1. **HALS vs MU.** Both start from the same NNDSVDa start of the weighted stack.

   - *default fits*: ``CoupledNMF(d, solver=...)`` as a user gets it (tol 1e-4, at most 200
     sweeps): sweeps, wall and CPU time, J and every block's relative error;
   - *time to the same objective*: each solver runs ``--hals-sweeps`` / ``--mu-sweeps`` sweeps
     without a stopping rule; J* is the lowest J either reached, and for each target
     J*·(1 + gap) the table gives the first sweep at which each solver is at or below it and the
     time of a fit of exactly that many sweeps from the same start, timed again (the start's
     own time, the same for both, is given apart).

2. **Memory.** The blocks are repeated ``--repeat`` times (20 000 examples by default, 778 MiB
   of float32) and each configuration runs ``--memory-sweeps`` sweeps in a fresh interpreter,
   whose anonymous resident memory (RssAnon: what the process allocated, not the pages of
   mapped files) is sampled every 5 ms. ``baseline`` is RssAnon just before the fit (TensorFlow
   loaded, the blocks in RAM when they are read into it, a small fit run to load the kernels);
   ``added`` is the fit's peak minus it. Configurations: ``CoupledNMF.fit`` in memory and
   streamed (``batch_size``), from arrays in RAM or from ``np.load(mmap_mode="r")``, and the
   solver alone (:func:`xcraft.ops.coupled.initialize_coupled` and
   :func:`~xcraft.ops.coupled.fit_coupled`) on the memory-mapped blocks, in memory and streamed.

Every TensorFlow step runs in a child interpreter, one at a time; the parent only prints.
Run from the repository root: ``python bench/coupled.py`` (about 10 minutes on 2 cores) or
``python bench/coupled.py --quick``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the xcraft checkout

import numpy as np  # noqa: E402

LAYERS = ("pool1", "pool2")  # the demo's DEMO_EARLY_LAYER and DEMO_LAYER
GAPS = (1e-2, 1e-3, 1e-4)
SAMPLE_SECONDS = 0.005
MEMORY_MODES = (
    ("estimator", "ram", False),
    ("estimator", "ram", True),
    ("estimator", "mmap", True),
    ("ops", "mmap", False),
    ("ops", "mmap", True),
)


def _anon_mib():
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024.0
    raise OSError("no RssAnon in /proc/self/status (Linux only)")


class _PeakAnon:
    """The highest RssAnon seen while the block runs (the process's all-time peak would also
    count the set-up before it)."""

    def __enter__(self):
        self.peak = _anon_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak, _anon_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_mib())
        return False


def _timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------


def _child_build(folder, n_images, repeat):
    """Write the demo blocks (and their ``repeat``-fold copies) as .npy files in ``folder``."""
    from xcraft.coupled import build_blocks
    from xcraft.datasets import load_demo_data, load_demo_model

    images, _, _ = load_demo_data()
    keep = np.linspace(0, len(images) - 1, n_images).round().astype(int)  # every class
    blocks, seconds, _ = _timed(lambda: build_blocks(load_demo_model(), list(LAYERS),
                                                     images[keep]))
    names = list(blocks)
    for b, name in enumerate(names):
        np.save(folder / f"{b}.npy", blocks[name])
        big = np.lib.format.open_memmap(folder / f"{b}_big.npy", mode="w+", dtype=np.float32,
                                        shape=(n_images * repeat, blocks[name].shape[1]))
        for r in range(repeat):  # copy by copy: the repeated block never sits in RAM
            big[r * n_images:(r + 1) * n_images] = blocks[name]
        big.flush()
        del big
    return {"names": names, "columns": [int(blocks[n].shape[1]) for n in names],
            "n_images": n_images, "seconds": seconds}


def _load(folder, names, suffix="", mmap=False):
    return [np.load(folder / f"{b}{suffix}.npy", mmap_mode="r" if mmap else None)
            for b in range(len(names))]


def _child_speed(folder, names, d, hals_sweeps, mu_sweeps, seed):
    from xcraft.coupled import CoupledNMF
    from xcraft.ops.coupled import block_weights, fit_coupled, initialize_coupled

    xs = _load(folder, names)
    blocks = dict(zip(names, xs, strict=True))
    result = {"default": {}, "long": {}, "targets": []}
    CoupledNMF(d, max_iter=2, random_state=seed).fit(blocks)  # trace the graphs once
    CoupledNMF(d, solver="mu", max_iter=2, random_state=seed).fit(blocks)
    for solver in ("hals", "mu"):
        model, wall, cpu = _timed(lambda s=solver: CoupledNMF(d, solver=s,
                                                              random_state=seed).fit(blocks))
        result["default"][solver] = {"sweeps": model.n_iter_, "wall": wall, "cpu": cpu,
                                     "objective": float(model.history_[-1]),
                                     "errors": model.block_errors_}

    alphas = block_weights([float(np.sum(np.square(x, dtype=np.float64))) for x in xs])
    rng = np.random.default_rng(seed)
    start, init_wall, _ = _timed(lambda: initialize_coupled(
        xs, alphas, d, seed=rng.integers(2**31 - 1, size=2)))
    f0, ws0 = start
    result["init_wall"] = init_wall

    def run(solver, sweeps):
        out = fit_coupled(xs, alphas, f0, ws0, solver=solver, max_iter=sweeps, tol=0.0)
        out[0].numpy()  # wait for the device
        return out

    histories = {}
    for solver, sweeps in (("hals", hals_sweeps), ("mu", mu_sweeps)):
        out, wall, cpu = _timed(lambda s=solver, k=sweeps: run(s, k))
        history = out[2].numpy()
        histories[solver] = history
        result["long"][solver] = {"sweeps": int(out[4]), "wall": wall, "cpu": cpu,
                                  "objective": float(history[-1]),
                                  "errors": dict(zip(names, out[3].numpy()[-1].tolist(),
                                                     strict=True))}
    best = min(float(h.min()) for h in histories.values())
    result["best"] = best
    for gap in GAPS:
        target = best * (1.0 + gap)
        line = {"gap": gap, "target": target}
        for solver, history in histories.items():
            reached = np.flatnonzero(history <= target)
            if reached.size == 0:
                line[solver] = None
                continue
            sweeps = int(reached[0]) + 1
            _, wall, cpu = _timed(lambda s=solver, k=sweeps: run(s, k))
            line[solver] = {"sweeps": sweeps, "wall": wall, "cpu": cpu}
        result["targets"].append(line)
    return result


def _child_memory(folder, names, kind, source, streamed, d, sweeps, batch_size, seed):
    from xcraft.coupled import CoupledNMF
    from xcraft.ops.coupled import block_weights, fit_coupled, initialize_coupled

    xs = _load(folder, names, "_big", mmap=source == "mmap")
    n = xs[0].shape[0]
    small = {name: np.array(x[:256]) for name, x in zip(names, xs, strict=True)}
    CoupledNMF(d, max_iter=2, batch_size=128 if streamed else None,
               random_state=seed).fit(small)  # load the kernels before the baseline
    del small
    batch = batch_size if streamed else None
    baseline = _anon_mib()
    wall = time.perf_counter()
    with _PeakAnon() as sampler:
        if kind == "estimator":
            model = CoupledNMF(d, max_iter=sweeps, tol=0.0, batch_size=batch,
                               random_state=seed).fit(dict(zip(names, xs, strict=True)))
            objective = float(model.history_[-1])
        else:
            sq_norms = np.zeros(len(xs))
            for start in range(0, n, batch_size):  # never a float64 copy of a whole block
                for b, x in enumerate(xs):
                    sq_norms[b] += np.sum(np.square(x[start:start + batch_size],
                                                    dtype=np.float64))
            alphas = block_weights(sq_norms)
            seeds = np.random.default_rng(seed).integers(2**31 - 1, size=2)
            f0, ws0 = initialize_coupled(xs, alphas, d, seed=seeds, batch_size=batch)
            out = fit_coupled(xs, alphas, f0, ws0, max_iter=sweeps, tol=0.0, batch_size=batch)
            objective = float(out[2].numpy()[-1])
    return {"kind": kind, "source": source, "streamed": streamed, "n": n,
            "blocks_mib": sum(x.nbytes for x in xs) / 2**20, "baseline_mib": baseline,
            "peak_mib": sampler.peak, "wall": time.perf_counter() - wall,
            "objective": objective}


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


def _spawn(*arguments):
    command = [sys.executable, __file__, *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child {arguments[:3]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _errors(entry, names):
    return " | ".join(f"{entry['errors'][n]:.4f}" for n in names)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="demo images (at most 2000)")
    parser.add_argument("--d", type=int, default=10, help="number of factors")
    parser.add_argument("--hals-sweeps", type=int, default=300)
    parser.add_argument("--mu-sweeps", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=10,
                        help="copies of the blocks for the memory part")
    parser.add_argument("--memory-sweeps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1000,
                        help="examples per batch of the streamed fits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run (under a minute)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.hals_sweeps, args.mu_sweeps = 300, 20, 100
        args.repeat, args.memory_sweeps, args.batch_size = 2, 3, 200
    if args.child:
        folder = Path(args.child[1])
        if args.child[0] == "build":
            out = _child_build(folder, args.images, args.repeat)
        else:
            names = json.loads((folder / "names.json").read_text())["names"]
            if args.child[0] == "speed":
                out = _child_speed(folder, names, args.d, args.hals_sweeps, args.mu_sweeps,
                                   args.seed)
            else:
                kind, source, streamed = args.child[2], args.child[3], args.child[4] == "1"
                out = _child_memory(folder, names, kind, source, streamed, args.d,
                                    args.memory_sweeps, args.batch_size, args.seed)
        print(json.dumps(out))
        return

    common = ["--images", args.images, "--d", args.d, "--hals-sweeps", args.hals_sweeps,
              "--mu-sweeps", args.mu_sweeps, "--repeat", args.repeat, "--memory-sweeps",
              args.memory_sweeps, "--batch-size", args.batch_size, "--seed", args.seed]
    with tempfile.TemporaryDirectory(prefix="xcraft-bench-coupled-") as tmp:
        built = _spawn(*common, "--child", "build", tmp)
        (Path(tmp) / "names.json").write_text(json.dumps(built))
        names = built["names"]
        columns = ", ".join(f"{n} {c}" for n, c in zip(names, built["columns"], strict=True))
        print(f"Blocks of the demo CNN: {built['n_images']} images; columns {columns}; built in "
              f"{built['seconds']:.1f} s. d = {args.d}, Frobenius weights, seed {args.seed}.")

        speed = _spawn(*common, "--child", "speed", tmp)
        header = " | ".join(f"{n} error" for n in names)
        print("\nDefault fits (CoupledNMF, tol 1e-4, max_iter 200):\n")
        print(f"| solver | sweeps | wall s | CPU s | J | {header} |")
        print("|---|---|---|---|---|" + "---|" * len(names))
        for solver, e in speed["default"].items():
            print(f"| {solver} | {e['sweeps']} | {e['wall']:.2f} | {e['cpu']:.2f} | "
                  f"{e['objective']:.5f} | {_errors(e, names)} |")
        print(f"\nSame start (NNDSVDa, {speed['init_wall']:.2f} s, not counted below), no "
              f"stopping rule:\n")
        print(f"| solver | sweeps | wall s | CPU s | J | {header} |")
        print("|---|---|---|---|---|" + "---|" * len(names))
        for solver, e in speed["long"].items():
            print(f"| {solver} | {e['sweeps']} | {e['wall']:.2f} | {e['cpu']:.2f} | "
                  f"{e['objective']:.5f} | {_errors(e, names)} |")
        print(f"\nTime to the same objective (J* = {speed['best']:.5f}, the lowest J reached):\n")
        print("| target J | hals sweeps | hals wall s | mu sweeps | mu wall s | mu / hals time |")
        print("|---|---|---|---|---|---|")
        for line in speed["targets"]:
            hals, mu = line["hals"], line["mu"]
            cells = []
            for e in (hals, mu):
                cells += ["not reached", "-"] if e is None else [str(e["sweeps"]),
                                                                 f"{e['wall']:.2f}"]
            ratio = "-" if hals is None or mu is None else f"{mu['wall'] / hals['wall']:.1f}"
            print(f"| J*·(1 + {line['gap']:.0e}) = {line['target']:.5f} | {' | '.join(cells)} "
                  f"| {ratio} |")

        print(f"\nMemory: the blocks repeated {args.repeat} times, {args.memory_sweeps} HALS "
              f"sweeps, streamed batches of {args.batch_size}; MiB of RssAnon:\n")
        print("| fit | blocks from | streamed | examples | blocks | baseline | peak | added | "
              "added / blocks | wall s | J |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for kind, source, streamed in MEMORY_MODES:
            m = _spawn(*common, "--child", "memory", tmp, kind, source, int(streamed))
            added = m["peak_mib"] - m["baseline_mib"]
            what = "CoupledNMF.fit" if kind == "estimator" else "ops (init + fit_coupled)"
            print(f"| {what} | {'RAM' if source == 'ram' else 'memmap'} | "
                  f"{'yes' if streamed else 'no'} | {m['n']} | {m['blocks_mib']:.0f} | "
                  f"{m['baseline_mib']:.0f} | {m['peak_mib']:.0f} | {added:.0f} | "
                  f"{added / m['blocks_mib']:.2f} | {m['wall']:.1f} | {m['objective']:.5f} |")


if __name__ == "__main__":
    main()
