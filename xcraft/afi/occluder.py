"""AfI's global feature occluder and the importances it defines (Wu et al., CVPR 2020).

For N images x_i of a class y, the occluder is one perturbation δ of an image's shape that
removes what the model sees of the class in all of them:

    min_δ (1/N) Σ_i ( ℓ(x_i − δ) + m_i ℓ(t(x_i − δ)) ) + λ D(δ),     D(δ) = ‖δ‖₁,

with ℓ the class-y logit Z(·)[y] (the paper) or a margin max(Z_y − max_{k≠y} Z_k, −κ), t a
random transform (uniform noise and a small rotation, redrawn every step) and m_i = 0 for the
images whose transformed copy is already not predicted y. Occluded images are clipped into the
declared input range: δ is shared by all images, so a box constraint on δ itself would be the
intersection of every image's box and would freeze most pixels. Adam minimises the objective,
one step per pass over all the images, whose gradients are accumulated batch by batch (memory
is bounded by the batch, whatever N). The optimisation stops as soon as no x_i − δ and no
t(x_i − δ) is predicted y, or after ``max_steps`` steps.

Options beyond the paper:

- ``proximal=True``: the l1 term leaves the gradient and is applied by its proximal operator in
  Adam's metric after each step, δ ← sign(z) max(|z| − ηλ / (√v̂ + ε), 0). Coordinates whose
  loss gradient stays below λ stay exactly 0 (the lasso's optimality condition), so δ is sparse.
- ``loss="margin"``: each image stops pulling once its margin is below −κ.
- ``normalize_penalty=True``: D(δ) = ‖δ‖₁ / (H·W·C), so one λ works across image sizes.
- ``lambda_search=True``: bisection (in log λ) for the largest λ whose occluder flips at least
  ``target_flip_rate`` of the clean images.

The feature importance of a layer l (eq. 6-7) is s_l = max(mean_i f_l(x_i) − f_l(x_i − δ), 0)
per neuron; the channel importance (eq. 8) is its sum over each feature map, divided by the
largest; the meta-detector (eq. 9) is x ↦ Σ_c w_c A_c(x) with those channel weights.
"""

import numbers
import warnings

import keras
import numpy as np
import tensorflow as tf
from sklearn.base import BaseEstimator

from xcraft._validation import (
    check_choice,
    check_fraction,
    check_images,
    check_index,
    check_is_fitted,
    check_nonnegative_int,
    check_positive_int,
    check_random_state,
)
from xcraft.afi.transforms import random_transform
from xcraft.plumbing.activations import _progress, call_model
from xcraft.plumbing.split import resolve_layer

__all__ = ["AfI", "LOSSES"]

LOSSES = ("logit", "margin")
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPSILON = 0.9, 0.999, 1e-7
#: Slack on the input range check: float round-off of a preprocessing.
_RANGE_TOLERANCE = 1e-4
#: Factor by which the λ search widens its bracket, and how many times it may.
_SEARCH_FACTOR, _SEARCH_WIDENINGS = 10.0, 4


def _check_range(input_range):
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`input_range` must be a pair of numbers (low, high), got {input_range!r}."
        ) from err
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"`input_range` must satisfy low < high, got ({low}, {high}).")
    return low, high


def _check_nonnegative_float(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__} {value!r}.")
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
    return float(value)


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
        raise TypeError(
            "`model` must be a Sequential or Functional keras.Model with one input and one "
            f"output (its layers' outputs are read), got {type(model).__name__}."
        )
    shape = tuple(outputs[0].shape)
    if len(shape) != 2 or shape[-1] is None or shape[-1] < 2:
        raise ValueError(
            f"`model` must return logits of shape (batch, n_classes >= 2), got {shape}."
        )
    return int(shape[-1])


