"""Per-concept attribution maps: where in an image does a concept live?

The concept coefficients of an image are U(x) = NNLS(g(x), W): the activations of the feature
extractor g at every spatial location, projected on the concept bank W by non-negative least
squares, then averaged over locations. :func:`xcraft.ops.nnls.solve_nnls` gives U an exact implicit
gradient, so any attribution method can explain a single concept U_i:

- :func:`build_concept_model` wraps x -> U(x) in a Keras model for external explainers
  (e.g. ``xplique.attributions``);
- :func:`concept_attribution_maps` computes Grad-CAM, saliency, RISE and coefficient maps for many
  images and concepts at once, one ``tf.function`` per method.

Token layers of transformers, (n, tokens, channels), are handled as spatial maps (see
:mod:`xcraft.plumbing.tokens`): U(x) is the mean of the per-token coefficients over the pooled
tokens, and the maps are drawn on the grid of the patch tokens, then upsampled.
"""

import numbers
import weakref

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back

# isort: split
import keras
import numpy as np
import tensorflow as tf

from xcraft._validation import (
    check_choice,
    check_fraction,
    check_images,
    check_matrix,
    check_positive_int,
    check_random_state,
)
from xcraft.ops.nnls import nnls_vjp, solve_nnls
from xcraft.plumbing.tokens import check_token_options, token_layout

__all__ = ["build_concept_model", "concept_attribution_maps", "METHODS"]

METHODS = ("gradcam", "saliency", "gradient_input", "rise", "coefficients")
RISE_ESTIMATORS = ("contrast", "petsiuk")
#: Memory budget of one RISE step: masked images plus their activations. Its forward passes are
#: cheap for the small models RISE is slow on, so the per-step cost (one NNLS solve, one graph
#: call) is what to amortise, over as many masked images as fit.
RISE_STEP_BYTES = 2**27
#: Memory budget of one saliency / gradient × input step (its vectorised backward passes).
JACOBIAN_BYTES = 2**28
#: A backward pass of g holds about this many input-sized float32 tensors (measured: ~40 for
#: MobileNetV2 at 224 px, where 16 images x 25 concepts in one step took 9.6 GB).
GRADIENT_FACTOR = 48


