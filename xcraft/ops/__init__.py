"""Shared maths as TensorFlow ops: tensors in, tensors out, no models.

``nmf`` (HALS and multiplicative NMF), ``nnls`` (batched NNLS with its implicit-function
gradient) and ``sobol`` (quasi-Monte-Carlo designs and total Sobol indices). These modules
import nothing of xcraft but ``xcraft._validation`` (and ``xcraft._tensorflow``, which imports
TensorFlow quietly), so each is usable, and tested, on its own against scipy and scikit-learn.
"""

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back
