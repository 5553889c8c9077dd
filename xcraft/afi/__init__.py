"""AfI, "Attacking for Interpretability" (Wu et al., CVPR 2020): a class-wide feature occluder.

Empty until its issue lands: the occluder, neuron and channel importance, meta-detectors,
MMD concept tests, class impressions and the paper's evaluations will live here.
"""
