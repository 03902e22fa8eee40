"""Model + optimizer state for DCP, loadable into another world size and exact for parameters
that have no optimizer state yet.

Parameters of a path the curriculum has not switched on yet get no gradient, so AdamW never
creates their state; the checkpoint has none for them. A fresh optimizer's load template (from
``get_state_dict``) would have state for every parameter, and DCP would refuse the checkpoint
("Missing key"). So at load: the template covers every parameter (``load_template``), the
planner drops template entries the checkpoint does not have, and the optimizer ends with exactly
the saved set of states, as in the run that was never interrupted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

MODEL, OPTIM = "model", "optim"
STATE, GROUPS = "state.", "param_groups."  # flattened optimizer keys: state.<fqn>.<name>

# Parameters that moved, as (pattern of the current name, the name it had): a checkpoint written
# before the move still loads. The MoE experts became their own module for expert parallelism.
RENAMED_PARAMS = ((re.compile(r"\.moe\.experts\.(w[123])(?=$|\.)"), r".moe.\1"),)


def legacy_key(key: str) -> str:
    """The name ``key`` (a parameter FQN or a flattened optimizer key) had before any rename."""
    for pattern, old in RENAMED_PARAMS:
        key = pattern.sub(old, key)
    return key


class ModelOptimizerState(Stateful):
    """Model and optimizer state for DCP, keyed by parameter names (FQNs).

    ``get_state_dict``/``set_state_dict`` give sharded DTensors for FSDP2 models and plain tensors
    otherwise, keyed by FQN without wrapper prefixes (``_orig_mod.``, ``module.``), so DCP can
    load a checkpoint into another world size or between sharded and unsharded models. The
    optimizer state is flattened (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``), which
    keeps it independent of parameter order and sharding. Load it through ``CheckpointManager``
    (which uses ``load_template`` and ``PartialOptimizerStatePlanner``).

    Args:
        model: the unwrapped model (FSDP2-sharded in place, or plain).
        optimizer: its optimizer, or None to checkpoint the model alone.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        """What is saved: the model and the optimizer state as it is (never padded)."""
        if self.optimizer is None:
            return {MODEL: get_model_state_dict(self.model, options=self.options)}
        untouched = not self.optimizer.state
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        if untouched:
            # get_state_dict gave the empty optimizer state by a zero-lr step (step count 1 on
            # every parameter); undo it so that saving before the first step changes nothing
            self.optimizer.state.clear()
            optim_sd = {k: v for k, v in optim_sd.items() if not k.startswith(STATE)}
        return {MODEL: model_sd, OPTIM: optim_sd}

    def load_template(self) -> dict[str, Any]:
        """The load target: model and optimizer state with an entry for every parameter.

        ``get_state_dict`` gives an empty optimizer state for every trainable parameter (by a
        zero-lr step, which is fine here: the load replaces it); frozen or never-stepped
        parameters of a used optimizer get zeros, laid out like an existing parameter's state,
        so a checkpoint that has their state can fill it.
        """
        if self.optimizer is None:
            return self.state_dict()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        _add_missing_state(model_sd, optim_sd)
        return {MODEL: model_sd, OPTIM: optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict[MODEL], options=self.options)
        if self.optimizer is None:
            return
        nested = _unflatten(self.model, self.optimizer, state_dict[OPTIM])
        # torch drops the saved state of frozen parameters; a later stage may unfreeze them
        with _all_trainable(self.optimizer):
            set_optimizer_state_dict(
                self.model, self.optimizer, nested, options=StateDictOptions(strict=False)
            )


def _split_key(key: str, prefix: str) -> tuple[str, str]:
    """``state.blocks.0.w.exp_avg`` -> (``blocks.0.w``, ``exp_avg``)."""
    fqn, name = key[len(prefix) :].rsplit(".", 1)
    return fqn, name


def _add_missing_state(model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
    fqns = {_split_key(k, GROUPS)[0] for k in optim_sd if k.startswith(GROUPS)}
    states: dict[str, dict[str, Any]] = {}
    for key, value in optim_sd.items():
        if key.startswith(STATE):
            fqn, name = _split_key(key, STATE)
            states.setdefault(fqn, {})[name] = value
    if not states:
        return  # nothing to copy the layout from; the planner reports any state left unread
    # the example with the most dimensions tells param-shaped entries from scalars like `step`
    example = max(states, key=lambda fqn: model_sd[fqn].dim())
    example_shape = model_sd[example].shape
    for fqn in sorted(fqns - states.keys()):
        param = model_sd[fqn]
        for name, value in states[example].items():
            if not isinstance(value, torch.Tensor):
                optim_sd[f"{STATE}{fqn}.{name}"] = value
            elif value.dim() > 0 and value.shape == example_shape:
                optim_sd[f"{STATE}{fqn}.{name}"] = torch.zeros_like(param, dtype=value.dtype)
            else:
                optim_sd[f"{STATE}{fqn}.{name}"] = torch.zeros_like(value)


def _unflatten(
    model: nn.Module, optimizer: torch.optim.Optimizer, flat: dict[str, Any]
) -> dict[str, Any]:
    """Flattened optimizer state -> torch's FQN-keyed nested form, with only the loaded states."""
    live = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=False)
    )
    groups = []
    for group in live["param_groups"]:
        fqns = list(group["params"])
        loaded = {k: v for k, v in group.items() if k != "params"}
        if fqns:
            loaded = {k: flat[f"{GROUPS}{fqns[0]}.{k}"] for k in loaded}
        groups.append({**loaded, "params": fqns})
    known = {fqn for group in groups for fqn in group["params"]}
    state: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key.startswith(STATE):
            fqn, name = _split_key(key, STATE)
            if fqn not in known:
                raise KeyError(f"optimizer state for {fqn!r}, which the optimizer does not hold")
            state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": groups}


