"""Keras plumbing shared by every method: cutting a model, crops, streamed activations.

``split`` cuts a Keras model into ``(g, h)``; ``crops`` samples crop boxes; ``activations``
runs batched, memory-bounded forward passes; ``head_fold`` folds a head's leading affine layers
into a matrix. No maths of a method lives here.
"""
