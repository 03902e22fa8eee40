"""The Llama-style Transformer baseline. ``FAMILY`` is declared in ``family.py``."""
