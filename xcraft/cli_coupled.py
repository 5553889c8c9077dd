"""The ``xcraft coupled`` command: a coupled NMF of pixels, neurons and examples from the shell.

``xcraft coupled`` (no option) streams the embedded Fashion-MNIST images through the embedded
CNN, builds one block per input channel and one per layer (``pool1`` and ``pool2``), fits
:class:`xcraft.coupled.CoupledNMF` (Saini & Papalexakis) on them, and writes to ``--out``:

- ``coupled_report.html`` (self-contained): the factors' classes, top images and pixel masks,
  the factor similarity of every layer and its eigenvalue trend, and the rank curve with
  ``--rank-curve``;
- ``coupled_summary.json``: the numbers of the report and the settings;
- ``coupled_fit/``: the fit (:func:`xcraft.coupled.io.save_coupled`, with the blocks' index
  maps), read back by :func:`xcraft.coupled.io.load_coupled`.

``--model M --layers L1 L2 --images PATH`` does the same for a user's Keras model on a folder of
images (or a folder of class sub-folders, which gives labels) or an ``.npz`` file (``images``,
optional ``labels``).
"""

import argparse
import os
import sys

from xcraft._cli_common import (
    IMAGE_EXTENSIONS,
    PREPROCESS_HELP,
    PREPROCESSINGS,
    CliError,
    _fit_to_model,
    _Formatter,
    _load_model,
    _model_input,
    _nonnegative_int,
    _one_line,
    _positive_int,
    _preprocess,
    _Progress,
    _read_folder,
    _read_npz,
    _settings,
    add_model_file_options,
)

__all__ = ["add_coupled_command", "run_coupled", "print_coupled_summary", "FIT_DIR"]

#: Sub-folder of --out receiving the saved fit.
FIT_DIR = "coupled_fit"
#: Default d: as many factors as the demo has classes, so that each can follow one.
DEFAULT_N_COMPONENTS = 10
#: Default number of images: the whole embedded subset (200 per class).
DEFAULT_N_IMAGES = 2000
_WEIGHT_CHOICES = ("frobenius", "uniform")
_POOLS = {"none": None, "avg": "avg"}


def _weight_token(text):
    """``frobenius``, ``uniform`` or ``BLOCK=ALPHA`` (ALPHA a positive number)."""
    if text in _WEIGHT_CHOICES:
        return text
    name, sep, value = text.rpartition("=")
    try:
        alpha = float(value)
    except ValueError:
        alpha = None
    if not sep or not name or alpha is None or not alpha > 0 or alpha == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be 'frobenius', 'uniform' or BLOCK=ALPHA with ALPHA > 0, got {text!r}")
    return name, alpha


