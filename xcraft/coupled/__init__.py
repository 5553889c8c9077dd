"""Coupled NMF of pixels, neurons and examples in one latent space (Saini & Papalexakis).

``CoupledNMF`` factorizes blocks X_b (pixels of each input channel, activations of several
layers, all over the same examples) as X_b ≈ F W_b with one shared example factor F >= 0; the
solver is :mod:`xcraft.ops.coupled`. :func:`build_blocks` makes the blocks from a Keras model
and images (with index maps tracing every column back to its channel and position),
:mod:`xcraft.coupled.analysis` holds the paper's analyses (classes, images, pixels and neurons
of every factor, layer specialisation, neighbourhoods in F, rank guidance) and
:mod:`xcraft.coupled.io` saves and loads a fit.
"""

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back
from xcraft.coupled.blocks import Blocks, build_blocks
from xcraft.coupled.estimator import CoupledNMF

__all__ = ["CoupledNMF", "Blocks", "build_blocks"]
