"""Coupled NMF of pixels, neurons and examples in one latent space (Saini & Papalexakis).

Empty until its issue lands: the ``CoupledNMF`` estimator, blocks built from a model and the
analyses of factors, pixel masks and neurons will live here.
"""