def _tolerance(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _quantile(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_coupled_command(commands):
    """Add the ``coupled`` sub-command to an ``argparse`` sub-parsers object; return its parser.

    Parameters
    ----------
    commands : argparse._SubParsersAction
        What ``ArgumentParser.add_subparsers`` returned.

    Returns
    -------
    argparse.ArgumentParser
    """
    coupled = commands.add_parser(
        "coupled",
        formatter_class=_Formatter,
        help="coupled NMF: pixels, neurons and examples in one latent space",
        description=(
            "Factorise the pixels of every input channel and the activations of several layers\n"
            "of a Keras model, over the same images, with one shared non-negative example\n"
            "factor F (Saini & Papalexakis): X_b ~ F W_b for every block b. Each factor gets\n"
            "its top images, its pixel mask, its classes (with labels) and its top neurons in\n"
            "every layer (in coupled_summary.json); the report also shows how much the factors\n"
            "share neurons, layer by layer. Without --model: the embedded Fashion-MNIST CNN,\n"
            "its 2000 embedded test images and their labels, layers pool1 and pool2.\n\n"
            "--images is a folder of PNG/JPEG files (no labels), a folder of class sub-folders\n"
            "(labels and class names from the sub-folders), or an .npz file holding 'images'\n"
            "(else its first array) and optional 'labels'. Every --layers entry must give\n"
            "non-negative activations (after a ReLU); the error message lists the layers."
        ),
    )
    coupled.add_argument("--model", metavar="M", default=None,
                         help="Keras model file (.keras or HDF5); the embedded demo CNN when "
                              "omitted")
    coupled.add_argument("--layers", metavar="NAME", nargs="+", default=None,
                         help="layers to analyse, in network order ('nested_model/layer' for a "
                              "layer inside a nested model; demo: pool1 pool2)")
    coupled.add_argument("--images", metavar="PATH", default=None,
                         help="folder of images, folder of class sub-folders, or .npz file "
                              "(demo images when omitted)")
    coupled.add_argument("--preprocess", choices=PREPROCESSINGS, default=None,
                         help=PREPROCESS_HELP)
    add_model_file_options(coupled)
    coupled.add_argument("--class-names", metavar="NAME", nargs="+", default=None,
                         help="names of the classes 0, 1, ... of an .npz file's labels")
    coupled.add_argument("--n-images", metavar="N", type=_positive_int, default=DEFAULT_N_IMAGES,
                         help="use at most N images, evenly spaced through the input (so that "
                              "a file sorted by class keeps every class)")
    coupled.add_argument("--n-components", "-d", metavar="D", type=_positive_int,
                         default=DEFAULT_N_COMPONENTS, help="d, the number of factors")
    coupled.add_argument("--solver", choices=("hals", "mu"), default="hals",
                         help="HALS (exact coordinate descent) or the paper's multiplicative "
                              "updates")
    coupled.add_argument("--weights", metavar="W", type=_weight_token, nargs="+",
                         default=["frobenius"],
                         help="block weights: frobenius (1 / |X_b|^2: every block counts by its "
                              "relative error), uniform (the paper), or BLOCK=ALPHA for every "
                              "block (default: frobenius)")
    coupled.add_argument("--normalization", choices=("joint", "block", "none"), default="joint",
                         help="rescaling of the factors after every sweep (joint keeps the "
                              "objective; block: the paper's unit-norm rows per block)")
    coupled.add_argument("--pool", choices=tuple(_POOLS), default="none",
                         help="none: every activation is a column; avg: one column per "
                              "channel (its spatial mean)")
    coupled.add_argument("--no-pixels", dest="include_pixels", action="store_false",
                         help="leave the pixel blocks out (layers only)")
    coupled.add_argument("--max-iter", metavar="N", type=_positive_int, default=200,
                         help="maximum number of sweeps")
    coupled.add_argument("--tol", metavar="T", type=_tolerance, default=1e-4,
                         help="stop when a sweep lowers the objective by less than this fraction")
    coupled.add_argument("--stream", metavar="N", type=_positive_int, default=None,
                         help="fit streaming the examples in batches of N, so that no block has "
                              "to be on the device whole (default: blocks in memory)")
    coupled.add_argument("--rank-curve", metavar="D", type=_positive_int, nargs="+",
                         default=None, help="also fit these values of d, increasing, and draw "
                                            "the reconstruction error against d")
    coupled.add_argument("--n-top", metavar="K", type=_positive_int, default=6,
                         help="top images per factor in the report")
    coupled.add_argument("--knn-k", metavar="K", type=_positive_int, default=10,
                         help="neighbours in F of the label agreement")
    coupled.add_argument("--mask-quantile", metavar="Q", type=_quantile, default=0.9,
                         help="a factor's pixel mask keeps its pixels above this quantile")
    coupled.add_argument("--batch-size", metavar="N", type=_positive_int, default=64,
                         help="images per forward pass")
    coupled.add_argument("--seed", "--random-state", dest="seed", metavar="S",
                         type=_nonnegative_int, default=0,
                         help="random_state of the fit: same seed, same factors")
    coupled.add_argument("--out", metavar="DIR", default="xcraft-coupled",
                         help=f"directory receiving coupled_report.html, coupled_summary.json "
                              f"and the fit in {FIT_DIR}/")
    coupled.add_argument("--overwrite", action="store_true",
                         help="also write into a non-empty directory that is not an xcraft "
                              "coupled report (its files are kept)")
    coupled.add_argument("--quiet", action="store_true", help="no progress messages")
    coupled.add_argument("--debug", action="store_true",
                         help="print the full traceback of an error, and TensorFlow's logs")
    coupled.set_defaults(run=run_coupled, print_summary=print_coupled_summary)
    return coupled


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _has_images(path):
    return any(name.lower().endswith(IMAGE_EXTENSIONS)
               and os.path.isfile(os.path.join(path, name)) for name in os.listdir(path))


def _read_class_folders(path, size, channels):
    """Images of every sub-folder of ``path``, labelled by the sub-folder's sorted position."""
    import numpy as np

    names = sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))
    if not names:
        raise CliError(
            f"the image folder {path!r} holds neither image files ({', '.join(IMAGE_EXTENSIONS)}) "
            f"nor class sub-folders."
        )
    images, labels = [], []
    for label, name in enumerate(names):
        class_images, _ = _read_folder(os.path.join(path, name), size, channels)
        images.append(class_images)
        labels.append(np.full(len(class_images), label, np.int64))
    return np.concatenate(images), np.concatenate(labels), names


