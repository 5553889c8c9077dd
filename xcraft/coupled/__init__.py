"""Coupled NMF of pixels, neurons and examples in one latent space (Saini & Papalexakis).

``CoupledNMF`` factorizes blocks X_b (pixels of each input channel, activations of several
layers, all over the same examples) as X_b ≈ F W_b with one shared example factor F >= 0; the
solver is :mod:`xcraft.ops.coupled`. Still to come (see its issue): blocks built from a model,
the paper's analyses, save/load, the command and the tutorial.
"""

from xcraft.coupled.estimator import CoupledNMF

__all__ = ["CoupledNMF"]
