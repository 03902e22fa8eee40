"""Turning a nested run config into MLflow params, and names MLflow accepts.

MLflow limits a param value to 6000 characters and a param or metric name to 250 characters of
``[/\\w.\\- :]``; a name it rejects fails the whole batch it is in, so names are cleaned here,
before they reach the background logger.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

MAX_PARAM_VALUE_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY_CHARS = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_TRUNCATION_MARK = "...[truncated]"


def sanitize_key(key: str) -> str:
    """Return a param/metric name MLflow accepts, stable for a given input.

    Characters outside MLflow's set become ``_``; slashes that would make the name resolve to
    another path (leading, doubled, trailing) are folded; names over 250 characters keep a prefix
    and a hash of the full name, so two long names stay distinct.

    Args:
        key: the raw name, e.g. ``"model.ssm.d_state"``.

    Returns:
        The cleaned name (the input itself when it was already valid).
    """
    clean = _BAD_KEY_CHARS.sub("_", key)
    clean = re.sub(r"/+", "/", clean).strip("/")
    clean = "/".join("_" if part in (".", "..") else part for part in clean.split("/"))
    if not clean:
        clean = "_"
    if len(clean) > MAX_KEY_CHARS:
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
        clean = f"{clean[: MAX_KEY_CHARS - 9]}~{digest}"
    return clean


def truncate_value(value: str, limit: int = MAX_PARAM_VALUE_CHARS) -> str:
    """Cut a param value to ``limit`` characters, marking the cut inside the limit.

    Args:
        value: the formatted value.
        limit: the most characters kept, the mark included.

    Returns:
        ``value`` when it fits, else its head followed by ``...[truncated]``.
    """
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def _format_scalar(value: Any) -> str:
    # JSON spelling (true/null/1e-05) matches what the YAML config says.
    if isinstance(value, str):
        return value
    if isinstance(value, enum.Enum):
        return _format_scalar(value.value)
    if isinstance(value, PurePath):
        return str(value)
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def _is_nested(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    )


def _items(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]


def _flatten_into(out: dict[str, str], value: Any, prefix: str) -> None:
    if _is_nested(value):
        items = _items(value)
        if not items and prefix:
            out[prefix] = "{}"
        for key, sub in items:
            _flatten_into(out, sub, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list | tuple) and any(_is_nested(v) for v in value):
        # Lists of sections (curriculum stages) get one param per field: searchable in the UI.
        for i, sub in enumerate(value):
            _flatten_into(out, sub, f"{prefix}.{i}" if prefix else str(i))
    elif isinstance(value, list | tuple):
        out[prefix] = json.dumps([_plain(v) for v in value], default=str)
    else:
        out[prefix] = _format_scalar(value)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    return value


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params with dotted keys.

    Nested mappings and dataclasses become dotted keys (``model.ssm.d_state``); lists that hold
    sections are indexed (``curriculum.stages.0.steps``); other lists become one JSON value.
    Keys are passed through :func:`sanitize_key` and values through :func:`truncate_value`.

    Args:
        d: the config, as nested dicts (or dataclasses).
        prefix: a dotted prefix put in front of every key.

    Returns:
        ``{dotted_key: value_string}``, in the config's order.
    """
    raw: dict[str, str] = {}
    _flatten_into(raw, d, prefix)
    return {sanitize_key(k): truncate_value(v) for k, v in raw.items()}
