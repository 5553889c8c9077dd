"""The evaluations of Wu et al. (CVPR 2020): the distillation test and SSC / SDC curves.

- **Distillation** (their Table 2): if the channel weights of a layer capture what the model
  uses for class y, a small student MLP (32-16-2) trained on the meta-detectors' outputs alone
  separates y from the other classes. The same student on meta-detectors weighted by the
  gradient-based, TCAV-style channel importance (the mean over the class's images of the
  spatially summed gradient of the class logit with respect to each channel) is the baseline.
- **SSC / SDC** (smallest sufficient / destroying concepts, after Ghorbani et al., 2019): with
  concepts located in each image by masks, add the k most important concepts to a blank image
  (sufficiency) or remove them from the source (destruction) and measure the accuracy on the
  class against k.
"""

import numpy as np
import tensorflow as tf

from xcraft._validation import check_images, check_positive_int, check_random_state

__all__ = ["gradient_channel_importance", "distillation_test", "ssc_sdc_curves"]

#: The student of the distillation test: two hidden layers, then the 2-way output.
STUDENT_LAYERS = (32, 16)


def gradient_channel_importance(model, layer, images, class_id, *, batch_size=64):
    """Return the gradient-based channel importance of ``layer`` for ``class_id``, in [0, 1].

    w_c = max(mean_i Σ_{h,w} ∂Z_y / ∂A_c(x_i), 0), divided by the largest.

    Parameters
    ----------
    model : keras.Model
    layer : str
        A layer every path of the model goes through (see :func:`xcraft.split_model`).
    images : ndarray of shape (n_images, height, width, channels)
    class_id : int
    batch_size : int, default=64

    Returns
    -------
    ndarray of shape (channels,), float32
    """
    from xcraft.plumbing.split import split_model

    images = check_images(images)
    batch_size = check_positive_int(batch_size, "batch_size")
    g, h = split_model(model, layer)

    @tf.function(reduce_retracing=True)
    def summed_gradient(batch):
        activations = g(batch, training=False)
        with tf.GradientTape() as tape:
            tape.watch(activations)
            score = tf.reduce_sum(h(activations, training=False)[:, class_id])
        grad = tape.gradient(score, activations)
        return tf.reduce_sum(tf.reshape(grad, [-1, grad.shape[-1]]), axis=0)

    total = None
    for start in range(0, len(images), batch_size):
        part = summed_gradient(tf.constant(images[start:start + batch_size])).numpy()
        total = part if total is None else total + part
    weights = np.maximum(total / len(images), 0.0)
    top = weights.max()
    return (weights / top if top > 0 else np.zeros_like(weights)).astype(np.float32)


def _detector_features(afi, images, layers, weights):
    parts = []
    for layer in layers:
        detector = afi.meta_detector(layer, weights=None if weights is None else weights[layer])
        from xcraft.plumbing.activations import batched_activations

        out = batched_activations(detector, images, batch_size=int(afi.batch_size))
        parts.append(out.reshape(len(images), -1))
    return np.concatenate(parts, axis=1)