def _integer_labels(labels, path):
    import numpy as np

    labels = np.asarray(labels)
    if labels.dtype == object or not np.issubdtype(labels.dtype, np.number):
        raise CliError(f"the .npz array 'labels' of {path!r} must hold class indices, got dtype "
                       f"{labels.dtype}.")
    rounded = np.round(labels)
    if not np.all(np.isfinite(labels)) or np.any(rounded != labels) or rounded.min() < 0:
        raise CliError(f"the .npz array 'labels' of {path!r} must hold integer class indices "
                       f">= 0, got values such as {labels[:5].tolist()}.")
    return rounded.astype(np.int64)


def _user_images(args, size, channels):
    """(model inputs, [0, 1] pixels or None, labels or None, class names or None, display)."""
    import numpy as np

    path = args.images
    if not os.path.exists(path):
        raise CliError(f"the images path {path!r} does not exist.")
    labels = names = None
    if os.path.isdir(path):
        if _has_images(path):
            images, _ = _read_folder(path, size, channels)
        else:
            images, labels, names = _read_class_folders(path, size, channels)
        integer_pixels = True
    elif path.lower().endswith(".npz"):
        images, labels, integer_pixels = _read_npz(path)
        if labels is not None:
            labels = _integer_labels(labels, path)
        images = _fit_to_model(images, size, channels)
    else:
        raise CliError(f"--images must be a folder of images or an .npz file, got {path!r}.")
    mode = args.preprocess or ("0-1" if integer_pixels else "none")
    inputs, display = _preprocess(images.astype(np.float32), mode)
    if display is None and integer_pixels:
        display = lambda x: x / 255.0  # noqa: E731 - raw 0..255 pixels shown as they are
    # The pixel blocks are what a person sees, in [0, 1], whatever the model's scaling.
    pixels = None if display is None else np.clip(display(inputs), 0.0, 1.0).astype(np.float32)
    args.preprocess = mode
    return inputs, pixels, labels, names, display


def _spread(n_total, n_wanted):
    """Indices of ``n_wanted`` examples evenly spaced through ``n_total`` (all when fewer)."""
    import numpy as np

    if n_wanted >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, n_wanted).round().astype(np.int64)


