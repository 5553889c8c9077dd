"""`CraftManagerTf`: one `CraftTf` per class, a drop-in for ``xplique.concepts.CraftManagerTf``.

Explaining every class is embarrassingly parallel, so the classes go through a pluggable
``executor``: in-process by default, or any ``map``-like callable (a thread pool, a Ray actor
pool, ...). Unlike Xplique, which silently selects each class's images by the model's
predictions and ignores the labels it is given, images are chosen by their labels unless
``use_predictions=True``.
"""

import concurrent.futures
import json
import os

import numpy as np

from xcraft import _validation as v
from xcraft.craft.estimator import CraftTf
from xcraft.craft.io import FORMAT_VERSION, read_metadata, save_craft
from xcraft.plumbing.activations import batched_activations, call_model
from xcraft.plumbing.storage import atomic_directory, load_npz, read_result_metadata

__all__ = ["CraftManagerTf"]

MANAGER_FILE = "manager.json"
LABELS_FILE = "labels.npz"


class CraftManagerTf:
    """Fit and compare the concepts of several classes of one classifier.

    Parameters
    ----------
    input_to_latent_model : keras.Model
        g: images to non-negative activations.
    latent_to_logit_model : keras.Model
        h: activations to logits.
    inputs : ndarray of shape (n_images, height, width, channels)
        Images of all the classes.
    labels : ndarray of shape (n_images,) or (n_images, n_classes)
        Class ids, or one-hot / score rows (their argmax is used).
    list_of_class_of_interest : list of int, default=None
        The classes to explain; None for every class in ``labels``.
    number_of_concepts, batch_size, patch_size
        As in :class:`xcraft.CraftTf`.
    use_predictions : bool, default=False
        Select each class's images by the model's predictions instead of the labels (what
        Xplique does).
    executor : None, "inprocess", concurrent.futures.ThreadPoolExecutor or callable
        Where the classes run: in turn (None, ``"inprocess"``), on a thread pool (TensorFlow
        releases the GIL in its kernels), or any ``executor(function, items)`` returning an
        iterable of results like ``map``. The estimators live in this process, so process
        pools and Ray are refused here: :func:`xcraft.explain_classes` runs classes in other
        processes (each loading the model once), with checkpoints and resume.
    **craft_kwargs
        Extra keyword arguments of :class:`xcraft.CraftTf` (``crops``, ``random_state``, ...).

    Attributes
    ----------
    craft_instances : dict of int to CraftTf
        One estimator per class of interest.
    """

    def __init__(
        self,
        input_to_latent_model,
        latent_to_logit_model,
        inputs,
        labels,
        list_of_class_of_interest=None,
        number_of_concepts=20,
        batch_size=64,
        patch_size=64,
        *,
        use_predictions=False,
        executor=None,
        **craft_kwargs,
    ):
        self.input_to_latent_model = input_to_latent_model
        self.latent_to_logit_model = latent_to_logit_model
        self.inputs = v.check_images(inputs, "inputs")
        self.labels = self._check_labels(labels, len(self.inputs))
        if list_of_class_of_interest is None:
            list_of_class_of_interest = np.unique(self.labels).tolist()
        self.list_of_class_of_interest = [int(c) for c in list_of_class_of_interest]
        self.number_of_concepts = number_of_concepts
        self.batch_size = batch_size
        self.patch_size = patch_size
        self.use_predictions = use_predictions
        self.executor = executor
        self.craft_kwargs = craft_kwargs
        self.craft_instances = {
            class_id: CraftTf(
                input_to_latent_model,
                latent_to_logit_model,
                number_of_concepts,
                batch_size,
                patch_size,
                **craft_kwargs,
            )
            for class_id in self.list_of_class_of_interest
        }

    @staticmethod
    def _check_labels(labels, n_images):
        labels = np.asarray(labels)
        if labels.ndim == 2:
            labels = labels.argmax(axis=1)
        if labels.ndim != 1 or len(labels) != n_images:
            raise ValueError(
                f"`labels` must have shape ({n_images},) or ({n_images}, n_classes) to match "
                f"`inputs`, got shape {np.shape(labels)}."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.all(np.equal(np.mod(labels, 1), 0)):
                raise TypeError(f"`labels` must hold class ids, got dtype {labels.dtype}.")
            labels = labels.astype(np.int64)
        return labels

    def compute_predictions(self):
        """Return the model's predicted class for every input (argmax of h(g(x)))."""
        activations = batched_activations(
            self.input_to_latent_model, self.inputs, batch_size=self.batch_size
        )
        logits = [
            call_model(self.latent_to_logit_model, activations[i : i + self.batch_size]).numpy()
            for i in range(0, len(activations), self.batch_size)
        ]
        return np.concatenate(logits).argmax(axis=1)

    def class_indices(self, class_id, nb_samples_per_class=None):
        """Indices of the inputs used for ``class_id`` (by labels, or predictions if asked)."""
        selector = self._selector()
        indices = np.flatnonzero(selector == class_id)
        return indices if nb_samples_per_class is None else indices[:nb_samples_per_class]

    def _selector(self):
        if not self.use_predictions:
            return self.labels
        if getattr(self, "predictions_", None) is None:
            self.predictions_ = self.compute_predictions()
        return self.predictions_

    def _map(self, function, items):
        executor = self.executor
        if executor is None or (isinstance(executor, str) and executor == "inprocess"):
            return list(map(function, items))
        if isinstance(executor, concurrent.futures.ProcessPoolExecutor) or executor == "ray":
            raise ValueError(
                "`executor` must run in this process (None, 'inprocess', a ThreadPoolExecutor "
                "or a map-like callable): the fitted estimators are kept here. To explain "
                "classes in other processes or on Ray, use xcraft.explain_classes(model, "
                "layer, images, labels, classes, out_dir, executor=...)."
            )
        if isinstance(executor, concurrent.futures.Executor):
            return list(executor.map(function, items))
        if isinstance(executor, str) or not callable(executor):
            raise TypeError(
                f"`executor` must be None, 'inprocess', a concurrent.futures.ThreadPoolExecutor "
                f"or a map-like callable, got {executor!r}."
            )
        return list(executor(function, items))

    def fit(self, nb_samples_per_class=None, alpha_w=None, verbose=False):
        """Fit one ``CraftTf`` per class of interest.

        Parameters
        ----------
        nb_samples_per_class : int, default=None
            Use at most this many images per class; None for all.
        alpha_w : None
            Xplique's NMF regularisation, accepted and ignored (see ``CraftTf.fit``).
        verbose : bool, default=False
            Print the class being fitted.

        Returns
        -------
        self
        """
        if nb_samples_per_class is not None:
            nb_samples_per_class = v.check_positive_int(
                nb_samples_per_class, "nb_samples_per_class"
            )

        def fit_one(class_id):
            indices = self.class_indices(class_id, nb_samples_per_class)
            if len(indices) == 0:
                source = "predicted as" if self.use_predictions else "labelled"
                raise ValueError(
                    f"`list_of_class_of_interest` holds class {class_id}, but no input is "
                    f"{source} {class_id}."
                )
            if verbose:
                print(f"Fitting CRAFT for class {class_id} on {len(indices)} images")
            self.craft_instances[class_id].fit(
                self.inputs[indices], class_id=class_id, alpha_w=alpha_w
            )
            return class_id

        self._selector()  # compute predictions once, before any parallel map
        self._map(fit_one, self.list_of_class_of_interest)
        return self

    def estimate_importance(self, nb_design=32, verbose=False, **kwargs):
        """Estimate every class's global concept importances.

        Returns
        -------
        dict of int to ndarray of shape (number_of_concepts,)
        """

        def estimate_one(class_id):
            if verbose:
                print(f"Estimating importances for class {class_id}")
            return class_id, self.craft_instances[class_id].estimate_importance(
                nb_design=nb_design, **kwargs
            )

        return dict(self._map(estimate_one, self.list_of_class_of_interest))

    def _craft(self, class_id):
        if class_id not in self.craft_instances:
            listed = ", ".join(str(c) for c in self.craft_instances)
            raise ValueError(f"`class_id` must be one of the classes ({listed}), got {class_id}.")
        return self.craft_instances[class_id]

    def plot_concepts_importances(self, class_id, nb_most_important_concepts=5, verbose=False):
        """Bar chart of a class's concept importances (Xplique's method)."""
        return self._craft(class_id).plot_concepts_importances(
            nb_most_important_concepts=nb_most_important_concepts, verbose=verbose
        )

    def plot_concepts_crops(self, class_id, nb_crops=10, nb_most_important_concepts=None):
        """Top crops of a class's concepts (Xplique's method)."""
        return self._craft(class_id).plot_concepts_crops(
            nb_crops=nb_crops, nb_most_important_concepts=nb_most_important_concepts
        )

    def plot_image_concepts(self, img, class_id, **kwargs):
        """One image's concept attribution maps for ``class_id`` (Xplique's method)."""
        return self._craft(class_id).plot_image_concepts(img, **kwargs)

    # ---------------------------------------------------------------------------- save/load
    def save(self, path, *, overwrite=False):
        """Save every fitted class to ``path`` (one sub-directory per class), atomically.

        ``path`` must be new, empty or an earlier manager result, unless ``overwrite=True``;
        files xcraft did not write are never deleted (see :meth:`CraftTf.save`).
        """
        def own(name):
            return name in (MANAGER_FILE, LABELS_FILE) or name.startswith("class_")

        with atomic_directory(path, marker=MANAGER_FILE, own_names=own,
                              overwrite=overwrite) as tmp:
            fitted = []
            for class_id, craft in self.craft_instances.items():
                if getattr(craft, "concept_bank_w_", None) is None:
                    continue
                class_dir = os.path.join(tmp, f"class_{class_id}")
                os.makedirs(class_dir)
                save_craft(craft, class_dir)
                fitted.append(class_id)
            np.savez_compressed(os.path.join(tmp, LABELS_FILE), labels=self.labels)
            metadata = {
                "format_version": FORMAT_VERSION,
                "kind": "CraftManagerTf",
                "classes": self.list_of_class_of_interest,
                "fitted": fitted,
                "use_predictions": bool(self.use_predictions),
                "params": {
                    "number_of_concepts": self.number_of_concepts,
                    "batch_size": self.batch_size,
                    "patch_size": self.patch_size,
                },
            }
            with open(os.path.join(tmp, MANAGER_FILE), "w", encoding="utf-8") as file:
                json.dump(metadata, file, indent=2)

    @classmethod
    def load(cls, path, input_to_latent_model, latent_to_logit_model, inputs, *, model=None):
        """Load a manager written by :meth:`save`; ``inputs`` are the images it was built on."""
        path = os.fspath(path)
        manager_file = os.path.join(path, MANAGER_FILE)
        metadata = read_result_metadata(path, MANAGER_FILE, FORMAT_VERSION,
                                        writer="`CraftManagerTf.save`")
        for key, kind in (("classes", list), ("fitted", list), ("params", dict),
                          ("use_predictions", bool)):
            if not isinstance(metadata.get(key), kind):
                raise ValueError(
                    f"The file {manager_file!r} must hold `{key}` as a JSON {kind.__name__}: "
                    f"it is corrupt."
                )
        labels_file = os.path.join(path, LABELS_FILE)
        arrays = load_npz(labels_file)
        if "labels" not in arrays:
            raise ValueError(f"The file {labels_file!r} must hold a `labels` array: it is corrupt.")
        labels = arrays["labels"]
        manager = cls(
            input_to_latent_model,
            latent_to_logit_model,
            inputs,
            labels,
            metadata["classes"],
            use_predictions=metadata["use_predictions"],
            **metadata["params"],
        )
        for class_id in metadata["fitted"]:
            class_dir = os.path.join(path, f"class_{class_id}")
            read_metadata(class_dir)
            manager.craft_instances[class_id] = CraftTf.load(
                class_dir, input_to_latent_model, latent_to_logit_model, model=model
            )
        return manager
