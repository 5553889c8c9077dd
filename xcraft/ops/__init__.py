"""Shared maths as TensorFlow ops: tensors in, tensors out, no models.

``nmf`` (HALS and multiplicative NMF), ``nnls`` (batched NNLS with its implicit-function
gradient) and ``sobol`` (quasi-Monte-Carlo designs and total Sobol indices). These modules
import nothing of xcraft but ``xcraft._validation``, so each is usable, and tested, on its own
against scipy and scikit-learn.
"""
