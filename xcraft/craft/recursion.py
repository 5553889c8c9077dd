"""Recursive decomposition: a concept's strong crops factorised again at an earlier layer.

Deep layers merge parts into one concept ("a dog's head" = ears + eyes + snout). CRAFT refines such
a concept by keeping only the crops where it is strong and factorising their activations at an
earlier layer, where the parts are still apart. This module holds the pieces that need no model:
selecting the crops, measuring how much the refinement gained, and the tree of concepts.
``CraftTf.decompose`` composes them with a new split of the model.
"""

import dataclasses

import numpy as np

from xcraft import _validation as v
from xcraft._validation import check_fraction
from xcraft.plumbing.split import layer_position, split_model

__all__ = [
    "select_strong_crops", "dominant_concepts", "refinement_metrics", "decompose_concept",
    "ConceptTree", "ConceptNode",
]

ARROW = " → "


def select_strong_crops(crops_u, concept_id, percentile=90.0):
    """Return the indices of the crops whose coefficient of ``concept_id`` is high.

    Parameters
    ----------
    crops_u : ndarray of shape (n_crops, n_concepts)
        The crops' concept coefficients U.
    concept_id : int
        The concept to refine.
    percentile : float, default=90
        Keep the crops with ``U[:, concept_id] >= np.percentile(U[:, concept_id], percentile)``
        and a strictly positive coefficient (a crop without the concept never refines it).

    Returns
    -------
    ndarray of int
        Crop indices, sorted by decreasing coefficient.
    """
    percentile = check_fraction(percentile, "percentile", low=0.0, high=100.0, inclusive_low=True)
    values = np.asarray(crops_u)[:, concept_id]
    threshold = np.percentile(values, percentile)
    selected = np.flatnonzero((values >= threshold) & (values > 0))
    return selected[np.argsort(-values[selected], kind="stable")]


def dominant_concepts(crops_u, concept_bank):
    """Return, for every crop, the concept that contributes most to its activations.

    The contribution of concept i to a crop's reconstruction ``u W`` is ``u_i W_i``, of norm
    ``u_i ‖W_i‖``. NMF leaves each concept's scale free (``u_i W_i = (s u_i)(W_i / s)``), so the
    largest raw coefficient ``u_i`` depends on how the solver happened to scale each row of W
    (their norms differ several-fold); the largest ``u_i ‖W_i‖`` does not.

    Parameters
    ----------
    crops_u : ndarray of shape (n_crops, n_concepts)
    concept_bank : ndarray of shape (n_concepts, n_channels)

    Returns
    -------
    ndarray of int of shape (n_crops,)
    """
    norms = np.linalg.norm(np.asarray(concept_bank, np.float64), axis=1)  # (n_concepts,)
    return np.argmax(np.asarray(crops_u, np.float64) * norms, axis=1)


def _mean_pairwise_cosine(vectors):
    """Mean cosine similarity over distinct pairs of rows (1.0 for fewer than two rows)."""
    if len(vectors) < 2:
        return 1.0
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, np.finfo(np.float64).tiny)
    similarity = unit @ unit.T  # (n, n)
    n = len(vectors)
    return float((similarity.sum() - np.trace(similarity)) / (n * (n - 1)))


def refinement_metrics(activations, u, concept_bank, *, n_top=10):
    """Measure what a decomposition gained, with numbers instead of a user study.

    Parameters
    ----------
    activations : ndarray of shape (n_crops, n_channels)
        The parent concept's strong crops, pooled at the child layer.
    u : ndarray of shape (n_crops, n_subconcepts)
        Their sub-concept coefficients.
    concept_bank : ndarray of shape (n_subconcepts, n_channels)
        The sub-concept bank.
    n_top : int, default=10
        Top crops per sub-concept used for its coherence.

    Returns
    -------
    dict
        ``parent_coherence``: mean pairwise cosine similarity of all the crops' activations;
        ``child_coherence``: the same over each sub-concept's ``n_top`` strongest crops (list);
        ``coherence_gain``: mean child coherence minus parent coherence (> 0: the sub-concepts'
        crops look more alike than the parent's); ``relative_reconstruction_error``:
        ‖A − U W‖_F / ‖A‖_F at the child layer.
    """
    activations = np.asarray(activations, np.float64)
    u = np.asarray(u, np.float64)
    parent = _mean_pairwise_cosine(activations)
    children = []
    for j in range(u.shape[1]):
        top = np.argsort(-u[:, j], kind="stable")[:n_top]
        top = top[u[top, j] > 0]
        children.append(_mean_pairwise_cosine(activations[top]))
    residual = activations - u @ np.asarray(concept_bank, np.float64)
    denominator = max(np.linalg.norm(activations), np.finfo(np.float64).tiny)
    return {
        "parent_coherence": float(parent),  # plain floats: JSON-ready, readable when printed
        "child_coherence": [float(c) for c in children],
        "coherence_gain": float(np.mean(children) - parent),
        "relative_reconstruction_error": float(np.linalg.norm(residual) / denominator),
    }


