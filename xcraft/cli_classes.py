"""``xcraft explain --classes 0-999`` / ``--all-classes``: many classes, resumable, and a site.

The classes run through :func:`xcraft.craft.runner.explain_classes`: in this process, or in
``--workers`` spawned processes (or Ray actors with ``--executor ray``), each loading the model
file once. Rerunning the same command resumes: finished classes are skipped. The folder ends
with ``index.html``, the searchable site of all classes (:mod:`xcraft.viz.site`).
"""

import hashlib
import os
import sys
from dataclasses import dataclass

from xcraft._cli_common import (
    IMAGE_EXTENSIONS,
    CliError,
    _nonnegative_int,
    _one_line,
    _positive_int,
    _read_folder,
)

__all__ = ["FolderClassImages", "add_classes_options", "parse_classes", "print_run",
           "run_classes"]


def parse_classes(text):
    """Class ids from ``"0-999"``, ``"1,7,8"`` or ``"0-4,9"`` (ranges inclusive)."""
    ids = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            if dash:
                first, last = int(low), int(high)
                if last < first:
                    raise ValueError
                ids.extend(range(first, last + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise CliError(
                f"--classes must be class ids and ranges like 0-999 or 1,7,8, got {text!r}."
            ) from None
    if not ids:
        raise CliError(f"--classes must name at least one class, got {text!r}.")
    if min(ids) < 0:
        raise CliError(f"--classes must be >= 0, got {text!r}.")
    return list(dict.fromkeys(ids))


def add_classes_options(parser):
    """The options of a many-class run, added to ``explain``."""
    group = parser.add_argument_group(
        "many classes",
        "With --classes or --all-classes (instead of --class-id), --out receives one folder "
        "per class under classes/ and index.html, a searchable site of all classes; rerunning "
        "the same command skips the classes already done. --images must then be an .npz with "
        "a 'labels' array, or a folder with one sub-folder of images per class (class k is "
        "the k-th sub-folder in sorted order, as Keras' image_dataset_from_directory counts).",
    )
    group.add_argument("--classes", metavar="IDS", type=str, default=None,
                       help="class ids and ranges, e.g. 0-999 or 1,7,8")
    group.add_argument("--all-classes", action="store_true",
                       help="every class of the model that has images")
    group.add_argument("--workers", metavar="N", type=_positive_int, default=1,
                       help="processes explaining classes at once (1: in this process)")
    group.add_argument("--executor", choices=("processes", "ray"), default="processes",
                       help="with --workers > 1: a pool of spawned processes, or Ray actors "
                            "(pip install 'xcraft[ray]')")
    group.add_argument("--threads-per-worker", metavar="T", type=_nonnegative_int, default=0,
                       help="TensorFlow threads in each worker (0: the cores / --workers)")


@dataclass(frozen=True)
class FolderClassImages:
    """Class k's images from the k-th sub-folder of ``root``, read by whichever worker runs k.

    Parameters
    ----------
    root : str
    folders : tuple of str
        The sub-folders, in class order.
    size : tuple of int
        (height, width) of the model's input.
    channels : int
    mode : str
        The preprocessing (``--preprocess``).
    max_images : int
        Images per class.
    """

    root: str
    folders: tuple
    size: tuple
    channels: int
    mode: str
    max_images: int

    def _names(self, class_id):
        folder = os.path.join(self.root, self.folders[class_id])
        return folder, sorted(name for name in os.listdir(folder)
                              if name.lower().endswith(IMAGE_EXTENSIONS))[: self.max_images]

    def __call__(self, class_id):
        from xcraft._cli_common import _preprocess

        folder, _ = self._names(class_id)
        images, _ = _read_folder(folder, self.size, self.channels)
        images, _ = _preprocess(images[: self.max_images], self.mode)
        return images

    def fingerprint(self, class_id):
        """Names, sizes and modification times: a changed file redoes its class."""
        folder, names = self._names(class_id)
        digest = hashlib.sha256(self.mode.encode())
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        return digest.hexdigest()


def _class_folders(root):
    return tuple(sorted(name for name in os.listdir(root)
                        if os.path.isdir(os.path.join(root, name)) and not name.startswith(".")))


def _images_and_classes(args, size, channels, n_classes):
    """(images or a per-class source, labels or None, classes, class names, display mode)."""
    import numpy as np

    from xcraft._cli_common import _fit_to_model, _preprocess, _read_npz

    path = args.images
    requested = None if args.all_classes else parse_classes(args.classes)
    if requested is not None and max(requested) >= n_classes:
        raise CliError(f"--classes must be in 0..{n_classes - 1} (the model has {n_classes} "
                       f"outputs), got {max(requested)}.")
    if os.path.isdir(path):
        folders = _class_folders(path)
        if not folders:
            raise CliError(f"--images {path!r} must hold one sub-folder of images per class for "
                           f"--classes / --all-classes; it has no sub-folder.")
        classes = list(range(min(len(folders), n_classes))) if requested is None else requested
        beyond = [k for k in classes if k >= len(folders)]
        if beyond:
            raise CliError(f"--images {path!r} has {len(folders)} class sub-folders, so no "
                           f"class {beyond[0]}.")
        mode = args.preprocess or "0-1"
        source = FolderClassImages(os.path.abspath(path), folders, tuple(size), channels, mode,
                                   args.max_images)
        return source, None, classes, {k: folders[k] for k in classes}, mode
    if not path.lower().endswith(".npz"):
        raise CliError(f"--images must be a folder of class sub-folders or an .npz file, got "
                       f"{path!r}.")
    images, labels, integer_pixels = _read_npz(path)
    if labels is None:
        raise CliError(f"--classes / --all-classes need the .npz file {path!r} to hold a "
                       f"'labels' array (one class id per image).")
    present = sorted(int(k) for k in np.unique(labels))
    classes = [k for k in present if 0 <= k < n_classes] if requested is None else requested
    absent = [k for k in classes if k not in present]
    if absent:
        raise CliError(f"no image of {path!r} is labelled {absent[0]} (labels found: "
                       f"{', '.join(map(str, present[:20]))}).")
    keep = np.isin(labels, classes)
    images = _fit_to_model(images[keep], size, channels)
    mode = args.preprocess or ("0-1" if integer_pixels else "none")
    images, _ = _preprocess(images.astype(np.float32), mode)
    names = {k: f"class {k}" for k in classes}
    return images, labels[keep], classes, names, mode


def print_run(result, out):
    """The one-line tally of a many-class run and where its site is."""
    print(f"{len(result.done)} classes explained, {len(result.skipped)} already done, "
          f"{len(result.failed)} failed, in {result.seconds:.1f} s")
    print(f"site: {os.path.join(out, 'index.html')}")


def run_classes(args, model_path, size, channels, n_classes, progress):
    """Run ``explain`` over many classes; return None (the run prints its own summary)."""
    from xcraft.craft.runner import explain_classes, spawn_pool

    images, labels, classes, names, mode = _images_and_classes(args, size, channels, n_classes)
    if args.class_name is not None:
        raise CliError("--class-name names one class: use it with --class-id, not --classes.")
    progress(f"{len(classes)} classes to explain at {args.layer!r} into {args.out!r}")
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // args.workers)
    executor, pool = "inprocess", None
    if args.workers > 1 and args.executor == "processes":
        pool = executor = spawn_pool(args.workers)
    elif args.workers > 1:
        executor = "ray"
    early = args.early_layer if args.sub_concepts else None
    try:
        result = explain_classes(
            model_path, args.layer, images, labels,
            classes, args.out, class_names=names, images_per_class=args.max_images,
            number_of_concepts=args.number_of_concepts, patch_size=args.patch_size,
            batch_size=args.batch_size, nb_design=args.nb_design, n_bootstrap=args.n_bootstrap,
            early_layer=early, sub_concepts=args.sub_concepts, percentile=args.percentile,
            craft_params={"patches_per_image": args.patches_per_image},
            report_params={"fidelity": args.fidelity}, display_mode=mode,
            random_state=args.seed, executor=executor, num_workers=args.workers,
            cpus_per_worker=threads, overwrite=args.overwrite, progress=not args.quiet,
            clean_legacy_config=args.clean_legacy_config,
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    print_run(result, args.out)
    if result.failed:
        listed = "; ".join(f"class {k}: {_one_line(message)}"
                           for k, message in list(result.failed.items())[:5])
        raise CliError(f"{len(result.failed)} of {len(classes)} classes failed ({listed}); "
                       f"rerun the same command to retry them, the others are kept.")
    print(f"the classes are in {os.path.join(args.out, 'classes')}", file=sys.stderr)
    return None
