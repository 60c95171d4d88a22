"""Merging: the method registry, per-tensor kernels, sparsification masks and (in apply.py) the in-place writer."""
