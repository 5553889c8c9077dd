"""Figures and the HTML report: the only part of xcraft that imports matplotlib.

``plots`` draws results it is handed and computes nothing; ``report`` writes the self-contained
HTML report. Import them explicitly (``import xcraft.viz.plots``) so that ``import xcraft`` stays
free of matplotlib.
"""
