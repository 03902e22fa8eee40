"""The Dreamer family (Knupp et al. 2026): one shared layer looped over depth, mixing sequence,
depth and expert attention (see ``family.py``)."""
