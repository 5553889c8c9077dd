"""`CraftTf`: the CRAFT estimator, a drop-in for ``xplique.concepts.CraftTf``.

This module only composes the stages (split, crops, activations, NMF, NNLS, importance,
attribution, recursion, io); the maths lives in the stage modules.
"""

import warnings

import numpy as np
from sklearn.base import BaseEstimator

from xcraft import _validation as v
from xcraft.craft.results import Factorization, Sensitivity, concept_colours
from xcraft.plumbing.activations import (
    NEGATIVE_TOLERANCE,
    batched_activations,
    pooled_crop_activations,
)
from xcraft.plumbing.crops import CROP_STRATEGIES, LazyCrops, sample_crop_boxes
from xcraft.plumbing.shapes import (
    activation_shape,
    check_images_fit_model,
    count_classes,
    model_input_size,
)
from xcraft.plumbing.split import logits_model, split_model
from xcraft.plumbing.tokens import check_token_options, token_layout

__all__ = ["CraftTf", "Factorization", "Sensitivity"]

SOLVERS = ("hals", "mu", "semi-nmf", "auto")
IMPORTANCE_METHODS = ("sobol", "tcav", "occlusion", "afi")
#: The orders ``concept_fidelity`` compares by default (AfI learns an occluder first: opt in).
FIDELITY_METHODS = ("sobol", "tcav", "occlusion")


def _check_input_range(input_range):
    try:
        low, high = (float(x) for x in input_range)
    except (TypeError, ValueError):
        raise TypeError(
            f"`input_range` must be a pair (low, high) of numbers or None, got {input_range!r}."
        ) from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"`input_range` must have finite low < high, got {input_range!r}.")
    return low, high


def _check_channels(n_channels, n_concepts):
    if n_concepts > n_channels:
        raise ValueError(
            f"`number_of_concepts` must be <= the {n_channels} channels of the split layer, got "
            f"{n_concepts}. Ask for fewer concepts, or split at a wider layer."
        )


def _check_concepts_fit_channels(feature_extractor, n_concepts):
    """Refuse more concepts than channels before any forward pass, when g declares its width."""
    try:
        width = feature_extractor.outputs[0].shape[-1]
    except (AttributeError, IndexError, TypeError):
        return
    if width is not None:
        _check_channels(int(width), n_concepts)


def _warn_if_rank_deficient(activations, n_concepts):
    """Warn when the crops' activations span fewer directions than the concepts asked for."""
    rows = activations
    # A few hundred spread rows find r directions when the crops have them, at a fraction of a
    # forward pass's cost; a subsample's rank never exceeds the whole's, so no warning is missed.
    max_rows = max(512, 8 * n_concepts)
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).astype(int)]
    singular = np.linalg.svd(rows.astype(np.float64), compute_uv=False)
    tolerance = singular[0] * max(rows.shape) * np.finfo(np.float32).eps if singular.size else 0
    rank = int(np.sum(singular > tolerance))
    if rank < n_concepts:
        warnings.warn(
            f"The crops' activations have numerical rank {rank}, below `number_of_concepts` = "
            f"{n_concepts}: at most {rank} concepts carry information and the others split it "
            f"arbitrarily (their importances are not meaningful). Use more varied images, or "
            f"fewer concepts.",
            UserWarning,
            stacklevel=3,
        )


