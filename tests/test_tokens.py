"""Token layers (n, tokens, channels) of transformers in CRAFT: exact maths and refusals.

A token model is written here twice from the same weights: as tokens (a CLS token, then the
patch tokens of a Conv2D patch embedding, row-major) and as the spatial (n, s, s, c) map of the
same patches. Whatever CRAFT computes on the patch tokens must be what it computes on the map.
"""

import keras
import numpy as np
import pytest
from scipy.optimize import nnls

import xcraft
from xcraft.craft.attribution import concept_attribution_maps
from xcraft.plumbing.tokens import TokenLayout, token_layout

SIZE, PATCH, CHANNELS = 16, 4, 6
SIDE = SIZE // PATCH  # 4 x 4 = 16 patch tokens


@keras.saving.register_keras_serializable(package="xcraft_tests")
class LeadingTokens(keras.layers.Layer):
    """Prepend ``n_leading`` learned tokens (CLS, registers) to a (n, t, c) sequence."""

    def __init__(self, n_leading=1, **kwargs):
        super().__init__(**kwargs)
        self.n_leading = n_leading

    def build(self, input_shape):
        self.tokens = self.add_weight(
            shape=(1, self.n_leading, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=1.0), name="tokens")

    def call(self, x):
        batch = keras.ops.shape(x)[0]
        lead = keras.ops.broadcast_to(self.tokens, (batch, self.n_leading, x.shape[-1]))
        return keras.ops.concatenate([lead, x], axis=1)

    def get_config(self):
        return {**super().get_config(), "n_leading": self.n_leading}


