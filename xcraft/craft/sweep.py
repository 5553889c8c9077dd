"""Where to look and how many concepts: a layer × rank sweep of CRAFT's factorisation.

For every candidate layer and number of concepts r, :func:`sweep` fits CRAFT on the class's
images with several seeds and measures what decides the choice:

- ``relative_error``: ‖A − U W‖_F / ‖A‖_F on the crops' activations (how much of the layer
  the concepts keep);
- ``logit_r2`` and ``top1_agreement``: on held-out images, the layer's activations are replaced
  by their concept reconstruction U(x) W (exact NNLS at every location) and pushed through the
  rest of the model. R² of the class logit against the original one, and the share of images
  whose predicted class is unchanged (how much of the *decision* the concepts keep);
- ``stability``: the concept banks of the other seeds matched to the first seed's by the
  Hungarian algorithm on cosine similarity, mean matched cosine (1: the same concepts whatever
  the seed);
- ``seconds``: mean time of one fit.

Recommendation rule (documented, not tuned): a candidate qualifies when ``top1_agreement >=
min_agreement`` (the concepts keep the model's decisions) and ``stability >= min_stability``
(they do not depend on the seed). Among qualifying candidates the latest layer wins (deeper
layers carry the more semantic concepts CRAFT is after), then the smallest rank there (fewer
concepts are easier to read). When none qualifies, the candidate with the highest agreement,
then R², is recommended and ``qualified`` says so. R² is reported, not used by the rule: within
one class the class logit varies little, so a small offset of the reconstruction drives R²
below 0 while every decision is kept (the embedded demo's ``pool2`` at r = 3: R² −8, top-1 1.0).
"""

import time
import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment

from xcraft import _validation as v
from xcraft.plumbing.activations import batched_activations, call_model
from xcraft.plumbing.split import layer_position, split_model
from xcraft.plumbing.tokens import check_token_options

__all__ = ["sweep", "SWEEP_FIELDS"]

SWEEP_FIELDS = ("layer", "rank", "relative_error", "logit_r2", "top1_agreement", "stability",
                "seconds")


def _matched_cosine(reference, other):
    """Mean cosine of the rows of ``other`` matched one-to-one to ``reference``'s."""
    def unit(w):
        norms = np.linalg.norm(w, axis=1, keepdims=True)
        return w / np.maximum(norms, np.finfo(np.float64).tiny)

    cosine = unit(np.asarray(reference, np.float64)) @ unit(np.asarray(other, np.float64)).T
    rows, cols = linear_sum_assignment(-cosine)
    return float(cosine[rows, cols].mean())


def _fidelity(craft, held_out, class_id, batch_size):
    """R² of the class logit and top-1 agreement when the layer is replaced by U(x) W.

    The coefficients are CraftTf's own (``transform``): one NNLS per row, per location of a
    spatial layer, per token of a token layer (the leading tokens included, rebuilt from their
    own coefficients as in the importance), so the figures are those of the fitted estimator.
    """
    import tensorflow as tf

    g, h = craft.input_to_latent_model, craft.latent_to_logit_model
    activations = batched_activations(g, held_out, batch_size=batch_size,
                                      tokens=craft.token_layout)  # (n, ..., p), every token
    bank = craft.concept_bank_w_  # (r, p)
    original, rebuilt = [], []
    for start in range(0, len(activations), batch_size):
        a = activations[start:start + batch_size]
        u = craft.transform(None, activations=a)  # (n, ..., r)
        reconstruction = np.tensordot(u, bank, axes=[[-1], [0]]).astype(np.float32)
        original.append(call_model(h, tf.constant(a)).numpy())
        rebuilt.append(call_model(h, tf.constant(reconstruction)).numpy())
    original, rebuilt = np.concatenate(original), np.concatenate(rebuilt)
    target, estimate = original[:, class_id], rebuilt[:, class_id]
    total = np.sum((target - target.mean()) ** 2)
    r2 = 1.0 - np.sum((target - estimate) ** 2) / total if total > 0 else float("nan")
    agreement = float(np.mean(original.argmax(1) == rebuilt.argmax(1)))
    return float(r2), agreement