def decompose_concept(parent, concept_id, layer=None, number_of_concepts=5, percentile=90, *,
                      model=None, split=None, nb_design=32, estimate_importance=True,
                      n_bootstrap=0, **kwargs):
    """Fit the sub-concepts of concept ``concept_id`` of a fitted ``CraftTf`` at an earlier layer.

    The work behind :meth:`CraftTf.decompose`, whose docstring gives the parameters: the
    parent's strong crops (see :func:`select_strong_crops`) become the child's images, one grid
    crop each, and the child is an estimator of the parent's type with the parent's settings.

    Returns
    -------
    CraftTf
        The fitted child, also stored in ``parent.children_[concept_id]``.
    """
    n_concepts = parent.concept_bank_w_.shape[0]
    concept_id = v.check_index(concept_id, "concept_id", n_concepts)
    number_of_concepts = v.check_positive_int(number_of_concepts, "number_of_concepts")
    g_child, h_child, source = _child_split(parent, layer, model, split)
    selected = select_strong_crops(parent.crops_u_, int(concept_id), percentile)
    if len(selected) < number_of_concepts:
        raise ValueError(
            f"`number_of_concepts` must be <= the {len(selected)} crops where concept "
            f"{concept_id} is strong (percentile {percentile}), got {number_of_concepts}. "
            f"Lower `percentile`, or fit the parent on more images."
        )
    crops = parent.factorization.crops[selected]
    params = parent.get_params(deep=False)
    params.update(
        input_to_latent_model=g_child,
        latent_to_logit_model=h_child,
        number_of_concepts=number_of_concepts,
        patch_size=int(min(crops.shape[1:3])),
        crops="grid",  # one crop per image: each parent crop is a whole child image
    )
    params.update(kwargs)
    child = type(parent)(**params)
    child._source_model = source
    child._source_layer = layer
    child._source_logits = getattr(parent, "_source_logits", False) and source is getattr(
        parent, "_source_model", None)
    child.fit(crops, class_id=parent.class_id_)
    child.parent_crop_indices_ = selected
    child.parent_concept_id_ = int(concept_id)
    child.refinement_ = refinement_metrics(
        child.crop_activations_, child.crops_u_, child.concept_bank_w_
    )
    if estimate_importance:
        child.estimate_importance(nb_design=nb_design, n_bootstrap=n_bootstrap)
    parent.children_[int(concept_id)] = child
    return child


def _child_split(parent, layer, model, split):
    """Return (g, h, source model) for a decomposition at ``layer``."""
    if split is not None:
        if (
            not isinstance(split, (tuple, list))
            or len(split) != 2
            or not all(callable(part) for part in split)
        ):
            raise TypeError(
                f"`split` must be a pair (g, h) of Keras models, got {type(split).__name__}."
            )
        return split[0], split[1], model
    source = model if model is not None else getattr(parent, "_source_model", None)
    if source is None:
        raise ValueError(
            "`decompose` needs the full model to split it again at `layer`, but this "
            "CraftTf was built from (g, h) alone. Pass `model=` (the classifier g and h were "
            "cut from), `split=(g_earlier, h_earlier)`, or build it with "
            "`CraftTf.from_model(model, layer)`."
        )
    if layer is None:
        raise ValueError("`layer` must name the earlier layer to decompose at, got None.")
    parent_layer = getattr(parent, "_source_layer", None)
    if parent_layer is None:
        parent_layer = _cut_layer_in(source, parent.input_to_latent_model)
    if parent_layer is not None and layer_position(source, layer) >= layer_position(
        source, parent_layer
    ):
        raise ValueError(
            f"`layer` must come before the parent's split layer {parent_layer!r}, got "
            f"{layer!r}. Sub-concepts live in earlier layers, where parts are still apart."
        )
    g_child, h_child = split_model(source, layer)
    return g_child, h_child, source