def _models(n_leading=1, seed=0):
    """(g_tokens, h_tokens, g_spatial, h_spatial) sharing the patch embedding and the head.

    g_tokens gives (n, n_leading + 16, 6) signed tokens; h_tokens drops the leading tokens and
    runs the spatial head, so both classifiers are the same function of the images.
    """
    keras.utils.set_random_seed(seed)
    embed = keras.layers.Conv2D(CHANNELS, PATCH, strides=PATCH, name="patches")
    images = keras.Input((SIZE, SIZE, 3))
    grid = embed(images)  # (n, 4, 4, c), signed: no activation
    tokens = LeadingTokens(n_leading, name="cls")(keras.layers.Reshape((SIDE**2, CHANNELS))(grid))
    g_tokens = keras.Model(images, tokens, name="g_tokens")
    g_spatial = keras.Model(images, grid, name="g_spatial")

    dense = keras.layers.Dense(3, name="logits")
    spatial_in = keras.Input((SIDE, SIDE, CHANNELS))
    h_spatial = keras.Model(
        spatial_in, dense(keras.layers.GlobalAveragePooling2D()(keras.layers.Activation(
            "gelu")(spatial_in))), name="h_spatial")
    token_in = keras.Input((n_leading + SIDE**2, CHANNELS))
    patches = keras.layers.Cropping1D((n_leading, 0))(token_in)
    h_tokens = keras.Model(token_in, h_spatial(keras.layers.Reshape((SIDE, SIDE, CHANNELS))(
        patches)), name="h_tokens")
    return g_tokens, h_tokens, g_spatial, h_spatial


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(size=(12, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def models():
    return _models()


def _craft(g, h, **kwargs):
    kwargs = {"number_of_concepts": 4, "batch_size": 32, "patch_size": 8, "solver": "semi-nmf",
              "patches_per_image": 4, "random_state": 0, "verbose": False, **kwargs}
    return xcraft.CraftTf(g, h, **kwargs)


@pytest.fixture(scope="module")
def fitted(models, images):
    g_tokens, h_tokens, g_spatial, h_spatial = models
    tokens = _craft(g_tokens, h_tokens)
    tokens.fit(images, class_id=1)
    spatial = _craft(g_spatial, h_spatial)
    spatial.fit(images, class_id=1)
    return tokens, spatial


# ------------------------------------------------------------------------------------ layout
def test_grid_reshape_puts_patch_token_t_at_row_t_div_s_column_t_mod_s():
    layout = token_layout((None, 17, 1))  # auto: one CLS token, a 4 x 4 grid
    assert layout == TokenLayout(17, 1, (4, 4), keep_leading=False)
    tokens = np.arange(17, dtype=np.float32)[None, :, None]  # token i holds the value i
    grid = layout.to_grid(tokens).numpy()[0, :, :, 0]
    rows, cols = np.divmod(np.arange(16), 4)
    np.testing.assert_array_equal(grid[rows, cols], np.arange(16) + 1)  # patch t = token 1 + t


def test_non_square_grid_is_row_major_with_its_own_width():
    layout = token_layout((None, 8, 1), cls_token=2, token_grid=(2, 3))
    grid = layout.to_grid(np.arange(8, dtype=np.float32)[None, :, None]).numpy()[0, :, :, 0]
    np.testing.assert_array_equal(grid, [[2, 3, 4], [5, 6, 7]])


@pytest.mark.parametrize(
    ("n_tokens", "options", "expected"),
    [
        (16, {}, (0, (4, 4), False)),                     # no CLS: all tokens are patches
        (17, {}, (1, (4, 4), False)),                     # one CLS, excluded
        (17, {"cls_token": "keep"}, (1, (4, 4), True)),
        (19, {"cls_token": 3}, (3, (4, 4), False)),       # CLS + 2 registers
        (18, {"token_grid": (2, 8)}, (2, (2, 8), False)),  # auto: what the grid leaves over
    ],
)
def test_layout_resolution(n_tokens, options, expected):
    layout = token_layout((None, n_tokens, 5), **options)
    assert (layout.n_leading, layout.grid, layout.keep_leading) == expected


@pytest.mark.parametrize("cls_token", ["exclude", "keep", 2])
def test_pooled_crop_activations_are_the_mean_over_the_right_tokens(images, cls_token):
    n_leading = 2 if cls_token == 2 else 1
    g, h, _, _ = _models(n_leading)
    craft = _craft(g, h, cls_token=cls_token)
    craft.fit(images, class_id=0)
    raw = g(np.asarray(craft.factorization.crops)).numpy()  # (n_crops, tokens, c)
    first = 0 if cls_token == "keep" else n_leading
    expected = raw[:, first:].mean(axis=1)
    np.testing.assert_allclose(craft.crop_activations_, expected, rtol=1e-5, atol=1e-6)
    # And the leading tokens matter: the other choice gives another matrix.
    other = raw[:, n_leading if cls_token == "keep" else 0:].mean(axis=1)
    assert np.abs(other - expected).max() > 1e-3
    assert craft.token_layout_.n_leading == n_leading


def test_per_token_coefficients_equal_scipy_nnls_against_a_signed_bank(fitted, images):
    tokens, _ = fitted
    w = tokens.concept_bank_w_.astype(np.float64)  # (r, c)
    assert w.min() < 0  # semi-NMF: a signed bank
    activations = tokens.input_to_latent_model(images[:3]).numpy()  # (3, 17, c)
    u = tokens.transform(images[:3])
    assert u.shape == (3, 17, 4)
    expected = np.array([[nnls(w.T, a.astype(np.float64))[0] for a in image]
                         for image in activations])  # leading token included
    np.testing.assert_allclose(u, expected, atol=1e-4)
    np.testing.assert_allclose(tokens.transform(None, activations=activations), u, atol=1e-6)


# ------------------------------------------------------------------- token vs spatial layer
def test_token_layer_fits_the_same_concepts_as_its_spatial_map(fitted, images):
    tokens, spatial = fitted
    np.testing.assert_allclose(tokens.crop_activations_, spatial.crop_activations_, atol=1e-5)
    np.testing.assert_allclose(tokens.concept_bank_w_, spatial.concept_bank_w_, atol=1e-3)
    u_tokens = tokens.transform(images[:4])  # (4, 17, r)
    u_grid = spatial.transform(images[:4])  # (4, 4, 4, r)
    np.testing.assert_allclose(u_tokens[:, 1:].reshape(u_grid.shape), u_grid, atol=1e-3)


@pytest.mark.filterwarnings("ignore:.*total Sobol index estimate:UserWarning")
def test_token_importances_equal_the_spatial_ones(fitted):
    tokens, spatial = fitted
    # h_tokens ignores the CLS token: both heads see the same patch reconstructions.
    for method in ("sobol", "occlusion", "tcav"):
        a = tokens.estimate_importance(nb_design=8, method=method)
        b = spatial.estimate_importance(nb_design=8, method=method)
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3, err_msg=method)


@pytest.mark.filterwarnings("ignore:.*total Sobol index estimate:UserWarning")
def test_a_folded_token_head_gives_the_plain_head_scores(models, images):
    g, _, _, _ = models
    keras.utils.set_random_seed(3)
    tokens_in = keras.Input((1 + SIDE**2, CHANNELS))
    # Average over all tokens (CLS included) then Dense: affine, so the head folds.
    h = keras.Model(tokens_in, keras.layers.Dense(3)(keras.layers.Activation("gelu")(
        keras.layers.Dense(8)(keras.layers.GlobalAveragePooling1D()(tokens_in)))))
    craft = _craft(g, h)
    craft.fit(images, class_id=2)
    folded = craft.estimate_importance(nb_design=8, fold_head=True, reduce=None)
    plain = craft.estimate_importance(nb_design=8, fold_head=False, reduce=None)
    assert folded.shape == (len(images), 4) and folded.max() > 0.05
    np.testing.assert_allclose(folded, plain, atol=1e-3)


@pytest.mark.parametrize("method", [
    "gradcam", "saliency", "coefficients",
    # Their token handling is saliency's (the pooled concepts): checked in the slow suite.
    pytest.param("gradient_input", marks=pytest.mark.slow),
    pytest.param("rise", marks=pytest.mark.slow),
])
def test_maps_of_a_token_layer_equal_the_maps_of_its_spatial_map(models, images, method):
    g_tokens, _, g_spatial, _ = models
    bank = np.random.default_rng(1).normal(size=(3, CHANNELS)).astype(np.float32)  # signed
    options = {"n_masks": 64, "random_state": 0} if method == "rise" else {}
    from_tokens = concept_attribution_maps(images[:3], g_tokens, bank, method=method,
                                           cls_token="exclude", **options)
    from_grid = concept_attribution_maps(images[:3], g_spatial, bank, method=method, **options)
    assert from_tokens.shape == (3, 3, SIZE, SIZE)
    assert np.abs(from_grid).max() > 0
    np.testing.assert_allclose(from_tokens, from_grid, rtol=1e-4,
                               atol=1e-5 * np.abs(from_grid).max())


def test_estimator_maps_match_the_spatial_estimator(fitted, images):
    tokens, spatial = fitted
    # The estimator hands its token options on (the maths is the test above's).
    a = tokens.concept_attribution_maps(images[:2], method="coefficients")
    b = spatial.concept_attribution_maps(images[:2], method="coefficients")
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_keep_pools_the_cls_token_into_the_concept_model(images):
    g, h, _, _ = _models()
    craft = _craft(g, h, cls_token="keep")
    craft.fit(images, class_id=0)
    u = craft.transform(images[:3])  # (3, 17, r)
    pooled = craft.concept_model()(images[:3]).numpy()
    np.testing.assert_allclose(pooled, u.mean(axis=1), atol=1e-5)  # CLS token included
    spatial = craft.concept_model(spatial=True)(images[:3]).numpy()
    np.testing.assert_allclose(spatial, u, atol=1e-5)


def test_save_load_keeps_the_token_options(tmp_path, images):
    g, h, _, _ = _models(n_leading=2)
    craft = _craft(g, h, cls_token="auto", token_grid=(2, 8))
    craft.fit(images, class_id=0)
    craft.save(tmp_path / "tokens")
    loaded = xcraft.CraftTf.load(tmp_path / "tokens", g, h)
    assert loaded.token_layout_ == craft.token_layout_ == TokenLayout(18, 2, (2, 8), False)
    np.testing.assert_allclose(loaded.transform(images[:2]), craft.transform(images[:2]))
    np.testing.assert_allclose(loaded.concept_attribution_maps(images[:1], method="coefficients"),
                               craft.concept_attribution_maps(images[:1], method="coefficients"))


# ------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"cls_token": "first"}, ValueError,
         r"`cls_token` must be one of 'auto', 'exclude', 'keep' or an int count of leading "
         r"tokens, got 'first'\."),
        ({"cls_token": 1.0}, TypeError, r"`cls_token` must be one of .* got float 1\.0\."),
        ({"cls_token": True}, TypeError, r"`cls_token` must be one of .* got bool True\."),
        ({"cls_token": -1}, ValueError, r"`cls_token` must be an int count >= 0, got -1\."),
        ({"token_grid": (4,)}, TypeError,
         r"`token_grid` must be None or a pair \(grid_height, grid_width\) of ints, got \(4,\)"),
        ({"token_grid": (0, 4)}, ValueError, r"`token_grid` must hold sides >= 1, got \(0, 4\)"),
    ],
)
def test_bad_token_options_are_refused_before_any_work(models, images, options, error, message):
    g, h, _, _ = models
    with pytest.raises(error, match=message):
        _craft(g, h, **options).fit(images)