def check_layers(model, layers):
    """Return the list of layer names ``layers`` (str, int or a list of them) names in ``model``."""
    if layers is None:
        return []
    if isinstance(layers, (str, int)) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise TypeError(
            f"`layers` must be a layer name or a list of layer names, got "
            f"{type(layers).__name__}."
        )
    names = []
    for layer in layers:
        try:
            names.append(resolve_layer(model, layer).name)
        except ValueError as err:
            raise ValueError(str(err).replace("`layer`", "`layers`", 1)) from None
    if len(set(names)) != len(names):
        raise ValueError(f"`layers` must name each layer once, got {list(layers)}.")
    return names


class AfI(BaseEstimator):
    """Attacking for Interpretability: a class-wide feature occluder and concept attribution.

    Parameters
    ----------
    model : keras.Model
        A Sequential or Functional classifier returning logits; it always runs in inference
        mode (BatchNormalization and Dropout untouched).
    layers : str, int or list of them, default=None
        Layers whose neuron and channel importances are computed after the fit (names or
        indices into ``model.layers``).
    input_range : tuple of float, default=(0.0, 1.0)
        (low, high) of the model's inputs (e.g. (-1, 1) or (0, 255)); occluded and transformed
        images are clipped into it.
    l1_penalty : float, default=1e-3
        λ, the weight of D(δ) = ‖δ‖₁ (or its per-pixel mean, see ``normalize_penalty``).
    normalize_penalty : bool, default=False
        Divide D by the number of pixels × channels.
    proximal : bool, default=False
        Apply the l1 term by a soft-threshold after each Adam step (exact zeros) instead of
        its subgradient.
    loss : {"logit", "margin"}, default="logit"
        ℓ: the class logit (the paper) or max(Z_y − max_{k≠y} Z_k, −margin).
    margin : float, default=0.0
        κ of the margin loss.
    learning_rate : float, default=0.01
        Adam's step size, in input units (scaled by the input range's width).
    max_steps : int, default=300
        Most Adam steps (each one a pass over all the images).
    batch_size : int, default=64
        Images per forward and backward pass.
    noise : float, default=0.04
        Half-width of t's uniform noise, as a fraction of the input range's width.
    max_rotation : float, default=5.0
        Largest rotation of t, in degrees.
    interpolation : {"bilinear", "nearest"}, default="bilinear"
        Interpolation of t's rotation.
    use_transform : bool, default=True
        Include the t(x − δ) term (the paper); False optimises on clean images only.
    lambda_search : bool, default=False
        Search the largest λ (from ``l1_penalty`` by factors of 10, then bisection in log λ)
        whose occluder flips ``target_flip_rate`` of the clean images.
    target_flip_rate : float, default=1.0
        Flip rate the λ search must reach.
    n_search_steps : int, default=6
        Bisection steps of the λ search.
    verbose : bool, default=False
        Progress bars.
    random_state : int, numpy.random.Generator or None, default=None
        Seeds the transforms (and later the random sets of the concept tests).

    Attributes
    ----------
    delta_ : ndarray of shape (height, width, channels)
        The occluder δ.
    class_id_ : int
    n_classes_ : int
    images_used_ : ndarray of int
        Indices of the fitted images the model predicts as the class (the others are ignored).
    transform_excluded_ : ndarray of int
        Indices (into the fitted images) whose transformed copy was misclassified before any
        occlusion, left out of the t term.
    flip_rate_ : dict
        ``{"clean": ..., "transformed": ...}``: fractions of occluded images (and of their
        transformed copies) no longer predicted as the class, at ``delta_``.
    history_ : dict of str to ndarray
        Per step: ``loss``, ``l1`` (‖δ‖₁), ``flip_rate`` and ``flip_rate_transformed``.
    n_steps_ : int
        Adam steps taken.
    lambda_ : float
        The λ of ``delta_`` (the searched one with ``lambda_search``).
    lambda_search_ : list of dict
        ``{"lambda", "flip_rate", "n_steps"}`` of every λ tried (empty without search).
    neuron_importance_ : dict of str to ndarray
        s_l of each layer, shape (h, w, c) or (c,), >= 0.
    channel_importance_ : dict of str to ndarray
        Eq. 8 of each layer, shape (c,), in [0, 1].
    concept_importance_ : ConceptImportance or None
        The last result of :meth:`concept_importance`.

    References
    ----------
    Wu, Zhou, Wu, Qian, Zhou and Ma, "Towards Global Explanations of Convolutional Neural
    Networks with Concept Attribution", CVPR 2020.

    Examples
    --------
    >>> afi = AfI(model, layers=["pool2"], random_state=0).fit(images, 1)  # doctest: +SKIP
    >>> afi.channel_importance_["pool2"].max()                              # doctest: +SKIP
    1.0
    """

    def __init__(self, model, *, layers=None, input_range=(0.0, 1.0), l1_penalty=1e-3,
                 normalize_penalty=False, proximal=False, loss="logit", margin=0.0,
                 learning_rate=0.01, max_steps=300, batch_size=64, noise=0.04,
                 max_rotation=5.0, interpolation="bilinear", use_transform=True,
                 lambda_search=False, target_flip_rate=1.0, n_search_steps=6, verbose=False,
                 random_state=None):
        self.model = model
        self.layers = layers
        self.input_range = input_range
        self.l1_penalty = l1_penalty
        self.normalize_penalty = normalize_penalty
        self.proximal = proximal
        self.loss = loss
        self.margin = margin
        self.learning_rate = learning_rate
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.noise = noise
        self.max_rotation = max_rotation
        self.interpolation = interpolation
        self.use_transform = use_transform
        self.lambda_search = lambda_search
        self.target_flip_rate = target_flip_rate
        self.n_search_steps = n_search_steps
        self.verbose = verbose
        self.random_state = random_state

    # -----------------------------------------------------------------------------------------
    # Validation
    # -----------------------------------------------------------------------------------------

    def _validated_params(self):
        params = {
            "input_range": _check_range(self.input_range),
            "l1_penalty": _check_nonnegative_float(self.l1_penalty, "l1_penalty"),
            "margin": _check_nonnegative_float(self.margin, "margin"),
            "learning_rate": check_fraction(self.learning_rate, "learning_rate", high=np.inf),
            "max_steps": check_nonnegative_int(self.max_steps, "max_steps"),
            "batch_size": check_positive_int(self.batch_size, "batch_size"),
            "noise": _check_nonnegative_float(self.noise, "noise"),
            "max_rotation": _check_nonnegative_float(self.max_rotation, "max_rotation"),
            "loss": check_choice(self.loss, "loss", LOSSES),
            "interpolation": check_choice(self.interpolation, "interpolation",
                                          ("bilinear", "nearest")),
            "target_flip_rate": check_fraction(self.target_flip_rate, "target_flip_rate"),
            "n_search_steps": check_nonnegative_int(self.n_search_steps, "n_search_steps"),
        }
        if params["max_rotation"] > 180:
            raise ValueError(
                f"`max_rotation` must be in [0, 180] degrees, got {params['max_rotation']}."
            )
        return params

    def _check_images(self, images, name, low, high, *, min_images=1):
        images = check_images(images, name)
        if len(images) < min_images:
            raise ValueError(
                f"`{name}` must hold at least {min_images} images, got {len(images)}."
            )
        expected = tuple(self.model.inputs[0].shape[1:])
        if any(e is not None and e != g for e, g in zip(expected, images.shape[1:],
                                                       strict=True)):
            sides = ", ".join(map(str, expected))
            raise ValueError(
                f"`{name}` must have the model's input shape (batch, {sides}), got shape "
                f"{images.shape}."
            )
        tolerance = _RANGE_TOLERANCE * (high - low)
        if images.min() < low - tolerance or images.max() > high + tolerance:
            raise ValueError(
                f"`{name}` must lie in `input_range` [{low:g}, {high:g}], got values in "
                f"[{images.min():.4g}, {images.max():.4g}]. Pass the range of the model's "
                f"inputs, e.g. `input_range=(0, 255)`."
            )
        if images.min() < low or images.max() > high:  # round-off only: clip, on a copy
            images = np.clip(images, low, high)
        return images

    # -----------------------------------------------------------------------------------------
    # Fit
    # -----------------------------------------------------------------------------------------

    def fit(self, images, class_id):
        """Learn the occluder δ of the class, then the importances of ``layers``.

        Parameters
        ----------
        images : ndarray of shape (n_images, height, width, channels)
            At least 2 images of the class, in ``input_range``.
        class_id : int
            The class y (an output index of the model).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            If fewer than 2 images are given, they leave the input range, the model predicts
            ``class_id`` on none of them, or a layer name is unknown.
        """
        self.n_classes_ = _check_model(self.model)
        params = self._validated_params()
        low, high = params["input_range"]
        images = self._check_images(images, "images", low, high, min_images=2)
        class_id = check_index(class_id, "class_id", self.n_classes_,
                               f" (the model has {self.n_classes_} outputs)")
        layer_names = check_layers(self.model, self.layers)
        rng = check_random_state(self.random_state)
        seed = rng.integers(2**31 - 1, size=2)
        check_seed = rng.integers(2**31 - 1, size=2)

        predictions = np.argmax(self._logits(images, params["batch_size"]), axis=1)
        used = np.flatnonzero(predictions == class_id)
        if len(used) == 0:
            found = ", ".join(str(k) for k in np.unique(predictions)[:10])
            raise ValueError(
                f"`class_id` must be predicted by the model on at least one image, got class "
                f"{class_id}, predicted on none of the {len(images)} images (the model "
                f"predicts {found}). Pass images of the class, preprocessed as the model expects."
            )
        if len(used) < len(images):
            warnings.warn(
                f"The model does not predict class {class_id} on {len(images) - len(used)} of "
                f"the {len(images)} images; they are left out of the occluder and the "
                f"importances.",
                UserWarning, stacklevel=2,
            )
        self.class_id_ = class_id
        self.images_used_ = used
        self.input_shape_ = tuple(int(s) for s in images.shape[1:])
        class_images = images if len(used) == len(images) else images[used]  # no copy if all

        transform_ok = np.zeros(len(class_images), bool)
        if self.use_transform:
            transform_ok = self._transform_keeps_class(class_images, class_id, check_seed,
                                                       params)
            if not transform_ok.all():
                warnings.warn(
                    f"The random transform alone changes the prediction of "
                    f"{int((~transform_ok).sum())} of the {len(class_images)} images; they are "
                    f"left out of the transformed term (see `transform_excluded_`).",
                    UserWarning, stacklevel=2,
                )
        self.transform_excluded_ = used[~transform_ok] if self.use_transform else used[:0]

        steps = _Optimiser(self.model, class_images, transform_ok, class_id, params, seed,
                           self.normalize_penalty, self.proximal, self.use_transform,
                           self.verbose)
        if self.lambda_search:
            result, self.lambda_search_ = _search_lambda(steps, params)
        else:
            result, self.lambda_search_ = steps.run(params["l1_penalty"]), []
        self.delta_ = result["delta"]
        self.lambda_ = result["lambda"]
        self.history_ = result["history"]
        self.n_steps_ = result["n_steps"]
        self.flip_rate_ = result["flip_rate"]
        self.layers_ = layer_names
        self._detectors = {}
        self.neuron_importance_, self.channel_importance_ = {}, {}
        if layer_names:
            self._compute_importances(class_images, layer_names, params["batch_size"],
                                      (low, high))
        self.concept_importance_ = None
        return self

    def _transform_keeps_class(self, images, class_id, seed, params):
        """Whether one seeded transform of each image is still predicted as the class."""
        low, high = params["input_range"]
        keeps = np.empty(len(images), bool)
        size = params["batch_size"]
        # Batch by batch: a rotation of every image at once holds several image-sized temporaries.
        for index, start in enumerate(range(0, len(images), size)):
            batch_seed = tf.random.experimental.stateless_fold_in(tf.constant(seed), index)
            moved = random_transform(
                tf.constant(images[start:start + size]), batch_seed, noise=params["noise"],
                max_rotation=params["max_rotation"], input_range=(low, high),
                interpolation=params["interpolation"])
            logits = call_model(self.model, moved).numpy()
            keeps[start:start + size] = np.argmax(logits, axis=1) == class_id
        return keeps

    def _logits(self, images, batch_size):
        from xcraft.plumbing.activations import batched_activations

        return batched_activations(self.model, images, batch_size=batch_size)

    # -----------------------------------------------------------------------------------------
    # Importance (eq. 6-8)
    # -----------------------------------------------------------------------------------------

    def _features_model(self, layer_names):
        layers = [resolve_layer(self.model, name) for name in layer_names]
        return keras.Model(self.model.inputs[0], [layer.output for layer in layers])

    def _compute_importances(self, class_images, layer_names, batch_size, input_range):
        low, high = input_range
        if self.flip_rate_["clean"] == 0.0:
            warnings.warn(
                f"The occluder flipped none of the {len(class_images)} images (λ = "
                f"{self.lambda_:g}, {self.n_steps_} steps): the importances are all zero. "
                f"Lower `l1_penalty`, raise `max_steps`, or pass `lambda_search=True`.",
                UserWarning, stacklevel=3,
            )
        features = self._features_model(layer_names)
        delta = tf.constant(self.delta_)

        @tf.function(reduce_retracing=True)
        def difference(batch, valid):
            clean = features(batch, training=False)
            occluded = features(tf.clip_by_value(batch - delta, low, high), training=False)
            clean = clean if isinstance(clean, (list, tuple)) else [clean]
            occluded = occluded if isinstance(occluded, (list, tuple)) else [occluded]
            weights = lambda a: tf.reshape(valid, [-1] + [1] * (a.shape.rank - 1))  # noqa: E731
            return [tf.reduce_sum(weights(a) * (a - b), axis=0)
                    for a, b in zip(clean, occluded, strict=True)]

        sums = None
        for batch, valid in _padded_batches(class_images, batch_size):
            parts = difference(tf.constant(batch), tf.constant(valid))
            parts = [p.numpy().astype(np.float64) for p in parts]
            sums = parts if sums is None else [s + p for s, p in zip(sums, parts, strict=True)]
        for name, total in zip(layer_names, sums, strict=True):
            if total.ndim not in (1, 3):
                raise ValueError(
                    f"`layers` must name layers with outputs (batch, channels) or (batch, h, w, "
                    f"channels), got {name!r} with per-image shape {total.shape}."
                )
            neuron = np.maximum(total / len(class_images), 0.0)
            if self.flip_rate_["clean"] == 0.0:
                neuron = np.zeros_like(neuron)
            channel = neuron.reshape(-1, neuron.shape[-1]).sum(axis=0)
            top = channel.max()
            channel = channel / top if top > 0 else np.zeros_like(channel)
            self.neuron_importance_[name] = neuron.astype(np.float32)
            self.channel_importance_[name] = channel.astype(np.float32)

    # -----------------------------------------------------------------------------------------
    # Meta-detector (eq. 9)
    # -----------------------------------------------------------------------------------------

    def _check_fitted_layer(self, layer):
        check_is_fitted(self, ["delta_", "channel_importance_"])
        if isinstance(layer, int) and not isinstance(layer, bool):
            layer = resolve_layer(self.model, layer).name
        if layer not in self.channel_importance_:
            listed = ", ".join(repr(n) for n in self.channel_importance_) or "none"
            raise ValueError(
                f"`layer` must be one of the analysed layers ({listed}), got {layer!r}. Pass it "
                f"in `layers` before `fit`."
            )
        return layer

    def meta_detector(self, layer, weights=None):
        """Return the meta-detector x ↦ Σ_c w_c A_c(x) of ``layer`` (eq. 9) as a Keras model.

        Parameters
        ----------
        layer : str
            One of the analysed ``layers``.
        weights : ndarray of shape (channels,), optional
            Channel weights; default the layer's ``channel_importance_``.

        Returns
        -------
        keras.Model
            On the model's own graph: images (n, H, W, C) to (n, h, w) response maps for a
            convolutional layer, (n,) for a dense one.
        """
        layer = self._check_fitted_layer(layer)
        default = weights is None
        if default and layer in self._detectors:
            return self._detectors[layer]
        weights = self.channel_importance_[layer] if default else np.asarray(weights, np.float32)
        output = resolve_layer(self.model, layer).output
        if weights.shape != (output.shape[-1],):
            raise ValueError(
                f"`weights` must have shape ({output.shape[-1]},) for layer {layer!r}, got "
                f"{weights.shape}."
            )
        response = keras.ops.tensordot(output, keras.ops.convert_to_tensor(weights),
                                       axes=[[len(output.shape) - 1], [0]])
        detector = keras.Model(self.model.inputs[0], response, name=f"meta_detector_{layer}")
        if default:
            self._detectors[layer] = detector
        return detector

    def meta_detector_outputs(self, images, layer, *, batch_size=None):
        """Return the meta-detector's responses to ``images``, streamed in batches.

        Returns
        -------
        ndarray of shape (n_images, h, w) or (n_images,), float32
        """
        from xcraft.plumbing.activations import batched_activations

        layer = self._check_fitted_layer(layer)
        low, high = _check_range(self.input_range)
        images = self._check_images(images, "images", low, high)
        return batched_activations(self.meta_detector(layer), images,
                                   batch_size=batch_size or check_positive_int(
                                       self.batch_size, "batch_size"))

    # -----------------------------------------------------------------------------------------
    # Concepts and impressions (defined in their modules)
    # -----------------------------------------------------------------------------------------

    def concept_importance(self, concepts, random_images, *, layers=None, n_random_sets=5,
                           random_set_size=None, n_permutations=1000, random_state=None):
        """Score user concepts by the MMD of the meta-detectors' outputs (section 3.2).

        See :func:`xcraft.afi.concepts.concept_importance`; the result is also stored in
        ``concept_importance_``.
        """
        from xcraft.afi.concepts import concept_importance

        self.concept_importance_ = concept_importance(
            self, concepts, random_images, layers=layers, n_random_sets=n_random_sets,
            random_set_size=random_set_size, n_permutations=n_permutations,
            random_state=self.random_state if random_state is None else random_state,
        )
        return self.concept_importance_

    def class_impression(self, layer, *, n_steps=200, learning_rate=0.05, tv_weight=0.1,
                         random_state=None):
        """Maximise the meta-detector of ``layer``: see :func:`xcraft.afi.impression`."""
        from xcraft.afi.impression import class_impression

        return class_impression(
            self, layer, n_steps=n_steps, learning_rate=learning_rate, tv_weight=tv_weight,
            random_state=self.random_state if random_state is None else random_state,
        )

    # -----------------------------------------------------------------------------------------
    # Persistence and plots
    # -----------------------------------------------------------------------------------------

    def save(self, path, *, overwrite=False):
        """Write the fitted estimator to the directory ``path`` (npz + JSON, atomic)."""
        from xcraft.afi.io import save_afi

        save_afi(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path, model):
        """Read an estimator written by :meth:`save`; ``model`` is the one it was fitted on."""
        from xcraft.afi.io import load_afi

        return load_afi(path, model, cls)

    def plot_occluder(self, **kwargs):
        """Draw ``delta_`` (see :func:`xcraft.viz.afi.plot_occluder`)."""
        from xcraft.viz.afi import plot_occluder

        check_is_fitted(self, "delta_")
        return plot_occluder(self.delta_, input_range=_check_range(self.input_range), **kwargs)

    def plot_channel_importances(self, **kwargs):
        """Draw each layer's channel importances (see :mod:`xcraft.viz.afi`)."""
        from xcraft.viz.afi import plot_channel_importances

        check_is_fitted(self, "channel_importance_")
        return plot_channel_importances(self.channel_importance_, **kwargs)

    def plot_concept_importances(self, **kwargs):
        """Draw the last concept scores with their spread over random sets."""
        from xcraft.viz.afi import plot_concept_scores

        check_is_fitted(self, "concept_importance_")
        return plot_concept_scores(self.concept_importance_, **kwargs)


