"""Coupled NMF figures and report: drawn from planted factors, written together."""

import json

import keras
import numpy as np
import pytest

from xcraft.coupled import CoupledNMF, build_blocks
from xcraft.coupled import analysis as an
from xcraft.viz.coupled import (
    COUPLED_REPORT_FILE,
    COUPLED_SUMMARY_FILE,
    coupled_report_section,
    plot_class_mass,
    plot_cosine_eigenvalues,
    plot_factor_similarity,
    plot_factor_top_images,
    plot_pixel_masks,
    plot_rank_curve,
    write_coupled_report,
)


@pytest.fixture(scope="module")
def planted_fit():
    """Three classes of 8x8 images, each lit in its own third of the image; a ReLU conv."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    images = 0.05 * rng.uniform(size=(36, 8, 8, 1)).astype("float32")
    for c in range(3):
        images[labels == c, :, 3 * c:3 * c + 2] += 1.0
    model = keras.Sequential([keras.Input((8, 8, 1)),
                              keras.layers.Conv2D(2, 3, activation="relu", name="conv"),
                              keras.layers.MaxPooling2D(name="pool")])
    model.get_layer("conv").set_weights([np.abs(rng.normal(size=(3, 3, 1, 2))).astype("float32"),
                                         np.zeros(2, "float32")])
    blocks = build_blocks(model, ["conv", "pool"], images)
    estimator = CoupledNMF(3, max_iter=300, random_state=0).fit(blocks)
    return estimator, blocks, images, labels


def test_plots_return_figures(planted_fit):
    estimator, blocks, images, labels = planted_fit
    top = an.top_examples(estimator.examples_, k=4)
    assert len(plot_factor_top_images(images, top).axes) == 12
    maps = an.pixel_maps(estimator.components_, blocks)
    masks = an.pixel_masks(maps)
    assert len(plot_pixel_masks(images, top, masks, maps=maps).axes) == 15
    eigenvalues = an.cosine_eigenvalues(estimator.components_, names=["conv", "pool"])
    assert len(plot_cosine_eigenvalues(eigenvalues).axes) == 2
    assert len(plot_factor_similarity({n: an.cosine_similarity(estimator.components_[n])
                                       for n in eigenvalues}).axes) == 3  # 2 maps + colour bar
    mass = an.class_mass(estimator.examples_, labels)
    assert len(plot_class_mass(mass, class_names=["a", "b", "c"]).axes) == 2
    curve = {"ranks": np.array([1, 2, 3]), "error": np.array([0.5, 0.3, 0.1]),
             "block_errors": {"conv": np.array([0.4, 0.2, 0.1])}}
    figure = plot_rank_curve(curve, suggested=2)
    assert len(figure.axes[0].lines) == 3


def test_planted_masks_sit_on_their_class_stripe(planted_fit):
    estimator, blocks, images, labels = planted_fit
    masks = an.pixel_masks(an.pixel_maps(estimator.components_, blocks), quantile=0.75)
    classes, _ = an.top_classes(estimator.examples_, labels, k=1)
    assert sorted(classes[:, 0]) == [0, 1, 2]
    for j, c in enumerate(classes[:, 0]):
        stripe = np.zeros((8, 8), bool)
        stripe[:, 3 * c:3 * c + 2] = True
        assert masks[j][stripe].mean() > 0.9  # the 16 pixels of the mask are its stripe


@pytest.mark.parametrize(("call", "message"), [
    (lambda images: plot_factor_top_images(images, np.array([[0, 99]])),
     r"`top` must index the 36 images, got indices up to 99\."),
    (lambda images: plot_pixel_masks(images, np.array([[0]]), np.zeros((1, 4, 4))),
     r"`masks` must have shape \(1, 8, 8\), one per factor of the images' size"),
    (lambda images: plot_class_mass(np.ones((2, 3)), class_names=["a"]),
     r"`class_names` must name the 3 classes, got 1 names\."),
])
def test_plots_refuse_mismatched_inputs(planted_fit, call, message):
    with pytest.raises(ValueError, match=message):
        call(planted_fit[2])


def test_report_is_self_contained_and_summarises(planted_fit, tmp_path):
    estimator, blocks, images, labels = planted_fit
    curve = {"ranks": np.array([2, 3, 4]), "error": np.array([0.4, 0.1, 0.095]),
             "block_errors": {}}
    summary = write_coupled_report(estimator, tmp_path / "out", blocks=blocks, images=images,
                                   labels=labels, class_names=["left", "middle", "right"],
                                   rank_curve=curve, settings={"seed": 0})
    page = (tmp_path / "out" / COUPLED_REPORT_FILE).read_text()
    assert page.count("data:image/png;base64,") == 6 and "http" not in page.split("<main>")[1]
    on_disk = json.loads((tmp_path / "out" / COUPLED_SUMMARY_FILE).read_text())
    assert on_disk["coupled"] == summary["coupled"]
    classes = summary["coupled"]["classes"]
    assert classes["mean_purity"] > 0.9 and classes["knn_agreement"] > 0.9
    assert summary["coupled"]["rank_curve"]["suggested"] == 3
    assert set(summary["coupled"]["top_neurons"]) == {"conv", "pool"}
    first = summary["coupled"]["top_neurons"]["conv"][0][0]
    assert set(first) == {"column", "channel", "y", "x", "weight"}


def test_the_section_is_a_pair_without_images_or_labels(planted_fit):
    estimator = planted_fit[0]
    html, summary = coupled_report_section(estimator)
    assert isinstance(html, str) and "data:image/png;base64," in html  # the similarity plots
    assert summary["classes"] is None and summary["top_neurons"] == {}