@pytest.mark.parametrize(
    ("n_tokens", "options", "message"),
    [
        (18, {}, r"The split layer's 18 tokens are neither a square grid of patch tokens nor one "
                 r"CLS token and a square grid\. Pass the number of leading \(CLS, register, "
                 r"distillation\) tokens as `cls_token=` \(an int\), or the patch grid as "
                 r"`token_grid=\(height, width\)`\."),
        (17, {"cls_token": 0}, r"The split layer's 17 tokens minus 0 leading token\(s\) leave 17 "
                               r"patch tokens, which is not a square grid\. Pass the grid"),
        (17, {"token_grid": (5, 5)}, r"`token_grid=\(5, 5\)` holds 25 patch tokens, more than "
                                     r"the split layer's 17 tokens\."),
        (17, {"cls_token": 1, "token_grid": (3, 5)},
         r"`token_grid=\(3, 5\)` holds 15 patch tokens, but the split layer's 17 tokens minus 1 "
         r"leading token\(s\) leave 16\."),
        (4, {"cls_token": 4}, r"The split layer has 4 tokens, which leaves no patch token"),
    ],
)
def test_layouts_that_do_not_fit_the_tokens_are_refused(n_tokens, options, message):
    with pytest.raises(ValueError, match=message):
        token_layout((None, n_tokens, 3), **options)


