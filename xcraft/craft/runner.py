"""Explain many classes of one model: in this process, in a process pool or on Ray, with resume.

A run writes one folder::

    out_dir/
      run.json                  settings, their hash, the classes and what became of each
      classes/class_<k>/        one finished class, renamed into place only when complete:
          result/               CraftTf.save of the fitted class
          report.html           its self-contained page (summary.json beside it)
          card.json, bank.npz   what the site index shows and compares (xcraft.viz.site)
          done.json             written last: the class's settings key and timings
      index.html                the site of all classes

Every class is a task that needs only small, picklable things: the class id, the path of its
folder, the settings, and *sources* of the model and of the images that the worker resolves
itself (a ``.keras`` path or a builder function, loaded once per worker process; images
memory-mapped from one ``.npy`` written once, or read by the worker from a per-class
callable). Nothing large crosses a process boundary, in either direction: a worker returns a
one-line status, and its result is on disk.

Resume: a class whose ``done.json`` holds the key of the current settings is skipped. A class
is written under a temporary name and renamed, so a killed worker leaves no half class (the
temporary is swept by the next run) and loses only the classes in flight.
"""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from xcraft import _validation as v
from xcraft.plumbing.storage import (
    atomic_directory,
    check_destination,
    json_default,
    library_versions,
    read_json,
    write_files_together,
)

__all__ = ["ArrayImages", "RunResult", "explain_classes", "load_run"]

FORMAT_VERSION = 1
RUN_FILE = "run.json"
CLASSES_DIR = "classes"
DONE_FILE = "done.json"
WORK_DIR = ".work"
RESULT_DIR = "result"
EXECUTORS = ("inprocess", "ray")

#: What the workers of this process have loaded, by source key: the model, its split halves.
_WORKER_CACHE = {}


# ---------------------------------------------------------------------------------------------
# Sources: what a worker resolves by itself
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayImages:
    """Each class's images from one ``.npy`` array, memory-mapped by every worker.

    Parameters
    ----------
    path : str
        The ``.npy`` file of all the images, shape (n, height, width, channels).
    indices : dict of int to tuple of int
        The rows of each class, in order.
    """

    path: str
    indices: dict

    def __call__(self, class_id):
        images = np.load(self.path, mmap_mode="r")
        return np.asarray(images[list(self.indices[class_id])], dtype=np.float32)

    def fingerprint(self, class_id):
        """Hash of the class's rows (their bytes), so changed images redo the class."""
        digest = hashlib.sha256(np.ascontiguousarray(self(class_id)).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class _InMemoryImages:
    """Images held by this process (in-process and thread executors only)."""

    images: np.ndarray = field(repr=False)
    indices: dict = field(repr=False)

    def __call__(self, class_id):
        return np.asarray(self.images[list(self.indices[class_id])], dtype=np.float32)

    def fingerprint(self, class_id):
        return hashlib.sha256(np.ascontiguousarray(self(class_id)).tobytes()).hexdigest()


def _callable_name(function):
    module = getattr(function, "__module__", None) or "?"
    name = getattr(function, "__qualname__", None) or type(function).__name__
    return f"{module}.{name}"


@dataclass(frozen=True)
class _ModelSource:
    """A model as a worker can get it: a file path, a builder function, or (in-process) itself."""

    kind: str  # "path", "builder" or "object"
    value: object = field(repr=False)
    key: str = ""
    clean_legacy_config: bool = False

    def load(self):
        """The model (logits), cached per worker process."""
        cached = _WORKER_CACHE.get(("model", self.key))
        if cached is not None:
            return cached
        if self.kind == "path":
            from xcraft.plumbing.loading import load_model

            model, _ = load_model(self.value, clean_legacy_config=self.clean_legacy_config)
        elif self.kind == "builder":
            model = self.value()
        else:
            model = self.value
        from xcraft.plumbing.split import logits_model

        model, removed = logits_model(model)
        cached = (model, removed)
        _WORKER_CACHE[("model", self.key)] = cached
        return cached

    def split(self, layer):
        """g and h at ``layer``, cached so that every class of a worker reuses their traces."""
        cached = _WORKER_CACHE.get(("split", self.key, layer))
        if cached is None:
            from xcraft.plumbing.split import split_model

            model, _ = self.load()
            cached = split_model(model, layer)
            _WORKER_CACHE[("split", self.key, layer)] = cached
        return cached


def _file_digest(path):
    digest = hashlib.sha256()
    if os.path.isdir(path):  # a SavedModel: every file's bytes, in a fixed order
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                digest.update(name.encode())
                with open(os.path.join(root, name), "rb") as file:
                    for block in iter(lambda: file.read(1 << 20), b""):
                        digest.update(block)
        return digest.hexdigest()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_source(model, clean_legacy_config):
    if isinstance(model, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(model))
        if not os.path.exists(path):
            raise ValueError(f"`model` must be a Keras model, a model file or a builder "
                             f"function, got the path {path!r}, which does not exist.")
        return _ModelSource("path", path, f"file:{_file_digest(path)}", clean_legacy_config)
    if hasattr(model, "layers") and hasattr(model, "weights"):
        from xcraft.plumbing.shapes import model_fingerprint

        fingerprint = model_fingerprint(model)
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True,
                                        default=json_default).encode()).hexdigest()
        return _ModelSource("object", model, f"model:{key}")
    if callable(model):
        return _ModelSource("builder", model, f"builder:{_callable_name(model)}")
    raise TypeError(
        f"`model` must be a keras.Model, the path of a model file (.keras or HDF5) or a "
        f"function returning a model, got {type(model).__name__}."
    )