def _recommend(rows, min_agreement, min_stability, order):
    def stable(row):  # a single seed has no stability: it does not block the choice
        return np.isnan(row["stability"]) or row["stability"] >= min_stability

    qualifying = [r for r in rows if r["top1_agreement"] >= min_agreement and stable(r)]
    if qualifying:
        best = max(qualifying, key=lambda r: (order[r["layer"]], -r["rank"]))
        return {"layer": best["layer"], "rank": best["rank"], "qualified": True}
    best = max(rows, key=lambda r: (r["top1_agreement"],
                                    np.nan_to_num(r["logit_r2"], nan=-np.inf), -r["rank"]))
    return {"layer": best["layer"], "rank": best["rank"], "qualified": False}


def sweep(model, layers, images, class_id, ranks=(5, 10, 20, 40), *, n_seeds=3,
          held_out=0.25, patch_size=None, patches_per_image=10, solver="auto", batch_size=64,
          min_agreement=0.95, min_stability=0.8, cls_token="auto", token_grid=None,
          random_state=0, verbose=False):
    """Fit CRAFT at every layer × rank and measure error, logit fidelity and stability.

    Parameters
    ----------
    model : keras.Model
        The classifier (returning logits).
    layers : sequence of str or int
        Candidate split layers.
    images : ndarray of shape (n_images, height, width, channels)
        Images of the class, preprocessed for the model.
    class_id : int
        The explained class.
    ranks : sequence of int, default=(5, 10, 20, 40)
        Numbers of concepts to try (those above a layer's channel count or crop count are
        skipped with a warning).
    n_seeds : int, default=3
        Fits per candidate; stability needs at least 2.
    held_out : float, default=0.25
        Share of the images kept out of the fits for the logit fidelity.
    patch_size : int, default=None
        Crop side; None uses 2/7 of the images' side (the paper's 64 px at 224 px).
    patches_per_image : int, default=10
    solver : str, default="auto"
        As :class:`xcraft.CraftTf` (``"auto"``: semi-NMF on signed layers).
    batch_size : int, default=64
    min_agreement, min_stability : float, default=0.95, 0.8
        Thresholds of the recommendation rule (see the module docstring).
    cls_token : {"auto", "exclude", "keep"} or int, default="auto"
        Token layers of transformers only (activations (n, tokens, channels)): the leading
        (CLS, register) tokens, as :class:`xcraft.CraftTf`'s ``cls_token``. They are left out
        of (or, with ``"keep"``, pooled into) the crops' activations the error is measured on,
        and always rebuilt from their own coefficients in the logit fidelity. Candidates at
        other layers ignore it.
    token_grid : tuple (height, width) or None, default=None
        Token layers only: the patch grid, as :class:`xcraft.CraftTf`'s ``token_grid``.
    random_state : int, default=0
        Seed of the split into fitted and held-out images and of the first fit; the other
        seeds are ``random_state + 1, ...``.
    verbose : bool, default=False
        Print one line per candidate.

    Returns
    -------
    results : dict
        ``"rows"``: one dict per (layer, rank) with the keys of ``SWEEP_FIELDS``;
        ``"recommendation"``: ``{"layer", "rank", "qualified"}``; ``"monotone"``: per layer,
        whether the reconstruction error decreased with the rank (not guaranteed: each rank is
        its own factorisation, and a warning says where it rose); ``"split"``: the indices
        into ``images`` of the ``"fitted"`` and the ``"held_out"`` images (a candidate's first
        fit is ``CraftTf(..., random_state=random_state).fit(images[split["fitted"]])``);
        ``"rule"``: the thresholds the recommendation used.

    Examples
    --------
    >>> result = sweep(model, ["pool1", "pool2"], images, 1, ranks=(4, 8))  # doctest: +SKIP
    >>> result["recommendation"]                                            # doctest: +SKIP
    {'layer': 'pool2', 'rank': 4, 'qualified': True}
    """
    from xcraft.craft.estimator import CraftTf

    images = v.check_images(images, "images")
    if isinstance(layers, (str, int)):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` must name at least one layer, got none.")
    ranks = sorted({v.check_positive_int(r, "ranks") for r in ranks})
    n_seeds = v.check_positive_int(n_seeds, "n_seeds")
    held_out = v.check_fraction(held_out, "held_out", low=0.0, high=1.0)
    if isinstance(random_state, bool) or not isinstance(random_state, int):
        raise TypeError(f"`random_state` must be an int, got {type(random_state).__name__}.")
    rng = np.random.default_rng(random_state)
    order = rng.permutation(len(images))
    n_held = max(1, int(round(held_out * len(images))))
    if len(images) - n_held < 2:
        raise ValueError(
            f"`images` must leave at least 2 images to fit after holding out {n_held}, got "
            f"{len(images)} images."
        )
    fit_images, test_images = images[order[n_held:]], images[order[:n_held]]
    if patch_size is None:
        patch_size = max(1, round(64 / 224 * min(images.shape[1:3])))
    cls_token, token_grid = check_token_options(cls_token, token_grid)
    positions = {layer: layer_position(model, layer) for layer in layers}

    rows, monotone = [], {}
    for layer in layers:
        g, h = split_model(model, layer)
        # CraftTf refuses token options at a layer without tokens: a sweep over a transformer's
        # layers may well cross one (the patch embedding's map), which keeps the defaults.
        tokens = ({"cls_token": cls_token, "token_grid": token_grid}
                  if len(g.output.shape) == 3 else {})
        errors = []
        for rank in ranks:
            banks, seconds, first = [], [], None
            try:
                for seed in range(n_seeds):
                    craft = CraftTf(g, h, number_of_concepts=rank, patch_size=patch_size,
                                    patches_per_image=patches_per_image, solver=solver,
                                    batch_size=batch_size, random_state=random_state + seed,
                                    verbose=False, **tokens)
                    start = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # one line per candidate instead
                        craft.fit(fit_images, class_id=class_id)
                    seconds.append(time.perf_counter() - start)
                    banks.append(craft.concept_bank_w_)
                    if first is None:
                        first = craft
            except ValueError as err:
                if "number_of_concepts" not in str(err):
                    raise
                warnings.warn(f"Skipped layer {layer!r} at rank {rank}: {err}", UserWarning,
                              stacklevel=2)
                continue
            a = first.crop_activations_
            error = float(np.linalg.norm(a - first.crops_u_ @ first.concept_bank_w_)
                          / max(np.linalg.norm(a), np.finfo(np.float64).tiny))
            r2, agreement = _fidelity(first, test_images, class_id, batch_size)
            stability = (float(np.mean([_matched_cosine(banks[0], b) for b in banks[1:]]))
                         if len(banks) > 1 else float("nan"))
            row = {"layer": layer, "rank": rank, "relative_error": error, "logit_r2": r2,
                   "top1_agreement": agreement, "stability": stability,
                   "seconds": float(np.mean(seconds))}
            rows.append(row)
            errors.append(error)
            if verbose:
                print(f"{layer!s:>16} r={rank:<4} error {error:.3f}  logit R² {r2:.3f}  top-1 "
                      f"{agreement:.2f}  stability {stability:.3f}  {row['seconds']:.1f} s")
        # Differences below float32 round-off of the error are not rises.
        monotone[layer] = bool(np.all(np.diff(errors) <= 1e-3 * max(errors, default=0) + 1e-6))
        if not monotone[layer]:
            warnings.warn(
                f"At layer {layer!r} the reconstruction error rose with the rank somewhere "
                f"({', '.join(f'{e:.3f}' for e in errors)}): each rank is its own "
                f"factorisation from its own start, not a nested one.",
                UserWarning,
                stacklevel=2,
            )
    if not rows:
        raise ValueError("No layer × rank candidate could be fitted: lower `ranks`.")
    return {"rows": rows, "recommendation": _recommend(rows, min_agreement, min_stability,
                                                            positions),
            "monotone": monotone,
            "split": {"fitted": order[n_held:].tolist(), "held_out": order[:n_held].tolist()},
            "rule": {"min_agreement": float(min_agreement),
                     "min_stability": float(min_stability)}}