def test_token_options_on_a_spatial_layer_are_refused(models, images):
    _, _, g, h = models
    with pytest.raises(ValueError, match=r"`cls_token` and `token_grid` apply to token layers, "
                                         r"whose activations have shape \(batch, tokens, "
                                         r"channels\), got activations of shape \(None, 4, 4, 6\)"):
        _craft(g, h, cls_token="exclude").fit(images)
    with pytest.raises(ValueError, match=r"`cls_token` and `token_grid` apply to token "
                                         r"activations"):
        concept_attribution_maps(images[:1], g, np.ones((2, CHANNELS)), token_grid=(4, 4))


def test_activations_with_another_token_count_are_refused(fitted, images):
    tokens, _ = fitted
    with pytest.raises(ValueError, match=r"`activations` must have shape \(n, 17, 6\) \(the "
                                         r"split layer's tokens\), got shape \(2, 16, 6\)\."):
        tokens.transform(None, activations=np.zeros((2, 16, 6), np.float32))


def test_a_non_square_token_layer_without_a_grid_is_refused_at_fit(images):
    g, h, _, _ = _models(n_leading=2)  # 18 tokens: 2 leading ones are not guessed
    with pytest.raises(ValueError, match=r"The split layer's 18 tokens are neither a square"):
        _craft(g, h).fit(images)
    _craft(g, h, cls_token=2).fit(images)  # given the count, the same layer fits
