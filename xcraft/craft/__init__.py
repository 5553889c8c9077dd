"""CRAFT (Fel et al., CVPR 2023): concepts by NMF, Sobol importance, implicit-gradient maps.

``estimator`` holds ``CraftTf``, which composes the stage modules: ``importance`` (Sobol, TCAV,
occlusion), ``attribution`` (per-concept models and maps), ``fidelity`` (deletion/insertion
curves), ``recursion`` (sub-concepts, ``ConceptTree``), ``manager`` (one estimator per class)
and ``io`` (save/load).
"""
