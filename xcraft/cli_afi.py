"""The ``xcraft afi`` command: AfI's class-wide occluder and concept scores from the shell.

``xcraft afi --model M --layers L1 L2 --images PATH --class-id K [--probes DIR --random PATH]``
learns the occluder of class K on the images, the channel importances of the layers, and,
with probe folders (one sub-folder of images per concept) and random images, the concepts' MMD
scores with permutation p-values. It writes ``afi_report.html`` (self-contained),
``afi_summary.json`` and, with ``--save``, the fitted estimator. ``--model demo`` uses the
Fashion-MNIST CNN shipped with xcraft and, without ``--images``, its shipped test images.
"""

import os
import sys

from xcraft._cli_common import (
    PREPROCESSINGS,
    CliError,
    _fit_to_model,
    _Formatter,
    _load_images,
    _load_model,
    _model_input,
    _n_outputs,
    _nonnegative_int,
    _positive_int,
    _preprocess,
    _Progress,
    _read_folder,
    _read_npz,
    _settings,
    add_model_file_options,
)

__all__ = ["add_afi_command", "run_afi", "print_afi_summary"]

#: The input range each preprocessing maps pixels (0..255) to.
_RANGES = {"0-1": (0.0, 1.0), "-1-1": (-1.0, 1.0), "none": (0.0, 255.0),
           "caffe": (-123.68, 255.0 - 103.939)}
ESTIMATOR_DIR = "afi_estimator"


def _float(text):
    try:
        return float(text)
    except ValueError:
        raise CliError(f"must be a number, got {text!r}") from None


def add_afi_command(commands):
    """Add the ``afi`` sub-command to an ``argparse`` sub-parsers object; return its parser."""
    afi = commands.add_parser(
        "afi",
        formatter_class=_Formatter,
        help="AfI: a class-wide feature occluder, channel importances and concept scores",
        description=(
            "Learn AfI's global feature occluder (Wu et al., CVPR 2020) for one class of a\n"
            "Keras classifier returning logits: one perturbation that stops the model from\n"
            "predicting the class on all its images. Each layer's channels are ranked by the\n"
            "drop the occluder causes; with --probes (a folder with one sub-folder of images\n"
            "per concept) and --random, each concept is scored by the MMD between the\n"
            "meta-detectors' responses to its images and to random images, with permutation\n"
            "p-values. --model demo uses the Fashion-MNIST CNN shipped with xcraft."
        ),
    )
    afi.add_argument("--model", metavar="M", required=True,
                     help="Keras model file (.keras or HDF5) returning logits, or 'demo'")
    afi.add_argument("--layers", metavar="NAME", nargs="+", required=True,
                     help="layers whose channels are ranked")
    afi.add_argument("--images", metavar="PATH", default=None,
                     help="folder of images of the class, or an .npz file ('images', optional "
                          "'labels'); optional with --model demo")
    afi.add_argument("--class-id", metavar="K", type=int, required=True,
                     help="the class (output index of the model)")
    afi.add_argument("--class-name", metavar="NAME", default=None)
    afi.add_argument("--probes", metavar="DIR", default=None,
                     help="folder with one sub-folder of probe images per concept")
    afi.add_argument("--random", metavar="PATH", default=None,
                     help="random images (folder or .npz) the concepts are compared with")
    afi.add_argument("--preprocess", choices=PREPROCESSINGS, default=None,
                     help="pixel scaling, as for `xcraft explain`")
    add_model_file_options(afi)
    afi.add_argument("--input-range", metavar=("LOW", "HIGH"), type=float, nargs=2,
                     default=None, help="range of the model's inputs (default: from the "
                                        "preprocessing)")
    afi.add_argument("--max-images", metavar="N", type=_positive_int, default=200)
    afi.add_argument("--l1-penalty", metavar="L", type=float, default=1e-3)
    afi.add_argument("--learning-rate", metavar="R", type=float, default=0.01)
    afi.add_argument("--max-steps", metavar="N", type=_nonnegative_int, default=300)
    afi.add_argument("--proximal", action="store_true", help="proximal l1 step (exact zeros)")
    afi.add_argument("--lambda-search", action="store_true",
                     help="search the largest λ that flips every image")
    afi.add_argument("--n-permutations", metavar="N", type=_positive_int, default=1000)
    afi.add_argument("--n-random-sets", metavar="N", type=_positive_int, default=5)
    afi.add_argument("--impression-steps", metavar="N", type=_nonnegative_int, default=100,
                     help="steps of each layer's class impression (0: none)")
    afi.add_argument("--batch-size", metavar="N", type=_positive_int, default=64)
    afi.add_argument("--seed", metavar="S", type=_nonnegative_int, default=0)
    afi.add_argument("--save", action="store_true",
                     help=f"also save the fitted estimator in OUT/{ESTIMATOR_DIR}")
    afi.add_argument("--out", metavar="DIR", default="xcraft-afi")
    afi.add_argument("--quiet", action="store_true")
    afi.add_argument("--debug", action="store_true")
    afi.set_defaults(run=run_afi, print_summary=print_afi_summary)
    return afi