# ---------------------------------------------------------------------------------------------
# The optimiser
# ---------------------------------------------------------------------------------------------


def _padded_batches(images, batch_size):
    """Fixed-shape batches (the last padded by repetition) with a 0/1 validity vector."""
    n = len(images)
    size = min(batch_size, n)
    for start in range(0, n, size):
        stop = min(start + size, n)
        index = np.arange(start, start + size).clip(max=n - 1)
        valid = (np.arange(start, start + size) < stop).astype(np.float32)
        yield images[index], valid


class _Optimiser:
    """Adam on δ with streamed, accumulated gradients; one instance serves every λ tried."""

    def __init__(self, model, images, transform_ok, class_id, params, seed, normalize, proximal,
                 use_transform, verbose):
        self.images = images
        self.transform_ok = transform_ok.astype(np.float32)
        self.n_transformed = int(transform_ok.sum())
        self.params = params
        self.seed = tf.constant(seed, tf.int64)
        self.proximal = bool(proximal)
        self.use_transform = bool(use_transform)
        self.verbose = verbose
        self.scale = 1.0 / float(np.prod(images.shape[1:])) if normalize else 1.0
        low, high = params["input_range"]
        self.width = high - low
        n_classes = int(model.outputs[0].shape[-1])
        other = tf.constant(np.arange(n_classes) != class_id)
        margin = params["margin"]
        loss_name = params["loss"]

        def image_losses(logits):
            target = logits[:, class_id]
            if loss_name == "logit":
                return target
            best_other = tf.reduce_max(tf.where(other, logits, -np.inf), axis=1)
            return tf.maximum(target - best_other, -margin)

        def flipped(logits):
            return tf.cast(tf.argmax(logits, axis=1) != class_id, tf.float32)

        transform = self.use_transform

        @tf.function(reduce_retracing=True)
        def batch_pass(delta, batch, valid, t_mask, step, index):
            seed = tf.random.experimental.stateless_fold_in(
                tf.random.experimental.stateless_fold_in(self.seed, step), index)
            with tf.GradientTape() as tape:
                tape.watch(delta)
                occluded = tf.clip_by_value(batch - delta, low, high)
                logits = call_model(model, occluded)
                losses = valid * image_losses(logits)
                n_flip = tf.reduce_sum(valid * flipped(logits))
                n_flip_t = tf.constant(0.0)
                if transform:
                    moved = random_transform(occluded, seed, noise=params["noise"],
                                             max_rotation=params["max_rotation"],
                                             input_range=(low, high),
                                             interpolation=params["interpolation"])
                    logits_t = call_model(model, moved)
                    weight = valid * t_mask
                    losses = losses + weight * image_losses(logits_t)
                    n_flip_t = tf.reduce_sum(weight * flipped(logits_t))
                total = tf.reduce_sum(losses)
            return tape.gradient(total, delta), total, n_flip, n_flip_t

        self.batch_pass = batch_pass

        @tf.function
        def adam_step(delta, m, v, grad, step, penalty):
            lr = params["learning_rate"] * self.width
            m.assign(_ADAM_BETA1 * m + (1 - _ADAM_BETA1) * grad)
            v.assign(_ADAM_BETA2 * v + (1 - _ADAM_BETA2) * grad * grad)
            t = tf.cast(step, tf.float32)
            m_hat = m / (1 - _ADAM_BETA1**t)
            scale = tf.sqrt(v / (1 - _ADAM_BETA2**t)) + _ADAM_EPSILON  # Adam's metric
            z = delta - lr * m_hat / scale
            if self.proximal:
                # The prox of lr·λ‖·‖₁ in the metric diag(scale): a per-coordinate threshold.
                z = tf.sign(z) * tf.maximum(tf.abs(z) - lr * penalty / scale, 0.0)
            delta.assign(tf.clip_by_value(z, -self.width, self.width))

        self.adam_step = adam_step

    def run(self, l1_penalty):
        """Optimise δ for one λ; return its delta, history, flip rates and step count."""
        params = self.params
        n = len(self.images)
        shape = self.images.shape[1:]
        delta = tf.Variable(tf.zeros(shape, tf.float32))
        m = tf.Variable(tf.zeros(shape, tf.float32))
        v = tf.Variable(tf.zeros(shape, tf.float32))
        penalty = tf.constant(l1_penalty * self.scale, tf.float32)
        history = {"loss": [], "l1": [], "flip_rate": [], "flip_rate_transformed": []}
        bar = _progress(params["max_steps"], "occluder", self.verbose)
        step = 0
        while True:
            grad = np.zeros(shape, np.float32)
            total = n_flip = n_flip_t = 0.0
            batches = _padded_batches(np.arange(n), params["batch_size"])
            for index, (rows, valid) in enumerate(batches):
                g, loss, flips, flips_t = self.batch_pass(
                    delta, tf.constant(self.images[rows]), tf.constant(valid),
                    tf.constant(self.transform_ok[rows]), tf.constant(step, tf.int64),
                    tf.constant(index, tf.int64))
                grad += g.numpy()
                total += float(loss)
                n_flip += float(flips)
                n_flip_t += float(flips_t)
            l1 = float(tf.reduce_sum(tf.abs(delta)))
            history["loss"].append(total / n + l1_penalty * self.scale * l1)
            history["l1"].append(l1)
            history["flip_rate"].append(n_flip / n)
            rate_t = n_flip_t / self.n_transformed if self.n_transformed else np.nan
            history["flip_rate_transformed"].append(rate_t)
            done = n_flip == n and (not self.use_transform or n_flip_t == self.n_transformed)
            if done or step == params["max_steps"]:
                break
            grad /= n
            if not self.proximal:
                grad += l1_penalty * self.scale * np.sign(delta.numpy())
            step += 1
            self.adam_step(delta, m, v, tf.constant(grad), tf.constant(step, tf.int64), penalty)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return {
            "delta": delta.numpy(),
            "lambda": float(l1_penalty),
            "history": {key: np.asarray(value, np.float64) for key, value in history.items()},
            "n_steps": step,
            "flip_rate": {"clean": history["flip_rate"][-1],
                          "transformed": history["flip_rate_transformed"][-1]},
        }


