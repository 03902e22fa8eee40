"""Names of the switchable computation paths of a block (used by configs and the curriculum)."""

from __future__ import annotations

PATH_NAMES = ("ssm", "attention", "ffn", "moe", "workspace", "pkm", "depth")