def _cut_layer_in(source, feature_extractor):
    """The name of g's last layer when ``source`` has a layer of that name, else None.

    An estimator built from ``(g, h)`` does not know where g was cut; ``split_model`` keeps layer
    names, so g's output layer names the cut in the model it came from.
    """
    layers = getattr(feature_extractor, "layers", None)
    if not layers:
        return None
    name = layers[-1].name
    try:
        source.get_layer(name)
    except (ValueError, AttributeError):
        return None
    return name


@dataclasses.dataclass
class ConceptNode:
    """One concept of a :class:`ConceptTree`.

    Attributes
    ----------
    path : str
        ``"C3"`` for concept 3 of the root, ``"C3 → C3.1"`` for its sub-concept 1, ...
    concept_id : int
        Index of the concept in its estimator.
    craft : CraftTf
        The estimator the concept belongs to.
    depth : int
        0 for the root's concepts.
    importance : float or None
        The concept's importance for the class (None before ``estimate_importance``).
    refinement : dict or None
        For the root of a decomposition, what :func:`refinement_metrics` measured.
    """

    path: str
    concept_id: int
    craft: object
    depth: int
    importance: float = None
    refinement: dict = None

    @property
    def label(self):
        """The last element of the path, e.g. ``"C3.1"``."""
        return self.path.split(ARROW)[-1]

    def top_crops(self, n_crops=10):
        """Return the ``n_crops`` crops with the highest coefficient of this concept."""
        u = self.craft.crops_u_[:, self.concept_id]
        best = np.argsort(-u, kind="stable")[:n_crops]
        return self.craft.factorization.crops[best]