def _search_lambda(optimiser, params):
    """Largest λ whose occluder reaches the target clean flip rate: bracket, then bisect."""
    target = params["target_flip_rate"]
    tried = []

    def attempt(lam):
        result = optimiser.run(lam)
        tried.append({"lambda": lam, "flip_rate": result["flip_rate"]["clean"],
                      "n_steps": result["n_steps"]})
        return result, result["flip_rate"]["clean"] >= target

    start = params["l1_penalty"] if params["l1_penalty"] > 0 else 1e-3
    result, ok = attempt(start)
    good = (start, result) if ok else None
    bad = None if ok else start
    for _ in range(_SEARCH_WIDENINGS):
        if good is not None and bad is not None:
            break
        lam = good[0] * _SEARCH_FACTOR if good is not None else bad / _SEARCH_FACTOR
        result, ok = attempt(lam)
        if ok:
            good = (lam, result) if good is None or lam > good[0] else good
        else:
            bad = lam if bad is None or lam < bad else bad
    if good is None:
        result, ok = attempt(0.0)  # no penalty at all: the most the occluder can flip
        warnings.warn(
            f"No λ reached the target flip rate {target:g} (best {result['flip_rate']['clean']:.3f}"
            f" at λ = 0); keeping λ = 0.",
            UserWarning, stacklevel=3,
        )
        return result, tried
    if bad is not None:
        for _ in range(params["n_search_steps"]):
            lam = float(np.sqrt(good[0] * bad))
            result, ok = attempt(lam)
            if ok:
                good = (lam, result)
            else:
                bad = lam
    return good[1], tried