def _inputs(args):
    """The model, layers, images, pixel images, labels, class names and display function."""
    from xcraft.datasets import DEMO_EARLY_LAYER, DEMO_LAYER, load_demo_data, load_demo_model

    if args.model is None:
        model = load_demo_model()
        layers = args.layers or [DEMO_EARLY_LAYER, DEMO_LAYER]
    else:
        if not args.layers:
            raise CliError("--model needs --layers: the layers to analyse (after a ReLU).")
        if args.images is None:
            raise CliError("--model needs --images: the examples to analyse.")
        model = _load_model(args.model, args.clean_legacy_config)
        layers = args.layers
    if args.images is None:
        if args.preprocess is not None:
            raise CliError("--preprocess applies to --images files; the embedded images are "
                           "already scaled for the embedded model.")
        images, labels, names = load_demo_data()
        pixels, display = None, None
    else:
        height, width, channels = _model_input(model)
        images, pixels, labels, names, display = _user_images(args, (height, width), channels)
    keep = _spread(len(images), args.n_images)
    images = images[keep]
    pixels = None if pixels is None else pixels[keep]
    labels = None if labels is None else labels[keep]
    if args.class_names is not None:
        if labels is None:
            raise CliError("--class-names needs labels: an .npz file with a 'labels' array.")
        if names is not None and args.images is not None:
            raise CliError("--class-names does not apply to class sub-folders, whose names are "
                           "the class names.")
        n_classes = int(labels.max()) + 1
        if len(args.class_names) < n_classes:
            raise CliError(f"--class-names must name the {n_classes} classes 0..{n_classes - 1}, "
                           f"got {len(args.class_names)} names.")
        names = list(args.class_names)
    return model, layers, images, pixels, labels, names, display


def _weights(tokens, block_names):
    """The ``weights`` of CoupledNMF from the --weights tokens."""
    if len(tokens) == 1 and isinstance(tokens[0], str):
        return tokens[0]
    if any(isinstance(token, str) for token in tokens):
        raise CliError(f"--weights must be one of {', '.join(_WEIGHT_CHOICES)} alone, or "
                       f"BLOCK=ALPHA for every block, got a mix.")
    weights = dict(tokens)
    unknown = sorted(set(weights) - set(block_names))
    missing = [name for name in block_names if name not in weights]
    if unknown or missing:
        raise CliError(f"--weights must give BLOCK=ALPHA for exactly the blocks "
                       f"{', '.join(block_names)}; unknown {unknown}, missing {missing}.")
    return weights


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def run_coupled(args, argv):
    """Run ``xcraft coupled`` from parsed arguments; return the report's summary.

    Parameters
    ----------
    args : argparse.Namespace
        From the parser :func:`add_coupled_command` built.
    argv : list of str
        The command line, recorded in the summary's settings.

    Returns
    -------
    dict
        What ``coupled_summary.json`` holds.

    Raises
    ------
    CliError
        On bad input: an unknown or signed layer (the valid or post-ReLU layers are named),
        unreadable images or model, options that do not fit the blocks.
    """
    from xcraft.coupled import CoupledNMF, build_blocks
    from xcraft.coupled.analysis import rank_curve
    from xcraft.coupled.io import save_coupled
    from xcraft.viz.coupled import write_coupled_report

    progress = _Progress(args.quiet)
    if args.rank_curve is not None and sorted(set(args.rank_curve)) != args.rank_curve:
        raise CliError(f"--rank-curve must be increasing without repeats, got "
                       f"{' '.join(map(str, args.rank_curve))}.")
    model, layers, images, pixels, labels, names, display = _inputs(args)
    if args.include_pixels and pixels is None and float(images.min()) < 0:
        raise CliError(
            f"the images must be non-negative to form pixel blocks, got a minimum of "
            f"{float(images.min()):.4g}; pass --preprocess to say how they are scaled, or "
            f"--no-pixels."
        )
    progress(f"blocks of {len(images)} images: {'pixels, ' if args.include_pixels else ''}"
             f"{', '.join(layers)}")
    try:
        blocks = build_blocks(model, layers, images, include_pixels=args.include_pixels,
                              pool=_POOLS[args.pool], pixel_images=pixels,
                              batch_size=args.batch_size,
                              verbose=not args.quiet and sys.stderr.isatty())
    except (ValueError, TypeError) as err:
        raise CliError(f"--layers: {_one_line(err)}") from None
    total = sum(block.shape[1] for block in blocks.values())
    limit = min(len(images), total)
    for option, d in [("--n-components", args.n_components),
                      *(("--rank-curve", r) for r in args.rank_curve or ())]:
        if d > limit:
            raise CliError(f"{option} must be <= min(images, block columns) = {limit}, got {d}.")
    params = dict(solver=args.solver, weights=_weights(args.weights, list(blocks)),
                  normalization=args.normalization, max_iter=args.max_iter, tol=args.tol,
                  batch_size=args.stream, random_state=args.seed)
    shapes = ", ".join(f"{name} {block.shape[1]}" for name, block in blocks.items())
    progress(f"coupled NMF, d = {args.n_components}, {args.solver}: columns {shapes}")
    estimator = CoupledNMF(args.n_components, **params).fit(blocks)
    curve = None
    if args.rank_curve is not None:
        progress(f"rank curve: d = {', '.join(map(str, args.rank_curve))}")
        curve = rank_curve(blocks, args.rank_curve, **params)
    progress(f"writing the report to {args.out!r}")
    settings = _settings(args, argv)
    settings.pop("print_summary", None)
    source = "embedded demo CNN" if args.model is None else os.path.basename(args.model)
    summary = write_coupled_report(
        estimator, args.out, settings=settings, title=f"xcraft coupled NMF: {source}",
        blocks=blocks, images=images, labels=labels, class_names=names, display=display,
        n_top=min(args.n_top, len(images)), knn_k=args.knn_k, rank_curve=curve,
        mask_quantile=args.mask_quantile,
    )
    save_coupled(estimator, os.path.join(args.out, FIT_DIR), blocks=blocks,
                 overwrite=args.overwrite)
    return summary