@keras.saving.register_keras_serializable(package="xcraft")
class ConceptLayer(keras.layers.Layer):
    """Keras layer mapping activations to concept coefficients by NNLS on a fixed concept bank.

    Parameters
    ----------
    concept_bank : array-like of shape (n_concepts, n_channels)
        Non-negative concept bank W, stored as a constant (not a weight).
    concept_ids : list of int or None, default=None
        Concepts to output, in this order; ``None`` for all of them.
    spatial : bool, default=False
        For 4-D (or token) activations, keep one coefficient vector per location (per token)
        instead of their mean.
    cls_token : {"auto", "exclude", "keep"} or int, default="auto"
        For token activations (n, tokens, channels): which leading tokens the mean leaves out
        (see :func:`xcraft.plumbing.tokens.token_layout`).
    token_grid : tuple (height, width) or None, default=None
        For token activations: the grid of the patch tokens; None for the square one.
    **kwargs
        Passed to ``keras.layers.Layer`` (``name``, ``dtype``).
    """

    def __init__(self, concept_bank, concept_ids=None, spatial=False, cls_token="auto",
                 token_grid=None, **kwargs):
        kwargs["trainable"] = False  # the bank is a constant; also when rebuilt from a config
        super().__init__(**kwargs)
        self.concept_bank = check_matrix(concept_bank, "concept_bank")
        self.concept_ids = None if concept_ids is None else [int(i) for i in concept_ids]
        self.spatial = bool(spatial)
        self.cls_token, self.token_grid = check_token_options(cls_token, token_grid)

    def _n_outputs(self):
        if self.concept_ids is None:
            return self.concept_bank.shape[0]
        return len(self.concept_ids)

    def call(self, activations):
        u = _solve_any(activations, self.concept_bank)  # (n, r), (n, t, r) or (n, h, w, r)
        if self.concept_ids is not None:
            u = tf.gather(u, self.concept_ids, axis=-1)  # (..., k)
        if u.shape.rank == 4 and not self.spatial:
            u = tf.reduce_mean(u, axis=(1, 2))  # (n, k): the image's concept coefficients
        elif u.shape.rank == 3 and not self.spatial:
            layout = token_layout(activations.shape, self.cls_token, self.token_grid)
            u = layout.pool(u)  # (n, k): mean over the pooled tokens
        return tf.cast(u, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        if len(input_shape) in (3, 4) and self.spatial:
            return (*input_shape[:-1], self._n_outputs())
        return (input_shape[0], self._n_outputs())

    def get_config(self):
        config = super().get_config()
        config.update(
            concept_bank=self.concept_bank.tolist(),
            concept_ids=self.concept_ids,
            spatial=self.spatial,
            cls_token=self.cls_token,
            token_grid=None if self.token_grid is None else list(self.token_grid),
        )
        return config


def build_concept_model(feature_extractor, concept_bank, concept_id=None, *, spatial=False,
                        name=None, cls_token="auto", token_grid=None):
    """Build the Keras model x -> U(x) of concept coefficients, differentiable end to end.

    Parameters
    ----------
    feature_extractor : keras.Model
        The part g of the classifier up to the split layer: images -> activations of shape
        (n, height, width, n_channels) or (n, n_channels), non-negative.
    concept_bank : array-like of shape (n_concepts, n_channels)
        The concept bank W (non-negative).
    concept_id : int, list of int or None, default=None
        Which concepts the model outputs: an int gives shape (n, 1) (a one-column output, so that
        explainers taking one-hot ``targets`` work with ``targets = np.ones((n, 1))``), a list of k
        ints gives (n, k) in that order, ``None`` gives all (n, n_concepts).
    spatial : bool, default=False
        Output the per-location coefficients (n, height, width, k) instead of their spatial mean
        (for token activations, the per-token ones (n, tokens, k), leading tokens included).
        Requires 4-D or token activations.
    name : str, default=None
        Name of the returned model; ``None`` gives ``"concept_model"``.
    cls_token : {"auto", "exclude", "keep"} or int, default="auto"
        Token activations (n, tokens, channels) only: the leading tokens and whether the mean
        keeps them (see :func:`xcraft.plumbing.tokens.token_layout`).
    token_grid : tuple (height, width) or None, default=None
        Token activations only: the grid of the patch tokens.

    Returns
    -------
    keras.Model
        A functional model whose input is g's input and whose last layer is a ``ConceptLayer``.

    Raises
    ------
    TypeError
        If ``feature_extractor`` is not a Keras model or ``concept_id`` has the wrong type.
    ValueError
        If the shapes do not match, ``concept_id`` is out of range or ``spatial`` is asked for
        2-D activations.

    Notes
    -----
    Per location, U(x)_l = argmin_{u >= 0} 1/2 ||g(x)_l - u W||^2, computed by
    :func:`xcraft.ops.nnls.solve_nnls`; its gradient is the exact implicit-function Jacobian on each
    location's active set, so gradient-based explainers (Saliency, Integrated Gradients, Grad-CAM)
    see d U_i / d x through g. The concept bank is a constant.

    When g is a functional or built Sequential model, the concept model is built on g's own graph
    (g's input tensor, g's layers, then the concept layer), so ``model.get_layer(name)`` finds g's
    convolution layers: Grad-CAM explainers can take ``conv_layer="<name>"``, and pick g's last
    convolution by default. Layers inside a model nested in g are not reachable that way; pass the
    split layer's activations through :func:`concept_attribution_maps` instead. A subclassed g is
    called as a single layer on a new input of shape ``g.input_shape``.

    Examples
    --------
    >>> import keras, numpy as np
    >>> g = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu")])
    >>> model = build_concept_model(g, np.ones((2, 4)), concept_id=0)
    >>> model(np.ones((5, 8, 8, 3), "float32")).shape
    TensorShape([5, 1])
    """
    if not isinstance(feature_extractor, keras.Model):
        raise TypeError(
            f"`feature_extractor` must be a keras.Model, got {type(feature_extractor).__name__}."
        )
    bank = check_matrix(concept_bank, "concept_bank")
    ids = _check_concept_ids(concept_id, bank.shape[0], "concept_id")
    if not isinstance(spatial, bool):
        raise TypeError(f"`spatial` must be a bool, got {type(spatial).__name__} {spatial!r}.")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"`name` must be a str or None, got {type(name).__name__} {name!r}.")

    inputs, features = _graph_endpoints(feature_extractor)
    shape = _check_activation_shape(tuple(features.shape), bank)
    if spatial and len(shape) == 2:
        raise ValueError(
            f"`spatial=True` needs 4-D activations (n, height, width, channels) or token ones "
            f"(n, tokens, channels), got shape {shape}."
        )
    if len(shape) == 3:
        token_layout(shape, cls_token, token_grid)  # refuse a bad layout now, not at call time
    dtype = features.dtype if features.dtype in ("float32", "float64") else "float32"
    layer = ConceptLayer(bank, ids, spatial, cls_token, token_grid, dtype=dtype,
                         name="concepts")
    return keras.Model(inputs, layer(features), name=name or "concept_model")