@contextmanager
def _all_trainable(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    frozen = [p for g in optimizer.param_groups for p in g["params"] if not p.requires_grad]
    for param in frozen:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(False)


class PartialOptimizerStatePlanner(DefaultLoadPlanner):
    """Loads only the optimizer states the checkpoint has (see the module docstring).

    Args:
        optimizer_keys: the top-level ``app_state`` keys holding a ``ModelOptimizerState``.
    """

    def __init__(self, optimizer_keys: set[str], renamed: dict[str, dict[str, str]]) -> None:
        super().__init__()
        self.optimizer_keys = optimizer_keys
        self.renamed = renamed  # shared with the loading views, which undo the renames

    def set_up_planner(
        self,
        state_dict: dict[str, Any],
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        if metadata is not None:
            saved = set(metadata.state_dict_metadata)
            for app_key in self.optimizer_keys:
                self.renamed[app_key].update(
                    _read_legacy_names(app_key, state_dict[app_key], saved)
                )
                _match_saved_states(app_key, state_dict[app_key].get(OPTIM), saved)
        super().set_up_planner(state_dict, metadata, is_coordinator)


def _read_legacy_names(app_key: str, app_sd: dict[str, Any], saved: set[str]) -> dict[str, str]:
    """Rename, in place, each entry the checkpoint holds only under its old name (the tensor is
    loaded into as before); returns ``{sub.old: new}`` for ``_LoadingView`` to undo it."""
    undo = {}
    for sub in (MODEL, OPTIM):
        part = app_sd.get(sub)
        if part is None:
            continue
        for key in list(part):
            old = legacy_key(key)
            if old != key and f"{app_key}.{sub}.{key}" not in saved:
                if f"{app_key}.{sub}.{old}" in saved:
                    part[old] = part.pop(key)
                    undo[f"{sub}.{old}"] = key
    return undo


def _match_saved_states(app_key: str, optim_sd: dict[str, Any] | None, saved: set[str]) -> None:
    if optim_sd is None:
        return
    prefix = f"{app_key}.{OPTIM}."
    for key in [k for k in optim_sd if k.startswith(STATE)]:
        if prefix + key not in saved:
            del optim_sd[key]
    unread = sorted(
        k for k in saved if k.startswith(prefix + STATE) and k[len(prefix) :] not in optim_sd
    )
    if unread:
        raise KeyError(
            f"the checkpoint has optimizer state that this optimizer cannot take: {unread[:3]}"
            f"{' ...' if len(unread) > 3 else ''}"
        )


class _LoadingView(Stateful):
    """Presents ``owner.load_template()`` to DCP as the state to load into (and gives entries
    read under their old names their current names back)."""

    def __init__(self, owner: ModelOptimizerState, renamed: dict[str, str]) -> None:
        self.owner = owner
        self.renamed = renamed  # filled by the planner: {"model.<old>": new, "optim.<old>": new}

    def state_dict(self) -> dict[str, Any]:
        return self.owner.load_template()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for sub_old, new in self.renamed.items():
            sub, old = sub_old.split(".", 1)
            state_dict[sub][new] = state_dict[sub].pop(old)
        self.owner.load_state_dict(state_dict)


def prepare_load(
    app_state: dict[str, Any],
) -> tuple[dict[str, Any], PartialOptimizerStatePlanner]:
    """(state to hand to ``dcp.load``, planner). Non-``ModelOptimizerState`` entries pass through
    unchanged; copy them back into ``app_state`` after the load (DCP may replace them)."""
    keys = {k for k, v in app_state.items() if isinstance(v, ModelOptimizerState)}
    renamed: dict[str, dict[str, str]] = {k: {} for k in keys}
    planner = PartialOptimizerStatePlanner(keys, renamed)
    view = {k: _LoadingView(v, renamed[k]) if k in keys else v for k, v in app_state.items()}
    return view, planner