def print_coupled_summary(summary, out_dir, seconds):
    """Print the blocks' relative errors, the factors' classes and where the files went.

    Parameters
    ----------
    summary : dict
        What :func:`run_coupled` returned.
    out_dir : str
        The --out directory.
    seconds : float
        The command's duration.
    """
    entry = summary["coupled"]
    print(f"coupled NMF: {entry['n_examples']} examples, d = {entry['n_components']}, "
          f"{entry['n_iter']} sweeps")
    print(f"  {'block':<16}{'columns':>8}{'rel. error':>12}{'weight':>11}")
    for name, block in entry["blocks"].items():
        print(f"  {name:<16}{block['columns']:>8}{block['relative_error']:>12.3f}"
              f"{block['weight']:>11.3g}")
    classes = entry["classes"]
    if classes is not None:
        print(f"factor purity: mean {classes['mean_purity']:.3f} (chance "
              f"{classes['chance_purity']:.3f}); {classes['knn_k']}-NN label agreement in F "
              f"{classes['knn_agreement']:.3f} (chance {classes['knn_chance']:.3f})")
        names = classes["names"]
        for j, (top, shares) in enumerate(zip(classes["top_classes"], classes["top_shares"],
                                              strict=True)):
            best = ", ".join(f"{names[c] if names else f'class {c}'} {s:.2f}"
                             for c, s in zip(top, shares, strict=True))
            print(f"  F{j:<3} purity {classes['purity'][j]:.2f}: {best}")
    curve = entry["rank_curve"]
    if curve is not None:
        errors = ", ".join(f"d={r}: {e:.3f}" for r, e in zip(curve["ranks"], curve["error"],
                                                             strict=True))
        print(f"rank curve: {errors}; suggested d = {curve['suggested']}")
    print(f"report: {os.path.join(out_dir, 'coupled_report.html')} (numbers in "
          f"{os.path.join(out_dir, 'coupled_summary.json')}), fit in "
          f"{os.path.join(out_dir, FIT_DIR)}, {seconds:.1f} s")