# ---------------------------------------------------------------------------------------------
# One class, in whichever process runs it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    class_id: int
    class_name: str
    class_dir: str
    key: str
    model: _ModelSource
    images: object
    settings: dict
    threads: int = 0


def _set_threads(threads):
    """Give a worker process its slice of the cores, before TensorFlow starts its pools."""
    if not threads or _WORKER_CACHE.get("threads") is not None:
        return
    # In a fresh worker, absl's start-up lines stay quiet.
    from xcraft._tensorflow import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already runs in this process: keep its pools
        pass
    _WORKER_CACHE["threads"] = threads


def _explain(task):
    """Fit, estimate importances and (optionally) decompose one class; return the estimator."""
    from xcraft.craft.estimator import CraftTf

    settings = task.settings
    images = task.images(task.class_id)
    if len(images) == 0:
        raise ValueError(f"class {task.class_id} has no images.")
    model, removed = task.model.load()
    g, h = task.model.split(settings["layer"])
    craft = CraftTf(g, h, **settings["craft"])
    craft._source_model = model
    craft._source_layer = settings["layer"]
    craft._source_logits = removed is not None
    craft.fit(images, class_id=task.class_id)
    craft.estimate_importance(**settings["importance"])
    early_layer = settings.get("early_layer")
    decompose = settings.get("decompose") or {}
    note = None
    if early_layer is not None and decompose.get("number_of_concepts"):
        top = int(craft.sensitivity.most_important_concepts[0])
        try:
            craft.decompose(top, early_layer, **decompose)
        except ValueError as err:  # too few strong crops: the class goes on without a tree
            note = f"C{top} was not decomposed: {err}"
    return craft, len(images), note


def _write_class(task, craft, n_images, note, seconds):
    from xcraft.craft.io import save_craft
    from xcraft.viz.report import write_report

    report = dict(task.settings.get("report") or {})
    mode = task.settings.get("display_mode")
    if mode is not None:
        from xcraft._cli_common import _preprocess

        report["display"] = _preprocess(np.zeros((0, 1, 1, craft.images_.shape[-1]),
                                                  np.float32), mode)[1]
    if os.path.isdir(task.class_dir) and not os.path.isfile(
            os.path.join(task.class_dir, DONE_FILE)):
        # Not a finished class (done.json is written inside the renamed folder, so only a
        # hand-edited folder lacks it): nothing in it is worth keeping over a fresh result.
        shutil.rmtree(task.class_dir)
    with atomic_directory(task.class_dir, marker=DONE_FILE, overwrite=True) as tmp:
        write_report({task.class_id: craft}, tmp, class_names={task.class_id: task.class_name},
                     title=f"xcraft: {task.class_name}", **report)
        save_craft(craft, os.path.join(tmp, RESULT_DIR))
        try:
            from xcraft.viz.site import write_class_card
        except ImportError:  # the site module is optional for a class's own folder
            write_class_card = None
        if write_class_card is not None:
            write_class_card(craft, tmp, class_id=task.class_id, class_name=task.class_name)
        done = {
            "format_version": FORMAT_VERSION,
            "kind": "xcraft class",
            "class_id": task.class_id,
            "class_name": task.class_name,
            "key": task.key,
            "n_images": int(n_images),
            "seconds": round(seconds, 3),
            "note": note,
            "versions": library_versions(),
        }
        with open(os.path.join(tmp, DONE_FILE), "w", encoding="utf-8") as file:
            json.dump(done, file, indent=2, default=json_default)