class ConceptTree:
    """The concepts of a fitted ``CraftTf`` and, recursively, of its decompositions.

    Parameters
    ----------
    root : CraftTf
        A fitted estimator; its ``children_`` (filled by ``decompose``) give the branches.

    Examples
    --------
    >>> tree = ConceptTree(craft)                                    # doctest: +SKIP
    >>> [node.path for node in tree]                                 # doctest: +SKIP
    ['C0', 'C1', 'C1 → C1.0', 'C1 → C1.1', 'C2']
    """

    separator = ARROW  # between the labels of a node's path; readers split paths on it

    def __init__(self, root):
        self.root = root

    def _walk(self, craft, prefix, depth):
        importances = getattr(craft, "importances_", None)
        order = (
            np.argsort(-importances, kind="stable")
            if importances is not None
            else np.arange(craft.concept_bank_w_.shape[0])
        )
        for concept_id in order:
            concept_id = int(concept_id)
            label = f"{prefix}.{concept_id}" if prefix else f"C{concept_id}"
            yield concept_id, label, depth, importances
            child = getattr(craft, "children_", {}).get(concept_id)
            if child is not None:
                yield from self._walk(child, label, depth + 1)

    def __iter__(self):
        """Iterate the nodes depth first, siblings by decreasing importance."""
        stack_paths = {}
        for concept_id, label, depth, importances in self._walk(self.root, "", 0):
            stack_paths[depth] = label
            path = ARROW.join(stack_paths[d] for d in range(depth + 1))
            craft = self._craft_at(path)
            importance = None if importances is None else float(importances[concept_id])
            refinement = None
            child = getattr(craft, "children_", {}).get(concept_id)
            if child is not None:
                refinement = getattr(child, "refinement_", None)
            yield ConceptNode(path, concept_id, craft, depth, importance, refinement)

    def _craft_at(self, path):
        """The estimator holding the last concept of ``path``."""
        craft = self.root
        for label in path.split(ARROW)[:-1]:
            concept_id = int(label.split(".")[-1].lstrip("C"))
            craft = craft.children_[concept_id]
        return craft

    def node(self, path):
        """Return the node at ``path`` (e.g. ``"C3 → C3.1"``; spaces around the arrow optional)."""
        wanted = ARROW.join(part.strip() for part in path.replace("->", "→").split("→"))
        for node in self:
            if node.path == wanted:
                return node
        paths = ", ".join(repr(n.path) for n in self)
        raise ValueError(f"`path` must be one of the tree's nodes ({paths}), got {path!r}.")

    def __len__(self):
        return sum(1 for _ in self)

    @property
    def depth(self):
        """The depth of the deepest node (0 when nothing was decomposed)."""
        return max(node.depth for node in self)

    def to_dict(self):
        """Return the tree as nested plain dicts (JSON-ready) for reports.

        Each node: ``{"path", "concept_id", "importance", "layer", "n_crops",
        "refinement", "children": [...]}``. ``n_crops`` counts the crops of the node's own
        estimator that the concept dominates (see :func:`dominant_concepts`): a sub-concept's
        count is among the parent's strong crops the child was fitted on, not among the parent's
        ``n_crops``.
        """

        def describe(craft, prefix):
            importances = getattr(craft, "importances_", None)
            layer = getattr(craft, "_source_layer", None)
            nodes = []
            order = (
                np.argsort(-importances, kind="stable")
                if importances is not None
                else range(craft.concept_bank_w_.shape[0])
            )
            dominant = dominant_concepts(craft.crops_u_, craft.concept_bank_w_)  # (n_crops,)
            for concept_id in order:
                concept_id = int(concept_id)
                label = f"{prefix}.{concept_id}" if prefix else f"C{concept_id}"
                child = getattr(craft, "children_", {}).get(concept_id)
                importance = None if importances is None else float(importances[concept_id])
                refinement = None if child is None else getattr(child, "refinement_", None)
                nodes.append(
                    {
                        "path": label,
                        "concept_id": concept_id,
                        "importance": importance,
                        "layer": layer if isinstance(layer, (str, int)) else None,
                        "n_crops": int(np.sum(dominant == concept_id)),
                        "refinement": refinement,
                        "children": [] if child is None else describe(child, label),
                    }
                )
            return nodes

        return {"class_id": int(self.root.class_id_), "concepts": describe(self.root, "")}

    def attribution_maps(self, images, path, *, method="saliency", **kwargs):
        """Maps of a concept and of its sub-concepts on ``images``.

        Parameters
        ----------
        images : array-like of shape (n, height, width, channels)
        path : str
            A decomposed node, e.g. ``"C3"``.
        method : str, default="saliency"
            Any method of ``CraftTf.concept_attribution_maps``.
        **kwargs
            Passed to ``concept_attribution_maps``.

        Returns
        -------
        parent : ndarray of shape (n, height, width)
            The concept's map (through the parent's split).
        children : ndarray of shape (n, n_subconcepts, height, width)
            Each sub-concept's map (through the child's earlier split).
        """
        node = self.node(path)
        child = getattr(node.craft, "children_", {}).get(node.concept_id)
        if child is None:
            decomposed = [n.path for n in self if n.concept_id in getattr(n.craft, "children_", {})]
            raise ValueError(
                f"`path` must name a decomposed concept ({', '.join(decomposed) or 'none yet'}), "
                f"got {path!r}. Call `decompose` on it first."
            )
        parent = node.craft.concept_attribution_maps(
            images, [node.concept_id], method=method, **kwargs
        )[:, 0]
        children = child.concept_attribution_maps(images, None, method=method, **kwargs)
        return parent, children

    def plot_attribution_maps(self, image, path, *, method="saliency", **kwargs):
        """Overlay a concept's map and its sub-concepts' maps on one image (one colour each)."""
        from xcraft.viz.plots import plot_concept_attribution_maps

        parent, children = self.attribution_maps(np.asarray(image)[None], path, method=method)
        node = self.node(path)
        maps = np.concatenate([parent[:, None], children], axis=1)[0]  # (1 + k, H, W)
        child = node.craft.children_[node.concept_id]
        names = [node.label] + [f"{node.label}.{j}" for j in range(children.shape[1])]
        importances = None
        if node.importance is not None and child.importances_ is not None:
            importances = np.concatenate([[node.importance], child.importances_])
        kwargs.setdefault("title", f"{node.label} and its sub-concepts")
        return plot_concept_attribution_maps(image, maps, names, importances, **kwargs)

    def plot(self, n_crops=5, **kwargs):
        """Draw the tree, each node with its top crops and importance (see ``xcraft.viz.plots``)."""
        from xcraft.viz.plots import plot_concept_tree

        return plot_concept_tree(self, n_crops=n_crops, **kwargs)
