"""Hydra: SSM, sparse global attention and FFN/MoE paths in parallel, then memories. ``FAMILY`` is declared in ``family.py``."""