def _run_task(task):
    """Explain one class and save it; never raise, so one failure cannot lose the others."""
    start = time.perf_counter()
    try:
        _set_threads(task.threads)
        craft, n_images, note = _explain(task)
        _write_class(task, craft, n_images, note, time.perf_counter() - start)
    except BaseException as err:  # noqa: BLE001 - reported with the class id, run goes on
        if isinstance(err, KeyboardInterrupt):
            raise
        return {"class_id": task.class_id, "status": "failed",
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
                "seconds": round(time.perf_counter() - start, 3)}
    return {"class_id": task.class_id, "status": "done",
            "seconds": round(time.perf_counter() - start, 3), "note": note}


# ---------------------------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------------------------


def _run_inprocess(tasks):
    for task in tasks:
        yield task, _run_task(task)


def _lost(task, err):
    return {"class_id": task.class_id, "status": "failed",
            "error": f"the worker running class {task.class_id} stopped: "
                     f"{type(err).__name__}: {err}", "traceback": None, "seconds": None}


def _run_futures(tasks, executor):
    futures = {executor.submit(_run_task, task): task for task in tasks}
    for future in concurrent.futures.as_completed(futures):
        task = futures[future]
        try:
            result = future.result()
        except Exception as err:  # noqa: BLE001 - a dead worker process, a pickling error
            result = _lost(task, err)
        yield task, result


class _RayWorker:
    """One Ray actor: loads the model once (on first task) and explains classes in turn."""

    def __init__(self, threads):
        self.threads = threads

    def run(self, task):
        return _run_task(task)


def _run_ray(tasks, num_workers, cpus_per_worker, gpus_per_worker):
    try:
        import ray
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "executor='ray' needs Ray: `pip install 'xcraft[ray]'` (or `pip install ray`)."
        ) from None
    if not ray.is_initialized():
        ray.init(num_cpus=num_workers * cpus_per_worker, include_dashboard=False,
                 log_to_driver=False)
    actor_class = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_RayWorker)
    pending_tasks = list(tasks)
    actors = [actor_class.remote(cpus_per_worker) for _ in range(min(num_workers,
                                                                      len(pending_tasks)))]
    running = {}
    for actor in actors:
        if pending_tasks:
            task = pending_tasks.pop(0)
            running[actor.run.remote(task)] = (actor, task)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        actor, task = running.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as err:  # noqa: BLE001 - the actor died (killed, out of memory)
            result = _lost(task, err)
            actor = actor_class.remote(cpus_per_worker)  # its replacement takes the next class
        yield task, result
        if pending_tasks:
            next_task = pending_tasks.pop(0)
            running[actor.run.remote(next_task)] = (actor, next_task)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What :func:`explain_classes` did.

    Attributes
    ----------
    out_dir : str
    done : list of int
        Classes explained by this call.
    skipped : list of int
        Classes an earlier run had already explained with the same settings.
    failed : dict of int to str
        Classes that failed, with the error (the other classes are kept).
    seconds : float
    """

    out_dir: str
    done: list
    skipped: list
    failed: dict
    seconds: float

    def class_dir(self, class_id):
        """The folder of one class's result, report and card."""
        return os.path.join(self.out_dir, CLASSES_DIR, f"class_{int(class_id)}")


