"""xcraft: CRAFT concept explanations for Keras/TensorFlow image classifiers."""

__version__ = "0.1.0"