def distillation_test(afi, images, labels, *, layers=None, test_size=0.3, max_iter=500,
                      random_state=None):
    """Train the 32-16-2 student on meta-detector outputs: AfI weights against gradient weights.

    Parameters
    ----------
    afi : AfI
        A fitted estimator (its class is the positive class).
    images : ndarray of shape (n_images, height, width, channels)
        Images of the class and of other classes.
    labels : ndarray of shape (n_images,)
        Their classes; the student separates ``labels == afi.class_id_`` from the rest.
    layers : list of str, optional
        Layers whose meta-detectors feed the student (concatenated); default all analysed.
    test_size : float, default=0.3
        Held-out fraction (stratified).
    max_iter : int, default=500
        Epochs of the student (scikit-learn's ``MLPClassifier``, Adam).
    random_state : int, numpy.random.Generator or None, default=None
        Seeds the split and the students' initialisation.

    Returns
    -------
    dict
        ``{"afi": accuracy, "gradient": accuracy, "n_train", "n_test", "layers"}``, the test
        accuracies of the two students.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    low, high = (float(v) for v in afi.input_range)
    images = afi._check_images(images, "images", low, high)
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(
            f"`labels` must have shape ({len(images)},), one per image, got {labels.shape}."
        )
    target = (labels == afi.class_id_).astype(int)
    if target.min() == target.max():
        raise ValueError(
            f"`labels` must hold both class {afi.class_id_} and other classes, got only "
            f"{'the class' if target[0] else 'other classes'}."
        )
    layers = list(afi.channel_importance_) if layers is None else [
        afi._check_fitted_layer(layer) for layer in layers]
    rng = check_random_state(random_state)
    split_seed, student_seed = (int(s) for s in rng.integers(2**31 - 1, size=2))
    train, test = train_test_split(np.arange(len(images)), test_size=test_size,
                                   stratify=target, random_state=split_seed)
    positives = images[labels == afi.class_id_]
    gradient_weights = {layer: gradient_channel_importance(afi.model, layer, positives,
                                                           afi.class_id_) for layer in layers}
    accuracies = {}
    for name, weights in (("afi", None), ("gradient", gradient_weights)):
        features = _detector_features(afi, images, layers, weights)
        student = make_pipeline(StandardScaler(), MLPClassifier(
            hidden_layer_sizes=STUDENT_LAYERS, max_iter=max_iter, random_state=student_seed))
        student.fit(features[train], target[train])
        accuracies[name] = float(student.score(features[test], target[test]))
    return {**accuracies, "n_train": len(train), "n_test": len(test), "layers": layers}


def ssc_sdc_curves(model, images, masks, order, class_id, *, baseline=0.0, batch_size=64):
    """Accuracy on the class as the top-k concepts are added to a blank image or removed.

    Parameters
    ----------
    model : keras.Model
        Returns logits.
    images : ndarray of shape (n_images, height, width, channels)
        Source images of the class.
    masks : dict of str to ndarray of shape (n_images, height, width)
        Where each concept is in each image (boolean or 0/1).
    order : sequence of str
        Concept names by decreasing importance (a subset of ``masks``' keys).
    class_id : int
    baseline : float or ndarray broadcastable to the images, default=0.0
        The blank image (and what removed concepts are replaced by).
    batch_size : int, default=64

    Returns
    -------
    dict
        ``counts`` (0..K), ``ssc`` (accuracy with only the top-k concepts on the blank image:
        sufficiency, should rise fast) and ``sdc`` (accuracy with the top-k removed from the
        source: destruction, should fall fast), arrays of length K + 1.
    """
    from xcraft.plumbing.activations import batched_activations

    images = check_images(images)
    order = list(order)
    unknown = [name for name in order if name not in masks]
    if unknown:
        listed = ", ".join(repr(n) for n in masks)
        raise ValueError(f"`order` must name concepts of `masks` ({listed}), got {unknown}.")
    stacked = []
    for name in order:
        mask = np.asarray(masks[name], bool)
        if mask.shape != images.shape[:3]:
            raise ValueError(
                f"`masks[{name!r}]` must have shape {images.shape[:3]} (one mask per image), "
                f"got {mask.shape}."
            )
        stacked.append(mask)
    blank = np.broadcast_to(np.asarray(baseline, np.float32), images.shape)
    ssc, sdc = [], []
    union = np.zeros(images.shape[:3], bool)
    for k in range(len(order) + 1):
        if k:
            union = union | stacked[k - 1]
        keep = union[..., None]
        added = np.where(keep, images, blank)
        removed = np.where(keep, blank, images)
        for curve, batch in ((ssc, added), (sdc, removed)):
            logits = batched_activations(model, batch, batch_size=batch_size)
            curve.append(float(np.mean(np.argmax(logits, axis=1) == class_id)))
    return {"counts": np.arange(len(order) + 1), "ssc": np.asarray(ssc),
            "sdc": np.asarray(sdc), "order": order}