def _key(settings, model_key, image_fingerprint, class_id):
    text = json.dumps({"settings": settings, "model": model_key, "images": image_fingerprint,
                       "class_id": class_id}, sort_keys=True, default=json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_done(class_dir, key):
    path = os.path.join(class_dir, DONE_FILE)
    if not os.path.isfile(path):
        return False
    try:
        return read_json(path).get("key") == key
    except ValueError:
        return False


def _class_names(class_names, classes):
    if class_names is None:
        return {k: f"class {k}" for k in classes}
    if isinstance(class_names, dict):
        return {k: str(class_names.get(k, f"class {k}")) for k in classes}
    names = list(class_names)
    return {k: str(names[k]) if 0 <= k < len(names) else f"class {k}" for k in classes}


def _check_executor(executor, model_source):
    if isinstance(executor, str):
        v.check_choice(executor, "executor", EXECUTORS)
        if executor == "ray" and model_source.kind == "object":
            return "save"
        return executor
    if isinstance(executor, concurrent.futures.ProcessPoolExecutor):
        context = getattr(executor, "_mp_context", None)
        method = context.get_start_method() if context is not None else None
        if method == "fork" and "tensorflow" in sys.modules:
            raise ValueError(
                "`executor` is a ProcessPoolExecutor that forks, but TensorFlow is loaded in "
                "this process and a forked copy of its thread pools hangs. Create it with "
                "`mp_context=multiprocessing.get_context('spawn')`."
            )
        return "save" if model_source.kind == "object" else "futures"
    if isinstance(executor, concurrent.futures.Executor):
        return "futures"
    raise TypeError(
        f"`executor` must be 'inprocess', 'ray' or a concurrent.futures.Executor, got "
        f"{type(executor).__name__}."
    )


def _saved_model_source(model_source, work_dir):
    """Save an in-memory model once for workers in other processes to load."""
    path = os.path.join(work_dir, "model.keras")
    if not os.path.exists(path):
        tmp = os.path.join(work_dir, f".model-{os.getpid()}.keras")
        model_source.value.save(tmp)
        os.replace(tmp, path)
    return _ModelSource("path", path, model_source.key)


def _array_source(images, indices, work_dir, in_process):
    if in_process:
        return _InMemoryImages(images, indices)
    path = os.path.join(work_dir, "images.npy")
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    stamp = os.path.join(work_dir, "images.sha256")
    current = None
    if os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as file:
            current = file.read().strip()
    if current != digest or not os.path.isfile(path):
        tmp = os.path.join(work_dir, f".images-{os.getpid()}.npy")
        np.save(tmp, np.asarray(images, np.float32))
        os.replace(tmp, path)
        with open(stamp + ".tmp", "w", encoding="utf-8") as file:
            file.write(digest)
        os.replace(stamp + ".tmp", stamp)
    return ArrayImages(path, indices)


def _write_run(out_dir, run):
    write_files_together(out_dir, {RUN_FILE: json.dumps(run, indent=2, default=json_default)
                                   + "\n"})


def explain_classes(
    model,
    layer,
    images,
    labels=None,
    classes=None,
    out_dir="xcraft-classes",
    *,
    class_names=None,
    images_per_class=None,
    number_of_concepts=10,
    patch_size=64,
    batch_size=64,
    nb_design=32,
    n_bootstrap=0,
    early_layer=None,
    sub_concepts=0,
    percentile=90,
    craft_params=None,
    report_params=None,
    display_mode=None,
    random_state=0,
    executor="inprocess",
    num_workers=None,
    cpus_per_worker=1,
    gpus_per_worker=0,
    site=True,
    overwrite=False,
    progress=True,
    clean_legacy_config=False,
):
    """Explain every class of interest with CRAFT, one resumable task per class.

    Each class is fitted (NMF concepts at ``layer``), its global importances estimated (Sobol),
    its most important concept optionally decomposed at ``early_layer``, and the class saved
    with its report under ``out_dir/classes/class_<k>``; then ``out_dir/index.html`` lists
    them all (see :mod:`xcraft.viz.site`). Results are the same, bit for bit, whichever
    executor runs them: every class uses ``random_state`` and nothing but its own images.

    Parameters
    ----------
    model : keras.Model, str or callable
        The classifier (a softmax at its end is left out, as CRAFT explains logits): a model
        (in-process, threads; saved once to ``out_dir/.work/model.keras`` for other
        processes), the path of a ``.keras``/HDF5 file, or a picklable function returning
        the model, called once per worker.
    layer : str or int
        The split layer (:func:`xcraft.split_model`).
    images : ndarray of shape (n, height, width, channels) or callable
        All the images with their ``labels``; or a picklable function ``class_id -> images``
        (for data too large for memory, e.g. reading one folder per class).
    labels : ndarray of shape (n,), default=None
        Class ids of ``images`` (needed when ``images`` is an array).
    classes : sequence of int, default=None
        The classes to explain; None for every class in ``labels``.
    out_dir : str or os.PathLike, default="xcraft-classes"
        New, empty, or an earlier run (resumed); another folder is refused unless ``overwrite``.
    class_names : sequence or dict of str, default=None
    images_per_class : int, default=None
        Use at most the first this many images of a class (array ``images`` only).
    number_of_concepts, patch_size, batch_size
        As in :class:`xcraft.CraftTf`.
    nb_design, n_bootstrap
        As in :meth:`xcraft.CraftTf.estimate_importance`.
    early_layer : str or int, default=None
        Decompose each class's most important concept there into ``sub_concepts``.
    sub_concepts : int, default=0
    percentile : float, default=90
        Crops kept for the decomposition (:meth:`xcraft.CraftTf.decompose`).
    craft_params : dict, default=None
        More :class:`xcraft.CraftTf` arguments (``crops``, ``solver``, ...).
    report_params : dict, default=None
        Arguments of :func:`xcraft.viz.report.write_report` for every class's page
        (``fidelity``, ...; JSON-ready ones only, since they cross processes).
    display_mode : str, default=None
        How the reports show model inputs as pixels: the name of the preprocessing the images
        went through (as ``xcraft explain --preprocess``: ``"0-1"``, ``"-1-1"``, ``"caffe"``,
        ``"torch"``, ``"0-1-bgr"``), undone for display; None rescales by min and max.
    random_state : int, default=0
        Seed of every class.
    executor : {"inprocess", "ray"} or concurrent.futures.Executor, default="inprocess"
        Where classes run. ``"ray"`` starts ``num_workers`` actors (Ray is the optional extra
        ``xcraft[ray]``), each with ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs, each
        loading the model once. A ``ProcessPoolExecutor`` must spawn (not fork) its workers.
    num_workers : int, default=None
        Ray actors; None for one per ``cpus_per_worker`` slice of this machine's cores (or per
        GPU when ``gpus_per_worker``).
    cpus_per_worker : int, default=1
        Threads TensorFlow uses in each Ray or process worker.
    gpus_per_worker : float, default=0
    site : bool, default=True
        Write ``index.html`` when the classes are done.
    overwrite : bool, default=False
        Write into a non-empty folder that is not an xcraft run (its files are kept).
    progress : bool, default=True
        A progress bar over classes (with its ETA) on stderr.
    clean_legacy_config : bool, default=False
        Passed to :func:`xcraft.plumbing.loading.load_model` for a model file.

    Returns
    -------
    RunResult
        The classes done, skipped (already done with these settings) and failed (with their
        errors; the others are kept). Load one with :func:`load_run`.

    Raises
    ------
    ValueError, TypeError
        On bad arguments, before any class starts.
    """
    start = time.perf_counter()
    model_source = _model_source(model, clean_legacy_config)
    mode = _check_executor(executor, model_source)
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_destination(out_dir, marker=RUN_FILE, overwrite=overwrite)
    classes, image_source_of = _check_images(images, labels, classes, images_per_class)
    names = _class_names(class_names, classes)
    settings = _settings(layer, early_layer, number_of_concepts, patch_size, batch_size,
                         nb_design, n_bootstrap, sub_concepts, percentile, craft_params,
                         report_params, random_state)
    settings["display_mode"] = display_mode
    work_dir = os.path.join(out_dir, WORK_DIR)
    os.makedirs(work_dir, exist_ok=True)
    in_process = mode == "inprocess" or (mode == "futures" and not isinstance(
        executor, concurrent.futures.ProcessPoolExecutor))
    if mode == "save":
        model_source = _saved_model_source(model_source, work_dir)
    image_source = image_source_of(work_dir, in_process)

    threads = 0 if in_process else int(cpus_per_worker)
    tasks, skipped = [], []
    for class_id in classes:
        class_dir = os.path.join(out_dir, CLASSES_DIR, f"class_{class_id}")
        fingerprint = image_source.fingerprint(class_id) if hasattr(
            image_source, "fingerprint") else _callable_name(image_source)
        key = _key(settings, model_source.key, fingerprint, class_id)
        if _is_done(class_dir, key):
            skipped.append(class_id)
            continue
        tasks.append(_Task(class_id, names[class_id], class_dir, key, model_source,
                           image_source, settings, threads))
    run = {
        "format_version": FORMAT_VERSION,
        "kind": "xcraft classes",
        "settings": settings,
        "model": model_source.key,
        "classes": classes,
        "class_names": {str(k): names[k] for k in classes},
        "status": "running",
        "versions": library_versions(),
    }
    _write_run(out_dir, run)

    if mode == "inprocess":
        results = _run_inprocess(tasks)
    elif mode == "ray" or (mode == "save" and executor == "ray"):
        workers = num_workers or _default_workers(cpus_per_worker, gpus_per_worker)
        results = _run_ray(tasks, int(workers), int(cpus_per_worker), gpus_per_worker)
    else:
        results = _run_futures(tasks, executor)

    done, failed = [], {}
    bar = _bar(len(tasks), progress)
    try:
        for task, result in results:
            if result["status"] == "done":
                done.append(task.class_id)
            else:
                failed[task.class_id] = result["error"]
                print(f"xcraft: class {task.class_id} ({task.class_name}) failed: "
                      f"{result['error']}", file=sys.stderr)
            if bar is not None:
                bar.set_postfix_str(f"class {task.class_id}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    run.update(status="finished", done=sorted(done + skipped),
               failed={str(k): message for k, message in sorted(failed.items())})
    _write_run(out_dir, run)
    if not failed:  # the copies made for workers are needed again only to retry a class
        shutil.rmtree(work_dir, ignore_errors=True)
    if site:
        try:
            from xcraft.viz.site import write_site
        except ImportError:
            write_site = None
        if write_site is not None:
            write_site(out_dir, class_ids=classes, class_names={k: names[k] for k in classes})
    return RunResult(out_dir, sorted(done), sorted(skipped), dict(sorted(failed.items())),
                     time.perf_counter() - start)


def _default_workers(cpus_per_worker, gpus_per_worker):
    if gpus_per_worker:
        try:
            import tensorflow as tf

            gpus = len(tf.config.list_physical_devices("GPU"))
        except ImportError:
            gpus = 0
        if gpus:
            return max(1, int(gpus / gpus_per_worker))
    return max(1, (os.cpu_count() or 1) // max(1, int(cpus_per_worker)))


def _bar(total, progress):
    if not progress or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="classes", unit="class", file=sys.stderr)


def _settings(layer, early_layer, number_of_concepts, patch_size, batch_size, nb_design,
              n_bootstrap, sub_concepts, percentile, craft_params, report_params, random_state):
    if not isinstance(layer, (str, int)) or isinstance(layer, bool):
        raise TypeError(f"`layer` must be a layer name or index, got {type(layer).__name__}.")
    craft = {
        "number_of_concepts": v.check_positive_int(number_of_concepts, "number_of_concepts"),
        "patch_size": v.check_positive_int(patch_size, "patch_size"),
        "batch_size": v.check_positive_int(batch_size, "batch_size"),
        "random_state": random_state,
        "verbose": False,  # one bar over classes, not a bar per class and stage
    }
    if not isinstance(random_state, int) or isinstance(random_state, bool):
        raise TypeError(
            f"`random_state` must be an int (every class, in every worker, uses it), got "
            f"{type(random_state).__name__}."
        )
    for name, value in (("craft_params", craft_params), ("report_params", report_params)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"`{name}` must be a dict, got {type(value).__name__}.")
    extra = dict(craft_params or {})
    clash = sorted(set(extra) & (set(craft) - {"verbose"} | {"input_to_latent_model",
                                               "latent_to_logit_model"}))
    if clash:
        raise ValueError(f"`craft_params` must not repeat arguments given directly, got "
                         f"{clash}.")
    craft.update(extra)
    settings = {
        "layer": layer,
        "early_layer": early_layer,
        "craft": craft,
        "importance": {"nb_design": v.check_positive_int(nb_design, "nb_design"),
                       "n_bootstrap": int(n_bootstrap)},
        "decompose": ({"number_of_concepts": int(sub_concepts), "percentile": percentile,
                       "nb_design": max(8, int(nb_design) // 2),
                       "n_bootstrap": int(n_bootstrap)}
                      if early_layer is not None and sub_concepts else None),
        "report": dict(report_params or {}),
    }
    try:
        json.dumps(settings, default=json_default)
    except TypeError as err:
        raise TypeError(f"Every setting must be JSON-ready, so that a rerun can tell it is the "
                        f"same run: {err}.") from None
    return settings


def _check_images(images, labels, classes, images_per_class):
    """Return the classes and a function (work_dir, in_process) -> image source."""
    if images_per_class is not None:
        images_per_class = v.check_positive_int(images_per_class, "images_per_class")
    if callable(images) and not isinstance(images, np.ndarray):
        if classes is None:
            raise ValueError("`classes` must be given when `images` is a function of the class.")
        classes = _check_classes(classes)
        return classes, lambda work_dir, in_process: images
    images = v.check_images(images, "images")
    if labels is None:
        raise ValueError("`labels` must be given with an array of `images` (one class id per "
                         "image).")
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels.argmax(axis=1)
    if labels.shape != (len(images),):
        raise ValueError(f"`labels` must have shape ({len(images)},) to match `images`, got "
                         f"{labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise TypeError(f"`labels` must hold class ids, got dtype {labels.dtype}.")
        labels = labels.astype(np.int64)
    classes = _check_classes(np.unique(labels).tolist() if classes is None else classes)
    indices = {}
    for class_id in classes:
        rows = np.flatnonzero(labels == class_id)
        if len(rows) == 0:
            raise ValueError(f"`classes` holds {class_id}, but no image is labelled {class_id}.")
        indices[class_id] = tuple(int(i) for i in rows[:images_per_class])
    return classes, lambda work_dir, in_process: _array_source(images, indices, work_dir,
                                                               in_process)


def _check_classes(classes):
    try:
        values = [int(c) for c in classes]
    except (TypeError, ValueError):
        raise TypeError(f"`classes` must be a sequence of class ids, got {classes!r}.") from None
    if any(c < 0 for c in values) or any(int(c) != c for c in classes):
        raise ValueError(f"`classes` must hold non-negative integer class ids, got {classes!r}.")
    if not values:
        raise ValueError("`classes` must hold at least one class id, got none.")
    return list(dict.fromkeys(values))


def load_run(out_dir, class_id, input_to_latent_model=None, latent_to_logit_model=None, *,
             model=None, layer=None):
    """Load one class of a run as a fitted :class:`xcraft.CraftTf`.

    Parameters
    ----------
    out_dir : str or os.PathLike
        The folder :func:`explain_classes` wrote.
    class_id : int
    input_to_latent_model, latent_to_logit_model : keras.Model, default=None
        g and h; or give ``model`` (and ``layer``, default the run's) to split it here.
    model : keras.Model, default=None
    layer : str or int, default=None

    Returns
    -------
    CraftTf
    """
    from xcraft.craft.estimator import CraftTf
    from xcraft.plumbing.split import logits_model, split_model

    out_dir = os.fspath(out_dir)
    run = read_json(os.path.join(out_dir, RUN_FILE))
    class_dir = os.path.join(out_dir, CLASSES_DIR, f"class_{int(class_id)}")
    if not os.path.isfile(os.path.join(class_dir, DONE_FILE)):
        done = run.get("done", [])
        raise ValueError(f"class {class_id} is not done in the run at {out_dir!r} (done: "
                         f"{done}).")
    if input_to_latent_model is None or latent_to_logit_model is None:
        if model is None:
            raise ValueError("Give `input_to_latent_model` and `latent_to_logit_model`, or "
                             "`model`.")
        model, _ = logits_model(model)
        input_to_latent_model, latent_to_logit_model = split_model(
            model, run["settings"]["layer"] if layer is None else layer)
    return CraftTf.load(os.path.join(class_dir, RESULT_DIR), input_to_latent_model,
                        latent_to_logit_model, model=model)


def spawn_pool(max_workers):
    """A process pool whose workers start fresh (TensorFlow does not survive a fork)."""
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"))