def _read_any(path, size, channels, mode, what):
    import numpy as np

    if not os.path.exists(path):
        raise CliError(f"the {what} path {path!r} does not exist.")
    if os.path.isdir(path):
        images, _ = _read_folder(path, size, channels)
    elif path.lower().endswith(".npz"):
        images = _fit_to_model(_read_npz(path)[0], size, channels)
    else:
        raise CliError(f"the {what} must be a folder of images or an .npz file, got {path!r}.")
    return _preprocess(images.astype(np.float32), mode)[0]


def _probe_sets(path, size, channels, mode):
    if not os.path.isdir(path):
        raise CliError(f"--probes must be a folder of concept sub-folders, got {path!r}.")
    names = sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))
    if not names:
        raise CliError(f"--probes {path!r} holds no sub-folder (one per concept).")
    return {name: _read_any(os.path.join(path, name), size, channels, mode, "probe")
            for name in names}


def run_afi(args, argv):
    """Run ``xcraft afi`` from parsed arguments; return the report's summary."""
    from xcraft.afi import AfI
    from xcraft.viz.afi import write_afi_report

    progress = _Progress(args.quiet)
    if args.model == "demo":
        from xcraft.datasets import load_demo_data, load_demo_model

        model = load_demo_model()
    else:
        model = _load_model(args.model, args.clean_legacy_config)
    size_h, size_w, channels = _model_input(model)
    n_classes = _n_outputs(model)
    if not 0 <= args.class_id < n_classes:
        raise CliError(f"--class-id must be in 0..{n_classes - 1} (the model has {n_classes} "
                       f"outputs), got {args.class_id}.")
    if (args.probes is None) != (args.random is None):
        raise CliError("--probes and --random go together: pass both or neither.")
    if args.images is None:
        if args.model != "demo":
            raise CliError("--images is required unless --model is 'demo'.")
        images, labels, _ = load_demo_data()
        images = images[labels == args.class_id][: args.max_images]
        mode, display = "none", None
        default_range = (0.0, 1.0)
    else:
        images, display, mode = _load_images(args, (size_h, size_w), channels)
        default_range = _RANGES[mode] if mode != "none" else (
            float(min(0.0, images.min())), float(max(1.0, images.max())))
    input_range = tuple(args.input_range) if args.input_range else default_range
    label = args.class_name or f"class {args.class_id}"
    progress(f"{label}: occluder from {len(images)} images, input range {input_range}")
    afi = AfI(model, layers=list(args.layers), input_range=input_range,
              l1_penalty=args.l1_penalty, learning_rate=args.learning_rate,
              max_steps=args.max_steps, proximal=args.proximal,
              lambda_search=args.lambda_search, batch_size=args.batch_size,
              verbose=not args.quiet, random_state=args.seed)
    afi.fit(images, args.class_id)
    if args.probes is not None:
        probe_mode = "none" if args.images is None else mode
        if args.images is None:  # the demo's inputs are 0..1: probes read as 0..255 are scaled
            probe_mode = "0-1"
        probes = _probe_sets(args.probes, (size_h, size_w), channels, probe_mode)
        random_images = _read_any(args.random, (size_h, size_w), channels, probe_mode, "random")
        progress(f"concept scores of {len(probes)} concepts against {len(random_images)} "
                 f"random images")
        afi.concept_importance(probes, random_images, n_random_sets=args.n_random_sets,
                               n_permutations=args.n_permutations)
    impressions = None
    if args.impression_steps:
        progress("class impressions")
        impressions = {layer: afi.class_impression(layer, n_steps=args.impression_steps)
                       for layer in afi.layers_}
    progress(f"writing the report to {args.out!r}")
    summary = write_afi_report(afi, args.out, class_label=label, images=images[:4],
                               impressions=impressions, display=display,
                               settings=_settings(args, argv),
                               title=f"xcraft AfI: {os.path.basename(args.model)}, {label}")
    if args.save:
        afi.save(os.path.join(args.out, ESTIMATOR_DIR), overwrite=True)
    return summary


def print_afi_summary(summary, out_dir, seconds):
    """Print the flip rates, top channels and concept scores on stdout."""
    entry = summary["afi"]
    flips = entry["flip_rate"]
    print(f"{entry['class_name']}: {entry['n_images']} images, λ = {entry['lambda']:.4g}, "
          f"{entry['n_steps']} steps, flip rate {flips['clean']:.3f}")
    for layer, values in entry["channel_importance"].items():
        top = sorted(range(len(values)), key=lambda c: -values[c])[:5]
        print(f"  {layer}: top channels {', '.join(str(c) for c in top)}")
    if entry["concepts"]:
        print(f"  {'concept':<16}{'score':>8}{'std':>8}{'p':>9}")
        for concept in entry["concepts"]["concepts"]:
            print(f"  {concept['name']:<16}{concept['score']:>8.3f}{concept['std']:>8.3f}"
                  f"{concept['p_value']:>9.4f}")
    print(f"report: {os.path.join(out_dir, 'afi_report.html')}, {seconds:.1f} s",
          file=sys.stdout)