class CraftTf(BaseEstimator):
    """Explain one class of a Keras classifier with concepts (CRAFT, Fel et al., CVPR 2023).

    A drop-in for ``xplique.concepts.CraftTf``: the same constructor arguments, methods and
    return values, so code written for Xplique runs when the import changes. The extra options
    are keyword-only.

    Parameters
    ----------
    input_to_latent_model : keras.Model or callable
        g: images to non-negative activations (n, h, w, p) or (n, p), or to the token
        activations (n, tokens, p) of a transformer (signed: use ``solver="semi-nmf"``).
    latent_to_logit_model : keras.Model or callable
        h: activations to logits.
    number_of_concepts : int, default=20
        r, the number of concepts (NMF rank).
    batch_size : int, default=64
        Images or crops per forward pass.
    patch_size : int, default=64
        Side of the square crops, in pixels of the input images.
    crops : {"random", "grid"}, default="random"
        ``"random"``: ``patches_per_image`` random squares per image (the paper); ``"grid"``:
        Xplique's sliding window with stride 0.8 · ``patch_size``.
    patches_per_image : int, default=10
        Crops per image for ``crops="random"``.
    solver : {"hals", "mu", "semi-nmf", "auto"}, default="hals"
        NMF solver: hierarchical alternating least squares or multiplicative updates; or
        ``"semi-nmf"`` (:class:`xcraft.ops.semi_nmf.SemiNMF`: U >= 0 with a concept bank of any
        sign) for layers with signed activations (GELU, pre-activation sums, transformer
        tokens). ``"auto"`` uses HALS on non-negative activations and semi-NMF on signed ones,
        saying so. The fitted choice is ``solver_``.
    max_iter : int, default=500
        NMF iterations at most.
    tol : float, default=1e-4
        NMF relative tolerance on the decrease of the reconstruction error.
    random_state : int, numpy.random.Generator or None, default=None
        Seed of every random step (crops, NMF, Sobol designs). Same seed, same concepts.
    verbose : bool, default=True
        Show progress bars on the long steps.
    input_range : tuple (low, high) or None, default=None
        The value range of the model's inputs (e.g. ``(0, 1)``, ``(-1, 1)``, ``(0, 255)``).
        When given, images outside it get one warning per estimator: images in 0–255 handed
        to a model trained on [0, 1] still run, but explain something else.
    cls_token : {"auto", "exclude", "keep"} or int, default="auto"
        Token layers only (g returns (n, tokens, p), detected by that rank): the tokens before
        the patch tokens. ``"exclude"``: one CLS token, left out of the pooled crop activations
        the NMF learns from. ``"keep"``: one CLS token, pooled with the patch tokens. An int:
        that many leading tokens (CLS, registers, distillation), excluded. ``"auto"``: none
        when the tokens form a square grid, one excluded CLS token when all but the first do
        (else the number ``token_grid`` leaves over). Either way the leading tokens are never
        drawn in maps (they have no place in the image), and the head still receives the full
        (n, tokens, p) tensor: in ``transform`` and the importance every token, leading ones
        included, has its own coefficients and is rebuilt as ``u W`` like every position.
    token_grid : tuple (height, width) or None, default=None
        Token layers only: the grid of the patch tokens (row-major, as a ``Conv2D`` patch
        embedding reshaped); None takes the square one and refuses a non-square count.

    Attributes
    ----------
    factorization : Factorization
        Xplique's record of the fit: inputs, class id, crops, reducer, U and W.
    sensitivity : Sensitivity
        Xplique's record of the global importances (after ``estimate_importance()``).
    concept_bank_w : ndarray of shape (n_concepts, n_channels)
    crops_u : ndarray of shape (n_crops, n_concepts)
    crop_boxes : ndarray of shape (n_crops, 4)
        ``(image_index, y, x, size)`` of every crop in the fitted images.
    importances : ndarray of shape (n_concepts,) or None
    token_layout_ : xcraft.plumbing.tokens.TokenLayout or None
        For a token layer: its number of tokens, leading tokens, patch grid and whether the
        leading tokens are pooled; None for other layers.

    References
    ----------
    Fel, Picard, Bethune, Boissin, Vigouroux, Colin, Cadène, Serre. "CRAFT: Concept Recursive
    Activation FacTorization for Explainability", CVPR 2023.

    Examples
    --------
    >>> craft = CraftTf(g, h, number_of_concepts=10, patch_size=32)   # doctest: +SKIP
    >>> crops, crops_u, concept_bank_w = craft.fit(images, class_id=3)  # doctest: +SKIP
    >>> importances = craft.estimate_importance(nb_design=32)           # doctest: +SKIP
    """

    # Xplique exposes these as None before fit; class attributes keep __init__ argument-only.
    factorization = None
    sensitivity = None

    def __init__(
        self,
        input_to_latent_model,
        latent_to_logit_model,
        number_of_concepts=20,
        batch_size=64,
        patch_size=64,
        *,
        crops="random",
        patches_per_image=10,
        solver="hals",
        max_iter=500,
        tol=1e-4,
        random_state=None,
        verbose=True,
        input_range=None,
        cls_token="auto",
        token_grid=None,
    ):
        self.input_to_latent_model = input_to_latent_model
        self.latent_to_logit_model = latent_to_logit_model
        self.number_of_concepts = number_of_concepts
        self.batch_size = batch_size
        self.patch_size = patch_size
        self.crops = crops
        self.patches_per_image = patches_per_image
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose
        self.input_range = input_range
        self.cls_token = cls_token
        self.token_grid = token_grid

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_model(cls, model, layer, *, explain_logits=True, **kwargs):
        """Split ``model`` at ``layer`` and build a ``CraftTf`` on the two halves.

        Parameters
        ----------
        model : keras.Model
            A Sequential or Functional classifier returning logits.
        layer : str or int
            The split layer (see :func:`xcraft.split_model`); its activations must be
            non-negative.
        explain_logits : bool, default=True
            When ``model`` ends in a softmax or sigmoid, explain its logits (their input, the
            paper's choice), with a warning saying so. False keeps the probabilities.
        **kwargs
            Any ``CraftTf`` argument.

        Returns
        -------
        CraftTf
            Unfitted; it remembers ``model`` and ``layer`` so that :meth:`decompose` can split the
            same model again at an earlier layer.
        """
        if explain_logits:
            model, removed = logits_model(model)
            if removed is not None:
                warnings.warn(
                    f"`model` ends in a softmax or sigmoid: xcraft explains its logits "
                    f"({removed} is left out), as CRAFT does. Pass `explain_logits=False` to "
                    f"explain probabilities.",
                    UserWarning,
                    stacklevel=2,
                )
        else:
            removed = None
        g, h = split_model(model, layer)
        craft = cls(g, h, **kwargs)
        craft._source_model = model
        craft._source_layer = layer
        # Saved with the result, so that `load(..., model=)` strips the same softmax before
        # splitting the given model again for the decompositions.
        craft._source_logits = removed is not None
        return craft

    def _check_params(self):
        if not callable(self.input_to_latent_model):
            raise TypeError(
                "`input_to_latent_model` must be callable (a Keras model), got "
                f"{type(self.input_to_latent_model).__name__}."
            )
        if not callable(self.latent_to_logit_model):
            raise TypeError(
                "`latent_to_logit_model` must be callable (a Keras model), got "
                f"{type(self.latent_to_logit_model).__name__}."
            )
        v.check_positive_int(self.number_of_concepts, "number_of_concepts")
        v.check_positive_int(self.batch_size, "batch_size")
        v.check_positive_int(self.patch_size, "patch_size")
        v.check_choice(self.crops, "crops", CROP_STRATEGIES)
        v.check_positive_int(self.patches_per_image, "patches_per_image")
        v.check_choice(self.solver, "solver", SOLVERS)
        v.check_positive_int(self.max_iter, "max_iter")
        v.check_fraction(self.tol, "tol", low=0.0, high=1.0)
        if self.input_range is not None:
            _check_input_range(self.input_range)
        check_token_options(self.cls_token, self.token_grid)

    def _find_token_layout(self, one_image):
        """The split layer's token layout (None unless g returns (n, tokens, p)), checked."""
        shape = activation_shape(self.input_to_latent_model, one_image)
        if len(shape) == 3:
            return token_layout(shape, self.cls_token, self.token_grid)
        cls_token, token_grid = check_token_options(self.cls_token, self.token_grid)
        if cls_token != "auto" or token_grid is not None:
            raise ValueError(
                f"`cls_token` and `token_grid` apply to token layers, whose activations have "
                f"shape (batch, tokens, channels), got activations of shape {shape} with "
                f"cls_token={cls_token!r}, token_grid={token_grid!r}. Leave them at their "
                f"defaults, or split the model at a token layer."
            )
        return None

    def _warn_if_out_of_range(self, images, name):
        """Warn once when images leave the declared ``input_range`` (see the class docstring)."""
        if self.input_range is None or getattr(self, "_range_warned", False):
            return
        low, high = _check_input_range(self.input_range)
        slack = 1e-3 * (high - low)  # resizing and float round-off overshoot a little
        found_low, found_high = float(np.min(images)), float(np.max(images))
        if found_low < low - slack or found_high > high + slack:
            self._range_warned = True
            warnings.warn(
                f"`{name}` range from {found_low:.4g} to {found_high:.4g}, outside the declared "
                f"`input_range` ({low:g}, {high:g}). They are used as given: preprocess them as "
                f"the model expects (e.g. divide 0-255 pixels by 255 for a [0, 1] model).",
                UserWarning,
                stacklevel=3,
            )

    def _check_class_id(self, class_id, n_classes):
        detail = f" (the model has {n_classes} outputs)"
        return v.check_index(class_id, "class_id", n_classes, detail)

    # ----------------------------------------------------------------------------- fitting
    def fit(self, inputs, class_id=0, alpha_w=None):
        """Extract the concepts of class ``class_id`` from ``inputs``.

        Parameters
        ----------
        inputs : array-like of shape (n_images, height, width, channels)
            Images of the class, preprocessed as the model expects.
        class_id : int, default=0
            The class to explain (an index into the logits).
        alpha_w : None
            Accepted for Xplique compatibility (its sklearn NMF's regularisation of W). xcraft
            solves the unregularised problem; a non-zero value raises a warning and is ignored.

        Returns
        -------
        crops : xcraft.plumbing.crops.LazyCrops
            Array-like of shape (n_crops, height, width, channels).
            The crops, resized to the model's input (X in the paper). They are cut from the
            images when indexed (``crops[ids]``), so that many crops never fill the memory;
            ``np.asarray(crops)`` gives them all at once.
        crops_u : ndarray of shape (n_crops, number_of_concepts)
            The crops' concept coefficients (U in the paper).
        concept_bank_w : ndarray of shape (number_of_concepts, n_channels)
            The concept bank (W in the paper).

        Raises
        ------
        ValueError
            On images of the wrong shape or with NaN/inf, a ``patch_size`` larger than the
            images, fewer crops than concepts, negative activations, a ``class_id`` outside
            the logits.
        """
        from xcraft.ops.nmf import NMF
        from xcraft.ops.semi_nmf import SemiNMF

        self._check_params()
        if alpha_w:
            warnings.warn(
                f"`alpha_w` is ignored (got {alpha_w!r}): xcraft factorises without "
                f"regularisation, which reconstructs the activations at least as well.",
                UserWarning,
                stacklevel=2,
            )
        images = v.check_images(inputs, "inputs")
        check_images_fit_model(self.input_to_latent_model, images)
        self._warn_if_out_of_range(images, "inputs")
        rng = v.check_random_state(self.random_state)
        n_classes = count_classes(
            self.input_to_latent_model, self.latent_to_logit_model, images[:1]
        )
        class_id = self._check_class_id(class_id, n_classes)
        layout = self._find_token_layout(images[:1])
        boxes = sample_crop_boxes(
            images.shape[1:3],
            len(images),
            self.patch_size,
            strategy=self.crops,
            patches_per_image=self.patches_per_image,
            random_state=rng,
        )
        if len(boxes) < self.number_of_concepts:
            raise ValueError(
                f"`number_of_concepts` must be <= the number of crops ({len(boxes)}), got "
                f"{self.number_of_concepts}. Pass more images, more `patches_per_image` or a "
                f"smaller `patch_size`."
            )
        _check_concepts_fit_channels(self.input_to_latent_model, self.number_of_concepts)
        input_size = model_input_size(self.input_to_latent_model, images)
        activations, raw_min = pooled_crop_activations(
            self.input_to_latent_model,
            images,
            boxes,
            input_size,
            batch_size=self.batch_size,
            verbose=self.verbose,
            allow_negative=self.solver in ("semi-nmf", "auto"),
            return_min=True,
            tokens=layout,
        )
        solver = self.solver
        if solver == "auto":
            solver = "semi-nmf" if raw_min < -NEGATIVE_TOLERANCE else "hals"
            if solver == "semi-nmf":
                warnings.warn(
                    f"The activations of the split layer are signed (minimum {raw_min:.4g}): "
                    f"solver='auto' factorises them by semi-NMF (U >= 0, W of any sign).",
                    UserWarning,
                    stacklevel=2,
                )
        if solver == "semi-nmf":
            reducer = SemiNMF(
                self.number_of_concepts, max_iter=self.max_iter, tol=self.tol, random_state=rng
            )
        else:
            reducer = NMF(
                self.number_of_concepts,
                solver=solver,
                max_iter=self.max_iter,
                tol=self.tol,
                random_state=rng,
            )
        _check_channels(activations.shape[1], self.number_of_concepts)
        _warn_if_rank_deficient(activations, self.number_of_concepts)
        crops_u = reducer.fit_transform(activations).astype(np.float32)
        concept_bank_w = reducer.components_.astype(np.float32)
        if not (np.all(np.isfinite(crops_u)) and np.all(np.isfinite(concept_bank_w))):
            raise ValueError(
                f"The factorisation of the crops' activations diverged (NaN or inf), with "
                f"activations up to {float(activations.max()):.3g} from images up to "
                f"|{float(np.abs(images).max()):.3g}|. Check that `inputs` are preprocessed as "
                f"the model expects (values this large overflow float32)."
            )
        crops = self._cut_crops(images, boxes, input_size)

        self.images_ = images
        self.class_id_ = class_id
        self.n_classes_ = n_classes
        self.input_size_ = input_size
        self.token_layout_ = layout
        self.crop_boxes_ = boxes
        self.crop_activations_ = activations
        self.crops_u_ = crops_u
        self.concept_bank_w_ = concept_bank_w
        self.nmf_ = reducer
        self.solver_ = solver
        self.seed_sequence_ = rng.integers(2**31 - 1, size=4)
        self.importances_ = None
        self.children_ = {}
        self.factorization = Factorization(
            images, class_id, crops, reducer, crops_u, concept_bank_w
        )
        self.sensitivity = None
        return crops, crops_u, concept_bank_w

    def _cut_crops(self, images, boxes, input_size):
        """The resized crops, cut on demand (see :class:`xcraft.plumbing.crops.LazyCrops`)."""
        return LazyCrops(images, boxes, input_size, batch_size=max(self.batch_size, 256))

    def check_if_fitted(self):
        """Raise ``NotFittedError`` if :meth:`fit` has not been called (Xplique's name)."""
        v.check_is_fitted(self, ["concept_bank_w_"])

    # ------------------------------------------------------------------- fitted-state views
    @property
    def concept_bank_w(self):
        """The concept bank W, ndarray of shape (n_concepts, n_channels)."""
        self.check_if_fitted()
        return self.concept_bank_w_

    @property
    def crops_u(self):
        """The crops' coefficients U, ndarray of shape (n_crops, n_concepts)."""
        self.check_if_fitted()
        return self.crops_u_

    @property
    def crop_boxes(self):
        """``(image_index, y, x, size)`` of every crop, ndarray of shape (n_crops, 4)."""
        self.check_if_fitted()
        return self.crop_boxes_

    @property
    def importances(self):
        """The global importances from :meth:`estimate_importance`, or None."""
        return getattr(self, "importances_", None)

    # --------------------------------------------------------------------------- transform
    def transform(self, inputs, activations=None):
        """Return the concept coefficients U of ``inputs`` (NNLS against the concept bank).

        Parameters
        ----------
        inputs : array-like of shape (n_images, height, width, channels)
            Images; ignored when ``activations`` is given.
        activations : array-like of shape (n, p), (n, tokens, p) or (n, h, w, p), default=None
            Pre-computed activations of g.

        Returns
        -------
        ndarray of shape (n, number_of_concepts), (n, tokens, number_of_concepts) or \
(n, h, w, number_of_concepts)
            Non-negative coefficients minimising ½‖a − u W‖² for every row (every location for
            spatial activations, every token, leading ones included, for a token layer).
        """
        from xcraft.ops.nnls import solve_nnls

        self.check_if_fitted()
        activations = self._activations(inputs, activations)
        if activations.ndim == 3:  # tokens solved as a 1 × tokens map: (n, 1, t, p)
            return solve_nnls(activations[:, None], self.concept_bank_w_).numpy()[:, 0]
        return solve_nnls(activations, self.concept_bank_w_).numpy()

    def _fitted_u(self):
        """U of the fitted images, computed once: global importance and fidelity reuse it."""
        cached = getattr(self, "_fitted_u_cache", None)
        if cached is None or cached[0] is not self.concept_bank_w_:
            cached = (self.concept_bank_w_, self.transform(self.images_))
            self._fitted_u_cache = cached
        return cached[1]

    def _activations(self, inputs, activations=None, pool=False):
        if activations is None:
            images = v.check_images(inputs, "inputs")
            check_images_fit_model(self.input_to_latent_model, images)
            self._warn_if_out_of_range(images, "inputs")
            return batched_activations(
                self.input_to_latent_model, images, batch_size=self.batch_size, pool=pool,
                tokens=self.token_layout,
            )
        if hasattr(activations, "numpy"):
            activations = activations.numpy()
        activations = np.asarray(activations, np.float32)
        p = self.concept_bank_w_.shape[1]
        layout = self.token_layout
        if layout is not None:
            if activations.shape[1:] != (layout.n_tokens, p):
                raise ValueError(
                    f"`activations` must have shape (n, {layout.n_tokens}, {p}) (the split "
                    f"layer's tokens), got shape {activations.shape}."
                )
        elif activations.ndim not in (2, 4) or activations.shape[-1] != p:
            raise ValueError(
                f"`activations` must have shape (n, {p}) or (n, h, w, {p}), got shape "
                f"{activations.shape}."
            )
        if not np.all(np.isfinite(activations)):
            raise ValueError("`activations` must be finite, got NaN or infinite values.")
        signed = getattr(self, "solver_", "hals") == "semi-nmf"
        if not signed and activations.size and activations.min() < -NEGATIVE_TOLERANCE:
            raise ValueError(
                f"`activations` must be non-negative (outputs of the split layer, post-ReLU), "
                f"got a minimum of {float(activations.min()):.4g}."
            )
        if pool and activations.ndim == 4:
            activations = activations.mean(axis=(1, 2))
        elif pool and activations.ndim == 3:
            activations = layout.pooled_tokens(activations).mean(axis=1)
        return activations

    @property
    def token_layout(self):
        """The fitted token layout (see ``token_layout_``), None for other layers."""
        return getattr(self, "token_layout_", None)

    def fit_transform(self, inputs, class_id=0):
        """Fit on ``inputs`` and return their crops' coefficients U (n_crops, n_concepts)."""
        self.fit(inputs, class_id=class_id)
        return self.crops_u_

    # -------------------------------------------------------------------------- importance
    def estimate_importance(
        self,
        inputs=None,
        nb_design=32,
        sampler="sobol",
        *,
        method="sobol",
        estimator="jansen",
        reduce="mean",
        n_bootstrap=0,
        max_batch_bytes=2**28,
        fold_head=True,
        random_state=None,
        verbose=None,
        cmaps=None,
        afi_options=None,
    ):
        """Estimate how much each concept matters for the class (total Sobol indices).

        Parameters
        ----------
        inputs : array-like of shape (n_images, height, width, channels), default=None
            None: global importance over the fitted images, stored in ``self.sensitivity`` and
            ``self.importances``. Otherwise the mean importance over these images (local).
        nb_design : int, default=32
            Quasi-Monte-Carlo designs; the head runs ``nb_design · (r + 2)`` times per image.
        sampler : {"sobol", "halton", "lhs", "random"} or xplique MaskSampler, default="sobol"
            The masks' sampler.
        method : {"sobol", "tcav", "occlusion", "afi"}, default="sobol"
            Sobol total indices (the paper), TCAV-style directional derivatives, the score
            drop when a concept is removed, or AfI's (Wu et al., CVPR 2020): an occluder δ is
            learnt on the class's images (:class:`xcraft.AfI`) and each concept scores the
            mean drop of its coefficient under it, max(mean U(x) − U(x − δ), 0).
        estimator : {"jansen", "saltelli", "homma"}, default="jansen"
            Total-index estimator (Sobol only).
        reduce : {"mean", None}, default="mean"
            None returns per-image indices of shape (n_images, r).
        n_bootstrap : int, default=0
            Bootstrap resamples of the designs for confidence intervals (stored in
            ``self.sensitivity.intervals`` for the global estimate).
        max_batch_bytes : int, default=2**28
            Memory budget of one batch of perturbed activations.
        fold_head : bool, default=True
            Fold the head's leading affine layers (Flatten, pooling, Dense, ...) into the
            concept basis when it starts with them, so each perturbation costs a small product
            instead of a head evaluation (same result up to float rounding; see
            :func:`xcraft.craft.importance.concept_importance`). False always runs the whole head.
        random_state : int, Generator or None, default=None
            Seed of the masks; None uses the estimator's own ``random_state``.
        verbose : bool, default=None
            Progress bar; None follows the estimator's ``verbose``.
        cmaps : list, default=None
            Colours of the concepts for the plots (Xplique's argument).
        afi_options : dict, default=None
            ``method="afi"`` only: options of :class:`xcraft.AfI` (``max_steps``,
            ``l1_penalty``, ``proximal``, ...). The occluder is kept in ``self.afi_``.

        Returns
        -------
        importances : ndarray of shape (number_of_concepts,) or (n_images, number_of_concepts)
        """
        from xcraft.craft.importance import (
            clip_total_indices,
            concept_importance,
            sampler_name,
            split_importance_result,
        )

        self.check_if_fitted()
        v.check_choice(method, "method", IMPORTANCE_METHODS)
        nb_design = v.check_positive_int(nb_design, "nb_design")
        if reduce not in ("mean", None):
            raise ValueError(f"`reduce` must be 'mean' or None, got {reduce!r}.")
        is_global = inputs is None
        seed = self.seed_sequence_[1] if random_state is None else random_state
        if method == "afi":
            importances = self._afi_importance(inputs, seed, afi_options,
                                               self.verbose if verbose is None else verbose)
            if is_global:
                order = np.argsort(importances)[::-1]
                colours = cmaps if cmaps is not None else concept_colours(len(importances))
                self.importances_ = importances
                self.sensitivity = Sensitivity(importances, order, list(colours), None, method)
            return importances
        u = self._fitted_u() if is_global else self.transform(inputs)
        result = concept_importance(
            u,
            self.concept_bank_w_,
            self.latent_to_logit_model,
            self.class_id_,
            method=method,
            nb_design=nb_design,
            sampler=sampler_name(sampler),
            estimator=estimator,
            reduce=reduce,
            max_batch_bytes=max_batch_bytes,
            fold_head=bool(fold_head),
            random_state=seed,
            n_bootstrap=n_bootstrap,
            verbose=self.verbose if verbose is None else verbose,
        )
        importances, intervals = split_importance_result(result)
        if method == "sobol":
            importances, intervals = clip_total_indices(importances, intervals, nb_design)
        if is_global and reduce == "mean":
            order = np.argsort(importances)[::-1]
            colours = cmaps if cmaps is not None else concept_colours(len(importances))
            self.importances_ = importances
            self.sensitivity = Sensitivity(importances, order, list(colours), intervals, method)
        return importances

    def _afi_importance(self, inputs, seed, options, verbose):
        """AfI's concept scores (see :meth:`estimate_importance`), via the public ``xcraft.afi``."""
        from xcraft.afi import AfI, occluder_concept_importance
        from xcraft.plumbing.split import compose_models

        images = self.images_ if inputs is None else v.check_images(inputs, "inputs")
        model = getattr(self, "_source_model", None)
        if model is None:
            model = compose_models(self.input_to_latent_model, self.latent_to_logit_model,
                                   name="craft_classifier")
        input_range = self.input_range
        if input_range is None:  # the images' own range: the occluder must not leave it
            input_range = (float(np.min(images)), float(np.max(images)))
            if input_range[0] == input_range[1]:
                input_range = (input_range[0], input_range[0] + 1.0)
        options = dict(options or {})
        options.setdefault("random_state", int(seed))
        options.setdefault("verbose", bool(verbose))
        afi = AfI(model, input_range=tuple(input_range), **options)
        afi.fit(images, self.class_id_)
        self.afi_ = afi
        return occluder_concept_importance(
            afi.delta_, images, lambda x: self.transform(np.asarray(x)),
            input_range=tuple(input_range), batch_size=self.batch_size,
        )

    def concept_fidelity(
        self,
        inputs=None,
        methods=FIDELITY_METHODS,
        *,
        nb_design=32,
        n_random=10,
        random_state=None,
        verbose=None,
    ):
        """Deletion and insertion curves of the class score in concept space (paper, Fig. 6).

        Concepts are ordered by each importance method; deleting the top-k from U (or keeping
        only them), reconstructing A = U W and running h gives the class score against k. A
        faithful importance makes the deletion curve fall fast and the insertion curve rise
        fast. The methods' importances are computed here and not stored on the estimator.

        Parameters
        ----------
        inputs : array-like of shape (n_images, height, width, channels), default=None
            Images to average over; None for the fitted images.
        methods : sequence of {"sobol", "tcav", "occlusion", "afi"}, default=the first three
            The importance orders to compare (a random order is always added); ``"afi"`` learns
            an occluder first (see :meth:`estimate_importance`).
        nb_design : int, default=32
            Designs for the Sobol order.
        n_random : int, default=10
            Random orders averaged into the ``"random"`` curve.
        random_state : int, Generator or None, default=None
            Seed of the designs and random orders; None uses the estimator's own.
        verbose : bool, default=None
            Progress bars; None follows the estimator's ``verbose``.

        Returns
        -------
        xcraft.craft.fidelity.FidelityCurves
            Curves (logit and probability) and their areas per order.
        """
        from xcraft.craft.fidelity import concept_deletion_insertion
        from xcraft.craft.importance import concept_importance

        self.check_if_fitted()
        for method in methods:
            v.check_choice(method, "methods", IMPORTANCE_METHODS)
        u = self._fitted_u() if inputs is None else self.transform(inputs)
        seed = self.seed_sequence_[2] if random_state is None else random_state
        verbose = self.verbose if verbose is None else verbose
        orders = {
            method: self._afi_importance(inputs, seed, None, verbose) if method == "afi"
            else concept_importance(
                u,
                self.concept_bank_w_,
                self.latent_to_logit_model,
                self.class_id_,
                method=method,
                nb_design=nb_design,
                random_state=seed,
                verbose=verbose,
            )
            for method in methods
        }
        return concept_deletion_insertion(
            u,
            self.concept_bank_w_,
            self.latent_to_logit_model,
            self.class_id_,
            orders,
            n_random=n_random,
            random_state=seed,
            verbose=verbose,
        )

    # ------------------------------------------------------------------------- attribution
    def concept_model(self, concept_id=None, *, spatial=False):
        """Return a Keras model x ↦ U_i(x), differentiable through the NNLS (implicit gradient).

        Hand it to any TF attribution method (``xplique.attributions.GradCAM``, ``Saliency``,
        ``RISE``, ...) to explain a single concept.

        Parameters
        ----------
        concept_id : int, list of int or None, default=None
            The concept(s); None for all.
        spatial : bool, default=False
            Return the per-location (per-token) coefficients instead of their mean over the
            locations (the pooled tokens).

        Returns
        -------
        keras.Model
        """
        from xcraft.craft.attribution import build_concept_model

        self.check_if_fitted()
        return build_concept_model(
            self.input_to_latent_model, self.concept_bank_w_, concept_id, spatial=spatial,
            **self._token_options(),
        )

    def _token_options(self):
        """``cls_token`` and ``token_grid`` for the attribution functions (token layers only)."""
        if self.token_layout is None:
            return {}
        return {"cls_token": self.cls_token, "token_grid": self.token_grid}

    def concept_attribution_maps(self, inputs, concept_ids=None, method="saliency", **kwargs):
        """Return per-concept attribution maps at input resolution.

        Parameters
        ----------
        inputs : array-like of shape (n_images, height, width, channels)
        concept_ids : list of int, default=None
            None for all concepts.
        method : {"gradcam", "saliency", "gradient_input", "rise", "coefficients"}, \
default="saliency"
            Input saliency through the implicit NNLS gradient (the default: it localised the
            concepts best or second best on every benchmark of bench/README.md), Grad-CAM of
            U_i at the split layer through the implicit NNLS gradient (the paper's
            concept attribution maps; ``gradcam_layer=`` takes it at an earlier layer of g),
            gradient × input, RISE (black box), or Xplique's upsampled NNLS coefficients.
            For a token layer every method explains the mean over the pooled tokens and
            draws the patch tokens on their grid (see ``cls_token``, ``token_grid``).
        **kwargs
            Passed to :func:`xcraft.craft.attribution.concept_attribution_maps`.

        Returns
        -------
        ndarray of shape (n_images, n_selected_concepts, height, width)
        """
        from xcraft.craft.attribution import concept_attribution_maps

        self.check_if_fitted()
        images = v.check_images(inputs, "inputs")
        check_images_fit_model(self.input_to_latent_model, images)
        kwargs.setdefault("batch_size", self.batch_size)
        for name, value in self._token_options().items():
            kwargs.setdefault(name, value)
        if method == "rise":  # the estimator's seed, so that its maps (and plots) repeat
            kwargs.setdefault("random_state", int(self.seed_sequence_[3]))
        return concept_attribution_maps(
            images,
            self.input_to_latent_model,
            self.concept_bank_w_,
            concept_ids=concept_ids,
            method=method,
            **kwargs,
        )

    # ------------------------------------------------------------------------------ plots
    def _importances_for_display(self, importances=None):
        if importances is not None:
            return np.asarray(importances), None, "Local"
        if self.importances_ is None:
            raise ValueError(
                "`importances` must be given, or the global importances estimated first with "
                "`estimate_importance()`, got neither."
            )
        return self.importances_, self.sensitivity.intervals, "Global"

    def plot_concepts_importances(
        self,
        importances=None,
        display_importance_order=None,
        nb_most_important_concepts=None,
        verbose=False,
        **kwargs,
    ):
        """Bar chart of the concepts' importances (Xplique's method); returns the figure.

        ``importances=None`` draws the global ones with their confidence intervals, if any.
        """
        from xcraft.viz import plots

        self.check_if_fitted()
        values, intervals, scope = self._importances_for_display(importances)
        if verbose:
            for concept_id in np.argsort(-values, kind="stable")[:nb_most_important_concepts]:
                print(f"Concept {concept_id} has an importance value of {values[concept_id]:.2f}")
        kwargs.setdefault("title", f"{scope} concept importance (class {self.class_id_})")
        return plots.plot_concepts_importances(
            values, intervals=intervals, top_k=nb_most_important_concepts, **kwargs
        )

    def plot_concepts_crops(self, nb_crops=10, nb_most_important_concepts=None, verbose=False,
                            **kwargs):
        """The crops that most express each concept, one row per concept; returns the figure."""
        from xcraft.viz import plots

        self.check_if_fitted()
        if verbose and self.importances_ is not None:
            for concept_id in np.argsort(-self.importances_, kind="stable"):
                print(f"Concept {concept_id} has an importance value of "
                      f"{self.importances_[concept_id]:.2f}")
        return plots.plot_concepts_crops(self, nb_crops, nb_most_important_concepts, **kwargs)

    def _top_concepts(self, importances, n_concepts):
        order = np.argsort(-np.asarray(importances), kind="stable")
        return [int(c) for c in order[:n_concepts]]

    def plot_concept_attribution_maps(
        self,
        images,
        importances=None,
        nb_most_important_concepts=5,
        filter_percentile=90,
        alpha=0.65,
        cols=5,
        img_size=2.0,
        *,
        method="saliency",
    ):
        """Overlay the most important concepts' maps on each image (Xplique's method).

        Parameters
        ----------
        images : array-like of shape (n, height, width, channels) or one image
        importances : array-like of shape (number_of_concepts,), default=None
            Order of the concepts; None for the global importances.
        nb_most_important_concepts : int, default=5
            Concepts drawn per image, each in its own colour (any number works).
        filter_percentile : float, default=90
            Each map is hidden below this percentile of its values.
        alpha : float, default=0.65
        cols : int, default=5
        img_size : float, default=2.0
            Inches per image.
        method : str, default="saliency"
            Attribution method (see :meth:`concept_attribution_maps`).

        Returns
        -------
        matplotlib.figure.Figure
        """
        from xcraft.viz import plots

        self.check_if_fitted()
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        values, _, _ = self._importances_for_display(importances)
        concept_ids = self._top_concepts(values, nb_most_important_concepts)
        maps = self.concept_attribution_maps(images, concept_ids, method=method)
        return plots.plot_attribution_grid(
            images, maps, concept_ids, values[concept_ids], cols=cols, img_size=img_size,
            alpha=alpha, filter_percentile=filter_percentile,
        )

    def plot_image_concepts(
        self,
        img,
        display_importance_order="global",
        nb_most_important_concepts=5,
        filter_percentile=90,
        alpha=0.65,
        filepath=None,
        *,
        method="saliency",
        nb_crops=4,
        nb_design=32,
    ):
        """One image: its concepts' maps overlaid, then a panel and top crops per concept.

        Parameters
        ----------
        img : array-like of shape (height, width, channels)
        display_importance_order : {"global", "local"} or xplique DisplayImportancesOrder
            Rank the concepts by the class's global importance or by this image's own.
        nb_most_important_concepts : int, default=5
        filter_percentile : float, default=90
        alpha : float, default=0.65
        filepath : str, default=None
            Save the figure there (the figure is returned either way).
        method : str, default="saliency"
        nb_crops : int, default=4
            Example crops under each concept's panel.
        nb_design : int, default=32
            Designs for the local importance.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from xcraft.viz import plots

        self.check_if_fitted()
        image = v.check_images(np.asarray(img)[None], "img")
        order = getattr(display_importance_order, "name", display_importance_order)
        order = v.check_choice(str(order).lower(), "display_importance_order", ("global", "local"))
        if order == "local":
            values = self.estimate_importance(image, nb_design=nb_design)
        else:
            values, _, _ = self._importances_for_display(None)
        concept_ids = self._top_concepts(values, nb_most_important_concepts)
        maps = self.concept_attribution_maps(image, concept_ids, method=method)[0]
        crops = [
            self.factorization.crops[np.argsort(-self.crops_u_[:, c], kind="stable")[:nb_crops]]
            for c in concept_ids
        ]
        figure = plots.plot_image_concepts(
            image[0],
            maps,
            values[concept_ids],
            concept_ids=concept_ids,
            n_concepts=len(concept_ids),
            crops=crops,
            n_crops=nb_crops,
            alpha=alpha,
            filter_percentile=filter_percentile,
        )
        if filepath is not None:
            figure.savefig(filepath, bbox_inches="tight")
        return figure

    # ------------------------------------------------------------------------- recursion
    def decompose(
        self,
        concept_id,
        layer=None,
        number_of_concepts=5,
        percentile=90,
        *,
        model=None,
        split=None,
        nb_design=32,
        estimate_importance=True,
        n_bootstrap=0,
        **kwargs,
    ):
        """Refine concept ``concept_id`` into sub-concepts at an earlier layer.

        The crops whose coefficient of the concept is at or above its ``percentile``-th
        percentile are factorised again at ``layer``, and the sub-concepts' importances for the
        parent's class are estimated through the head that starts at ``layer``.

        Parameters
        ----------
        concept_id : int
            The concept to refine.
        layer : str or int
            The earlier split layer (non-negative activations).
        number_of_concepts : int, default=5
            Sub-concepts to extract.
        percentile : float, default=90
            Which crops to keep (``U_i >= percentile``-th percentile of ``U_i``).
        model : keras.Model, default=None
            The classifier that g and h were cut from. Not needed after
            :meth:`from_model`, which remembers it.
        split : tuple (g, h), default=None
            An explicit split at the earlier layer, instead of ``model`` and ``layer``.
        nb_design : int, default=32
            Designs for the sub-concepts' importance.
        estimate_importance : bool, default=True
            Estimate the sub-concepts' importance right away.
        n_bootstrap : int, default=0
            Bootstrap replicates for the sub-concepts' confidence intervals (see
            :meth:`estimate_importance`); the report shows them beside the children's bars.
        **kwargs
            Other ``CraftTf`` arguments for the child (they default to the parent's).

        Returns
        -------
        CraftTf
            The fitted child, also stored in ``self.children_[concept_id]``; its
            ``refinement_`` holds the coherence and reconstruction measures of
            :func:`xcraft.craft.recursion.refinement_metrics` and ``parent_crop_indices_`` the
            parent
            crops it was fitted on.

        Raises
        ------
        ValueError
            If the concept id is out of range, ``layer`` is not earlier than the parent's split,
            the model is unknown, or too few crops are selected.
        """
        from xcraft.craft.recursion import decompose_concept

        self.check_if_fitted()
        return decompose_concept(
            self, concept_id, layer, number_of_concepts, percentile, model=model, split=split,
            nb_design=nb_design, estimate_importance=estimate_importance,
            n_bootstrap=n_bootstrap, **kwargs,
        )

    # -------------------------------------------------------------------------------- io
    def save(self, path, *, overwrite=False):
        """Save the fitted state (and decompositions) to the directory ``path``, atomically.

        Arrays go to ``arrays.npz``, metadata (versions, parameters, layer, class id, seed,
        fingerprints of g and h) to ``metadata.json``; no pickle. Models are not saved: pass
        them again to :meth:`load`. ``path`` must be new, empty or an earlier result, unless
        ``overwrite=True``; files xcraft did not write are never deleted.
        """
        from xcraft.craft.io import save_craft

        save_craft(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path, input_to_latent_model, latent_to_logit_model, *, model=None,
             strict=True):
        """Load a result written by :meth:`save`; ``model`` restores decompositions.

        ``strict=False`` loads with a warning when g or h differ from the saved fingerprints.

        Returns
        -------
        CraftTf
            Whose ``transform``, importances and attribution maps equal the saved one's.
        """
        from xcraft.craft.io import load_craft

        return load_craft(cls, path, input_to_latent_model, latent_to_logit_model, model=model,
                          strict=strict)
