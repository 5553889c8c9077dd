import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import _synthetic  # noqa: E402
from xcraft.craft.estimator import CraftTf  # noqa: E402


@pytest.fixture(scope="module")
def craft(motif_set, motif_model):
    images, _ = motif_set
    craft = CraftTf.from_model(motif_model, _synthetic.FEATURE_LAYER, number_of_concepts=3,
                               patch_size=12, random_state=0, verbose=False)
    craft.fit(images[:12], class_id=0)
    craft.estimate_importance(nb_design=8, n_bootstrap=20)
    return craft


def _bar_heights(figure):
    return sorted(p.get_width() for ax in figure.axes for p in ax.patches)


def test_importance_plot_draws_every_concept(craft):
    figure = craft.plot_concepts_importances()
    np.testing.assert_allclose(_bar_heights(figure), np.sort(craft.importances), rtol=1e-6)
    plt.close(figure)


def test_importance_plot_needs_importances(motif_set, motif_model):
    images, _ = motif_set
    unestimated = CraftTf.from_model(motif_model, _synthetic.FEATURE_LAYER, number_of_concepts=2,
                                     patch_size=12, verbose=False)
    unestimated.fit(images[:4])
    with pytest.raises(ValueError, match=r"`importances` must be given, or the global"):
        unestimated.plot_concepts_importances()


def test_crops_and_maps_and_image_concepts(craft, motif_set, tmp_path):
    images, _ = motif_set
    for figure in (
        craft.plot_concepts_crops(nb_crops=3),
        craft.plot_concept_attribution_maps(images[:3], nb_most_important_concepts=2),
        craft.plot_image_concepts(images[0], filepath=tmp_path / "image.png"),
        craft.plot_image_concepts(images[0], display_importance_order="local", nb_design=4),
    ):
        assert figure.axes
        plt.close(figure)
    assert (tmp_path / "image.png").stat().st_size > 1000


def test_sweep_plot_rings_the_recommendation():
    from xcraft.viz.plots import plot_sweep

    rows = [{"layer": layer, "rank": rank, "relative_error": 1 / rank, "top1_agreement": 1.0,
             "stability": 0.9, "logit_r2": 0.5, "seconds": 0.1}
            for layer in ("a", "b") for rank in (2, 4, 8)]
    figure = plot_sweep({"rows": rows, "recommendation": {"layer": "b", "rank": 4,
                                                          "qualified": True}})
    axes = figure.axes
    assert len(axes) == 3
    # Two layer lines per panel plus the ring around the recommended point.
    assert all(len(ax.lines) == 3 for ax in axes)
    ring = axes[0].lines[-1]
    assert list(ring.get_xdata()) == [4] and ring.get_ydata()[0] == 0.25
    assert "layer 'b', r = 4" in figure._suptitle.get_text()


def test_overlay_shows_heavy_tailed_saliency_maps():
    # Gradient maps are heavy-tailed: scaled by their maximum, the pixels kept above the 90th
    # percentile drew at a few percent opacity on a 160 px photo (issue 19). Every kept pixel
    # must now be drawn at least at MIN_VISIBLE_OPACITY * alpha, most of them well above it.
    from xcraft.viz import plots

    rng = np.random.default_rng(0)
    saliency = rng.lognormal(mean=0.0, sigma=2.0, size=(160, 160))
    saliency[80, 80] = saliency.max() * 50.0  # one hot pixel
    alpha = 0.6
    layer = plots._overlay_layer([saliency], np.array([[1.0, 0.0, 0.0]]), alpha, 90)
    opacity = layer[..., 3]
    kept = saliency >= np.percentile(saliency, 90)
    assert np.all(opacity[kept] >= plots.MIN_VISIBLE_OPACITY * alpha - 1e-12)
    assert np.all(opacity[~kept] == 0.0)
    assert np.median(opacity[kept]) > 0.3
    # By its maximum, the same map's kept pixels had a median opacity under 0.01.
    by_max = alpha * np.where(kept, saliency / saliency.max(), 0.0)
    assert np.median(by_max[kept]) < 0.01
    # Scaling is monotone: a stronger pixel is never drawn fainter.
    order = np.argsort(saliency[kept])
    assert np.all(np.diff(opacity[kept][order]) >= -1e-12)


def test_overlay_colours_each_pixel_by_its_strongest_concept():
    from xcraft.viz import plots

    left = np.zeros((8, 8))
    left[:, :4] = 1.0
    right = np.zeros((8, 8))
    right[:, 4:] = 2.0  # a larger scale must not win: each map is scaled on its own
    colours = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    layer = plots._overlay_layer([left, right], colours, 0.5, 0)
    np.testing.assert_array_equal(layer[:, :4, :3], np.broadcast_to(colours[0], (8, 4, 3)))
    np.testing.assert_array_equal(layer[:, 4:, :3], np.broadcast_to(colours[1], (8, 4, 3)))
    np.testing.assert_allclose(layer[..., 3], 0.5)
