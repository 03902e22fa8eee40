"""The pure Mamba-2 baseline. ``FAMILY`` is declared in ``family.py``."""