def concept_attribution_maps(images, feature_extractor, concept_bank, *, concept_ids=None,
                             method="saliency", batch_size=64, n_masks=1024, grid_size=7,
                             keep_probability=0.5, rise_estimator="contrast", gradcam_layer=None,
                             random_state=None, cls_token="auto", token_grid=None):
    """Compute one attribution map per image and concept, at the input resolution.

    Parameters
    ----------
    images : array-like of shape (n_images, height, width, channels)
        Images in the input format of ``feature_extractor``.
    feature_extractor : keras.Model or callable
        g: images -> activations of shape (n, h, w, n_channels) or token activations
        (n, tokens, n_channels) (or (n, n_channels) for ``"saliency"`` and ``"rise"``).
    concept_bank : array-like of shape (n_concepts, n_channels)
        The concept bank W (non-negative).
    concept_ids : int, list of int or None, default=None
        The k concepts to explain, in output order; ``None`` for all.
    method : {"gradcam", "saliency", "gradient_input", "rise", "coefficients"}, \
default="saliency"
        Saliency is the default because it localised the concepts best or second best on every
        problem of ``bench/faithfulness.py`` and ``bench/real_models.py`` (bench/README.md);
        Grad-CAM at the split layer, the paper's maps, is limited by that layer's grid.
        - ``"gradcam"``: Grad-CAM of U_i with respect to the activations A = g(x): weights are the
          spatial mean of dU_i/dA (implicit NNLS gradient), the map is
          ReLU(sum_c weight_c A_c), bilinearly resized to the input.
          With ``gradcam_layer``, the same at that earlier layer of g (finer grid): weights
          are the spatial mean of dU_i/dA' for its activations A', through the rest of g.
        - ``"saliency"``: |dU_i/dx|, maximum over channels (gradient through g and the NNLS).
        - ``"gradient_input"``: ReLU(sum over channels of x * dU_i/dx): each pixel's first-order
          contribution to U_i against a black image.
        - ``"rise"``: RISE (Petsiuk et al., 2018): ``n_masks`` random ``grid_size`` x
          ``grid_size`` binary masks, bilinearly upsampled and randomly shifted, scored by
          ``rise_estimator``. Forward passes only.
        - ``"coefficients"``: the per-location coefficients U_i(x)_l (as Xplique's CRAFT plots
          them), bilinearly resized to the input.
    batch_size : int, default=64
        Images per forward pass (for ``"rise"``: masked images per forward pass). Saliency and
        gradient × input take fewer images, and the concepts in chunks, when their vectorised
        backward passes (images × concepts of them) would exceed about 256 MiB.
    n_masks : int, default=1024
        Number of RISE masks.
    grid_size : int, default=7
        Side of the RISE low-resolution mask grid.
    keep_probability : float, default=0.5
        Probability that a RISE grid cell is kept.
    rise_estimator : {"contrast", "petsiuk"}, default="contrast"
        ``"contrast"``: at each pixel, the mean U_i(x * m) over the masks that keep it minus the
        mean over the masks that drop it (m weighted by its soft value), so a pixel that does
        not matter scores 0. ``"petsiuk"``: the paper's E[U_i(x * m) m] / ``keep_probability``,
        which adds about E[U_i] to every pixel: its maps look right once min-max scaled, but
        their mass sits mostly outside what they point at (on the planted benchmark
        ``bench/faithfulness.py`` it localises at chance).
    gradcam_layer : str or int, default=None
        ``"gradcam"`` only: an earlier layer of ``feature_extractor`` (a Keras model) at which to
        take Grad-CAM, instead of its output. It must cut the graph (see
        :func:`xcraft.split_model`).
    random_state : int, numpy.random.Generator or None, default=None
        Seeds the RISE masks (stateless TF sampling: the same seed gives the same maps).
    cls_token : {"auto", "exclude", "keep"} or int, default="auto"
        Token activations only: the leading (CLS, register) tokens, and whether U(x) averages
        them in (``"keep"``) or not (see :func:`xcraft.plumbing.tokens.token_layout`). They
        are never drawn: maps cover the patch tokens.
    token_grid : tuple (height, width) or None, default=None
        Token activations only: the grid of the patch tokens (row-major); None for the
        square one (a non-square count of patch tokens is refused without it).

    Returns
    -------
    ndarray of shape (n_images, k, height, width)
        float32 maps, not normalised.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``method`` is unknown, a concept id is out of range, the images or activations have the
        wrong shape, or the method needs 4-D activations and g gives 2-D ones.

    Notes
    -----
    U_i(x) = mean_l NNLS(g(x)_l, W)_i. For token layers the locations l are the pooled tokens,
    and the maps live on the grid of the patch tokens: token t of the patches at
    (t // grid_width, t % grid_width), the same maps as the layer written as a
    (n, grid_height, grid_width, channels) map. For Grad-CAM, d U_i / d A_l = (1 / L) z_l W with
    z_l = e_i,S G_SS^{-1} on location l's active set S (:func:`xcraft.ops.nnls.nnls_vjp`); the k
    concepts share each location's factorisation, so the whole (images x concepts) batch costs
    one NNLS solve and one batched r x r solve per location. Saliency vectorises the k gradients
    with ``GradientTape.batch_jacobian``.

    Examples
    --------
    >>> import keras, numpy as np
    >>> g = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu")])
    >>> maps = concept_attribution_maps(np.ones((2, 8, 8, 3)), g, np.ones((3, 4)))
    >>> maps.shape
    (2, 3, 8, 8)
    """
    method = check_choice(method, "method", METHODS)
    images = check_images(images)
    if not callable(feature_extractor):
        raise TypeError(
            "`feature_extractor` must be a keras.Model or a callable, "
            f"got {type(feature_extractor).__name__}."
        )
    bank = check_matrix(concept_bank, "concept_bank")
    n_concepts = bank.shape[0]
    ids = _check_concept_ids(concept_ids, n_concepts, "concept_ids")
    ids = list(range(n_concepts)) if ids is None else ids
    batch_size = check_positive_int(batch_size, "batch_size")
    _check_input_shape(images, feature_extractor)

    # One probe image tells the activation layout, which decides what each method can do.
    probe = feature_extractor(tf.constant(images[:1]))
    shape = _check_activation_shape(tuple(probe.shape), bank)
    cls_token, token_grid = check_token_options(cls_token, token_grid)
    layout = token_layout(shape, cls_token, token_grid) if len(shape) == 3 else None
    if layout is None and (cls_token != "auto" or token_grid is not None):
        raise ValueError(
            f"`cls_token` and `token_grid` apply to token activations (n, tokens, channels), "
            f"got activations of shape {shape} with cls_token={cls_token!r}, "
            f"token_grid={token_grid!r}. Leave them at their defaults."
        )
    if method in ("gradcam", "coefficients") and len(shape) == 2:
        raise ValueError(
            f"`method={method!r}` needs 4-D activations (n, height, width, channels) or token "
            f"ones (n, tokens, channels) from `feature_extractor`, got shape {shape}. Use "
            f"'saliency' or 'rise'."
        )
    dtype = tf.float64 if probe.dtype == tf.float64 else tf.float32
    bank_t = tf.constant(bank, dtype)  # (r, p)
    ids_t = tf.constant(ids, tf.int32)  # (k,)

    if method == "rise":
        n_masks = check_positive_int(n_masks, "n_masks")
        grid_size = check_positive_int(grid_size, "grid_size")
        keep_probability = check_fraction(keep_probability, "keep_probability")
        rise_estimator = check_choice(rise_estimator, "rise_estimator", RISE_ESTIMATORS)
        if rise_estimator == "contrast" and keep_probability >= 1.0:
            raise ValueError(
                "`rise_estimator='contrast'` compares masks that keep a pixel with masks that "
                f"drop it, so `keep_probability` must be below 1, got {keep_probability}."
            )
        rng = check_random_state(random_state)
        seed = tf.constant(rng.integers(2**31 - 1, size=2), tf.int64)
        per_masked_image = 4 * (int(np.prod(images.shape[1:])) + int(np.prod(shape[1:])))
        rows_per_step = int(np.clip(RISE_STEP_BYTES // per_masked_image, batch_size, 4096))
        return _rise_maps(images, feature_extractor, bank_t, ids_t, rows_per_step, n_masks,
                          grid_size, keep_probability, seed, rise_estimator, layout)

    if gradcam_layer is not None:
        if method != "gradcam":
            raise ValueError(
                f"`gradcam_layer` applies to `method='gradcam'` only, got method={method!r}."
            )
        step = _layer_gradcam_step(feature_extractor, gradcam_layer, dtype, *images.shape[1:3],
                                   layout, (cls_token, token_grid))
    else:
        step = _attribution_step(feature_extractor, method, dtype, *images.shape[1:3], layout)
    if method in ("saliency", "gradient_input"):
        # batch_jacobian runs one backward pass per (image, concept), vectorised: its memory is
        # about that many copies of g's backward activations, which GRADIENT_FACTOR input
        # sizes bound on real backbones (MobileNetV2-224: ~24 MB per pass, 40 inputs). So
        # concepts are taken in chunks and images in batches that keep the product in budget.
        per_gradient = 4 * int(np.prod(images.shape[1:])) * GRADIENT_FACTOR
        n_gradients = max(1, JACOBIAN_BYTES // per_gradient)
        chunk = min(len(ids), n_gradients)
        batch_size = int(np.clip(n_gradients // chunk, 1, batch_size))
        parts = [tf.constant(ids[start:start + chunk], tf.int32)
                 for start in range(0, len(ids), chunk)]
        return np.concatenate([_map_batches(lambda x, part=part: step(x, bank_t, part), images,
                                            batch_size, pad=False) for part in parts], axis=1)
    return _map_batches(lambda x: step(x, bank_t, ids_t), images, batch_size, pad=False)


# Traced attribution steps per feature extractor: tracing the NNLS solver and its gradient costs
# more than explaining a few hundred images, so repeated calls (one per class, per image set)
# must not pay it again. Weak keys: a step never keeps its model alive.
_STEPS = weakref.WeakKeyDictionary()


def _step_cache(feature_extractor):
    """The feature extractor's dict of traced steps, and a weak way back to it.

    The steps refer to the model weakly, so that the cache entry does not keep it alive; a
    model that cannot be weakly referenced gets a fresh dict (its steps are traced per call).
    """
    try:
        return _STEPS.setdefault(feature_extractor, {}), weakref.ref(feature_extractor)
    except TypeError:
        return {}, lambda: feature_extractor


def _attribution_step(feature_extractor, method, dtype, height, width, layout=None):
    """Return the (cached) ``tf.function`` ``step(x, bank, ids)`` -> (b, k, height, width) maps.

    The concept bank and ids are arguments, so other banks of the same shape reuse the trace.
    ``layout`` is the :class:`xcraft.plumbing.tokens.TokenLayout` of a token layer, or None.
    """
    key = (method, dtype, height, width, layout)
    steps, model_ref = _step_cache(feature_extractor)
    if key in steps:
        return steps[key]

    def features(x):
        return tf.cast(model_ref()(x, training=False), dtype)  # (b, [h, w,] p)

    def gradcam(x, bank, ids):  # (b, H, W, C) -> (b, k, H, W)
        a = features(x)  # (b, h, w, p) or (b, t, p)
        n_concepts, n_ids = bank.shape[0], ids.shape[0]
        pooled = _pooled_positions(a, layout)  # (b, L, p): the locations U(x) averages
        b, n_pooled = tf.unstack(tf.shape(pooled)[:2])
        rows = tf.reshape(pooled, (-1, bank.shape[1]))  # (b L, p)
        u = solve_nnls(rows, bank)  # (b L, r)
        # dU_i/dA_l = (1/L) e_i-VJP at location l; all k one-hot cotangents share the solve.
        cotangents = tf.broadcast_to(
            tf.one_hot(ids, n_concepts, dtype=dtype)[None], (tf.shape(u)[0], n_ids, n_concepts)
        )  # (b h w, k, r)
        z = nnls_vjp(u, cotangents, bank, project=False)  # (b h w, k, r)
        # Spatial mean of dU_i/dA_l = (1/L) z_l W; averaging z before the projection by W
        # keeps the memory at (b h w, k, r) instead of (b h w, k, p).
        z = tf.reshape(z, (b, n_pooled, n_ids, n_concepts))  # (b, L, k, r)
        n_locations = tf.cast(n_pooled, dtype)
        weights = tf.einsum("bkr,rp->bkp", tf.reduce_mean(z, axis=1), bank) / n_locations
        grid = a if layout is None else layout.to_grid(a)  # (b, h, w, p): patch tokens only
        cam = tf.nn.relu(tf.einsum("bhwp,bkp->bhwk", grid, weights))  # (b, h, w, k)
        return _resize_maps(cam, height, width)

    def saliency(x, bank, ids):  # (b, H, W, C) -> (b, k, H, W)
        with tf.GradientTape() as tape:
            tape.watch(x)
            u = _pooled_concepts(features(x), bank, ids, dtype, layout)
        jacobian = tape.batch_jacobian(u, x)  # (b, k, H, W, C)
        return tf.reduce_max(tf.abs(jacobian), axis=-1)

    def gradient_input(x, bank, ids):  # (b, H, W, C) -> (b, k, H, W)
        with tf.GradientTape() as tape:
            tape.watch(x)
            u = _pooled_concepts(features(x), bank, ids, dtype, layout)
        jacobian = tape.batch_jacobian(u, x)  # (b, k, H, W, C)
        return tf.nn.relu(tf.einsum("bkhwc,bhwc->bkhw", jacobian, tf.cast(x, jacobian.dtype)))

    def coefficients(x, bank, ids):  # (b, H, W, C) -> (b, k, H, W)
        a = features(x)
        grid = a if layout is None else layout.to_grid(a)  # (b, h, w, p)
        u = tf.gather(solve_nnls(grid, bank), ids, axis=-1)  # (b, h, w, k)
        return _resize_maps(u, height, width)

    step = _free_batch_step({"gradcam": gradcam, "saliency": saliency,
                             "gradient_input": gradient_input,
                             "coefficients": coefficients}[method], dtype)
    steps[key] = step
    return step


def _free_batch_step(function, dtype):
    """``function(x, bank, ids)`` traced once per (image, bank, ids) shape, any batch size.

    Not reduce_retracing: a shape-relaxed trace would leave the bank's rank and the number of
    concept ids unknown, which the NNLS and the one-hot cotangents need statically. An explicit
    signature frees only the batch axis, so 4 images and then 8 (or a last short batch) reuse
    the trace of the first call (tracing the NNLS and its gradient costs seconds).
    """
    traced = {}

    def step(x, bank, ids):
        key = (tuple(x.shape[1:]), x.dtype, tuple(bank.shape), tuple(ids.shape))
        if key not in traced:
            traced[key] = tf.function(function, input_signature=[
                tf.TensorSpec((None, *x.shape[1:]), x.dtype),
                tf.TensorSpec(bank.shape, dtype), tf.TensorSpec(ids.shape, tf.int32)])
        return traced[key](x, bank, ids)

    step.traced = traced  # read by the tests
    step.experimental_get_tracing_count = lambda: sum(
        fn.experimental_get_tracing_count() for fn in traced.values())
    return step


def _layer_gradcam_step(feature_extractor, layer, dtype, height, width, layout=None,
                        token_options=("auto", None)):
    """The (cached) Grad-CAM step at an earlier ``layer`` of g: g = g_upper ∘ g_lower there.

    ``layout`` is the split layer's token layout (or None); an earlier token layer is laid out
    by the same ``token_options`` ``(cls_token, token_grid)``.
    """
    from xcraft.plumbing.split import split_model

    if not isinstance(feature_extractor, keras.Model):
        raise TypeError(
            "`gradcam_layer` needs `feature_extractor` to be a keras.Model to cut, got "
            f"{type(feature_extractor).__name__}."
        )
    key = ("gradcam", dtype, height, width, layer, layout, token_options)
    steps = _STEPS.setdefault(feature_extractor, {})
    if key in steps:
        return steps[key]
    try:
        lower, upper = split_model(feature_extractor, layer)
    except ValueError as err:
        raise ValueError(f"`gradcam_layer={layer!r}`: {err}") from err
    lower_ref, upper_ref = weakref.ref(lower), weakref.ref(upper)
    lower_shape = tuple(lower.outputs[0].shape)
    # An earlier token layer: the same leading tokens, its own grid when it has another size.
    lower_layout = token_layout(lower_shape, *token_options) if len(lower_shape) == 3 else None
    # The halves live as long as g's cache entry; the step itself holds them weakly.
    steps[("gradcam-halves", layer)] = (lower, upper)

    def layer_gradcam(x, bank, ids):  # (b, H, W, C) -> (b, k, H, W)
        with tf.GradientTape() as tape:
            a_lower = tf.cast(lower_ref()(x, training=False), dtype)  # (b, h', w', c')
            tape.watch(a_lower)
            u = _pooled_concepts(tf.cast(upper_ref()(a_lower, training=False), dtype), bank,
                                 ids, dtype, layout)  # (b, k)
        jacobian = tape.batch_jacobian(u, a_lower)  # (b, k, h', w', c') or (b, k, t', c')
        if lower_layout is None:
            weights = tf.reduce_mean(jacobian, axis=(2, 3))  # (b, k, c')
            grid = a_lower
        else:  # mean over the pooled tokens, map on the patch grid
            pooled = jacobian[:, :, lower_layout.pooled_start:]  # (b, k, L', c')
            weights = tf.reduce_mean(pooled, axis=2)  # (b, k, c')
            grid = lower_layout.to_grid(a_lower)  # (b, h', w', c')
        cam = tf.nn.relu(tf.einsum("bhwc,bkc->bhwk", grid, weights))
        return _resize_maps(cam, height, width)

    step = _free_batch_step(layer_gradcam, dtype)
    steps[key] = step
    return step


def _check_activation_shape(shape, bank):
    """Return g's output ``shape`` after checking it is 2-D or 4-D with W's channel count."""
    if len(shape) not in (2, 3, 4):
        raise ValueError(
            "`feature_extractor` must output 2-D (n, channels), token (n, tokens, channels) or "
            f"4-D (n, height, width, channels) activations, got shape {shape}."
        )
    if shape[-1] != bank.shape[1]:
        raise ValueError(
            f"`concept_bank` must have as many columns as `feature_extractor` outputs channels "
            f"({shape[-1]}), got shape {bank.shape}."
        )
    return shape


def _check_concept_ids(concept_ids, n_concepts, name):
    """Return ``concept_ids`` as a list of ints in [0, n_concepts), or None."""
    if concept_ids is None:
        return None
    if isinstance(concept_ids, numbers.Integral) and not isinstance(concept_ids, bool):
        ids = [int(concept_ids)]
    else:
        try:
            ids = list(np.asarray(concept_ids).ravel()) if not isinstance(
                concept_ids, (str, bytes)) else None
        except (TypeError, ValueError):
            ids = None
        if ids is None or any(isinstance(i, (bool, np.bool_)) or not isinstance(
                i, numbers.Integral) for i in ids):
            raise TypeError(
                f"`{name}` must be an int, a list of ints or None, "
                f"got {type(concept_ids).__name__} {concept_ids!r}."
            )
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError(f"`{name}` must name at least one concept, got {concept_ids!r}.")
    bad = [i for i in ids if not 0 <= i < n_concepts]
    if bad:
        raise ValueError(
            f"`{name}` must be in [0, {n_concepts}) for a bank of {n_concepts} concepts, "
            f"got {bad}."
        )
    return ids


def _graph_endpoints(model):
    """Return (input tensor, output tensor) of ``model``'s own graph, or of a nested call."""
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if inputs and outputs:
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                "`feature_extractor` must have one input and one output, "
                f"got {len(inputs)} inputs and {len(outputs)} outputs."
            )
        return inputs[0], outputs[0]
    # Subclassed (or not yet built) models have no graph of their own: call them as a layer.
    try:
        input_shape = tuple(model.input_shape)[1:]
    except (AttributeError, ValueError) as err:
        raise ValueError(
            "`feature_extractor` must be a built Keras model with a known input shape, got an "
            "unbuilt model. Call it once on a batch of images, or wrap it: "
            "`inp = keras.Input(shape); keras.Model(inp, g(inp))`."
        ) from err
    inputs = keras.Input(shape=input_shape)
    return inputs, model(inputs)


def _check_input_shape(images, feature_extractor):
    """Raise a ValueError if ``images`` cannot be fed to ``feature_extractor``."""
    try:
        expected = tuple(feature_extractor.input_shape)
    except (AttributeError, ValueError):
        return
    if len(expected) != 4:
        return
    if any(e is not None and e != s for e, s in zip(expected[1:], images.shape[1:], strict=True)):
        wanted = ", ".join("?" if e is None else str(e) for e in expected[1:])
        raise ValueError(
            f"`images` must have shape (batch, {wanted}) to match `feature_extractor`, "
            f"got shape {images.shape}."
        )


def _solve_any(activations, bank):
    """NNLS of (n, p), (n, h, w, p) or token (n, t, p) activations, the tokens as a 1 × t map."""
    if activations.shape.rank == 3:
        return solve_nnls(activations[:, None], bank)[:, 0]  # (n, t, r)
    return solve_nnls(activations, bank)


def _pooled_positions(activations, layout):
    """The locations U(x) averages, as (n, L, p): every location, or the pooled tokens."""
    if layout is not None:
        return layout.pooled_tokens(activations)  # (n, L, p)
    return tf.reshape(activations, (tf.shape(activations)[0], -1, activations.shape[-1]))


def _pooled_concepts(activations, bank, ids, dtype, layout=None):
    """Return U(x) (n, k): per-location NNLS, averaged over locations (or pooled tokens)."""
    activations = tf.cast(activations, dtype)
    if layout is not None:
        activations = layout.pooled_tokens(activations)  # (n, L, p)
    u = _solve_any(activations, bank)  # (n, r), (n, L, r) or (n, h, w, r)
    u = tf.gather(u, ids, axis=-1)
    if u.shape.rank > 2:
        u = tf.reduce_mean(u, axis=list(range(1, u.shape.rank - 1)))  # (n, k)
    return u


def _resize_maps(maps, height, width):
    """(b, h, w, k) -> bilinear (b, k, height, width) in float32."""
    maps = tf.image.resize(tf.cast(maps, tf.float32), (height, width), method="bilinear")
    return tf.transpose(maps, (0, 3, 1, 2))


def _map_batches(step, images, batch_size, pad=True):
    """Run ``step`` on batches and stack the results.

    ``pad``: the last batch is padded to the others' size, for a ``tf.function`` traced per
    shape; steps with a free batch axis (:func:`_free_batch_step`) take it as it is.
    """
    n_images = images.shape[0]
    size = min(batch_size, n_images)
    outputs = []
    for start in range(0, n_images, size):
        batch = images[start:start + size]
        n_valid = batch.shape[0]
        if pad and n_valid < size:  # so that the tf.function sees one shape only
            batch = np.concatenate([batch, np.repeat(batch[-1:], size - n_valid, axis=0)])
        outputs.append(step(tf.constant(batch)).numpy()[:n_valid])
    return np.concatenate(outputs).astype(np.float32, copy=False)


def _rise_maps(images, feature_extractor, bank, ids, rows_per_step, n_masks, grid_size,
               keep_probability, seed, estimator="contrast", layout=None):
    """RISE maps (n, k, H, W) of the pooled concept coefficients, masks drawn statelessly."""
    n_images, height, width, channels = images.shape
    # Each step pushes (images per step) x (masks per step) <= rows_per_step masked images
    # through g and solves their NNLS in one call.
    masks_per_step = min(n_masks, rows_per_step)
    images_per_step = max(1, min(n_images, rows_per_step // masks_per_step))
    n_chunks = -(-n_masks // masks_per_step)
    step, mask_sum = _rise_steps(feature_extractor, bank.dtype, height, width, channels,
                                 masks_per_step, grid_size, float(keep_probability), layout)
    n_masks_t = tf.constant(n_masks, tf.int32)
    chunks = [tf.constant(chunk, tf.int32) for chunk in range(n_chunks)]
    kept = sum(mask_sum(seed, chunk, n_masks_t) for chunk in chunks)  # (H, W)

    def image_step(x):  # all mask chunks for one batch of images -> (b, k, H, W)
        weighted, total = 0.0, 0.0
        for chunk in chunks:
            chunk_weighted, chunk_total = step(x, bank, ids, seed, chunk, n_masks_t)
            weighted, total = weighted + chunk_weighted, total + chunk_total
        if estimator == "petsiuk":
            return weighted / (n_masks * keep_probability)
        # Mean score where the pixel is kept minus where it is dropped; a pixel no mask (or
        # every mask) kept carries no evidence either way and scores 0.
        dropped = n_masks - kept
        mean_kept = tf.math.divide_no_nan(weighted, kept)
        mean_dropped = tf.math.divide_no_nan(total[:, :, None, None] - weighted, dropped)
        informative = tf.cast((kept > 1e-6) & (dropped > 1e-6), tf.float32)
        return (mean_kept - mean_dropped) * informative

    return _map_batches(image_step, images, images_per_step)


def _rise_steps(feature_extractor, dtype, height, width, channels, masks_per_step, grid_size,
                keep_probability, layout=None):
    """The (cached) RISE ``tf.function`` pair ``step`` and ``mask_sum`` for one mask geometry.

    Bank, concept ids, seed, chunk index and mask count are tensor arguments, so later calls
    (other images, concepts, seeds) reuse the traces instead of paying them again.
    """
    key = ("rise", dtype, height, width, channels, masks_per_step, grid_size, keep_probability,
           layout)
    steps, model_ref = _step_cache(feature_extractor)
    if key in steps:
        return steps[key]
    cell_h, cell_w = -(-height // grid_size), -(-width // grid_size)

    def masks_of(seed, chunk, n_masks):  # -> (m, H, W) masks, and which are real (m,)
        chunk_seed = tf.random.experimental.stateless_fold_in(seed, chunk)
        grid_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(chunk_seed, 2))
        grid = tf.random.stateless_uniform((masks_per_step, grid_size, grid_size), grid_seed)
        grid = tf.cast(grid < keep_probability, tf.float32)
        upsampled = tf.image.resize(
            grid[..., None], ((grid_size + 1) * cell_h, (grid_size + 1) * cell_w), "bilinear"
        )[..., 0]  # (m, (s+1) ch, (s+1) cw)
        shifts = tf.random.stateless_uniform(
            (masks_per_step, 2), shift_seed, minval=0, maxval=2**30, dtype=tf.int32
        ) % tf.constant([cell_h, cell_w])  # (m, 2): a random offset within one cell
        rows = shifts[:, :1] + tf.range(height)[None]  # (m, H)
        cols = shifts[:, 1:] + tf.range(width)[None]  # (m, W)
        masks = tf.gather(upsampled, rows, axis=1, batch_dims=1)  # (m, H, (s+1) cw)
        masks = tf.gather(masks, cols, axis=2, batch_dims=1)  # (m, H, W)
        valid = tf.cast(chunk * masks_per_step + tf.range(masks_per_step) < n_masks, tf.float32)
        return masks, valid

    @tf.function  # no reduce_retracing: the NNLS needs the bank's rank (see _attribution_step)
    def step(x, bank, ids, seed, chunk, n_masks):  # -> sums of U m (b, k, H, W) and U (b, k)
        # Masks are regenerated from the chunk index (stateless) rather than held in memory.
        masks, valid = masks_of(seed, chunk, n_masks)
        b, m = tf.shape(x)[0], tf.shape(masks)[0]
        masked = x[:, None] * masks[None, :, :, :, None]  # (b, m, H, W, C)
        masked = tf.reshape(masked, (b * m, height, width, channels))
        u = _pooled_concepts(model_ref()(masked, training=False), bank, ids, dtype, layout)
        u = tf.reshape(tf.cast(u, tf.float32), (b, m, -1)) * valid[None, :, None]  # (b, m, k)
        return tf.einsum("bmk,mhw->bkhw", u, masks), tf.reduce_sum(u, axis=1)

    @tf.function(reduce_retracing=True)
    def mask_sum(seed, chunk, n_masks):  # (H, W): every pixel's kept weight over one chunk
        masks, valid = masks_of(seed, chunk, n_masks)
        return tf.einsum("m,mhw->hw", valid, masks)

    steps[key] = (step, mask_sum)
    return steps[key]
