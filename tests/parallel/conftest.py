"""Fixtures shared by the parallel test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def spawned_layer_checks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    """The context-parallel model checks (``test_context_parallel``) and the sharded-PKM layer
    checks (``test_sharded_pkm``) in one spawn of gloo ranks per world size (2 and 4) instead of
    one per module and size: per world size, per rank, ``{check name: traceback or ""}``. The
    CP checks run first, as they did alone; every check ends its collectives before comparing,
    so one that fails leaves the next to run normally."""
    from tests.parallel import test_context_parallel, test_sharded_pkm
    from tests.parallel.cp_model_check import spawn_checks

    results = {}
    for world in (2, 4):
        checks = test_context_parallel._checks(world)
        pkm_checks = test_sharded_pkm._checks(world)
        assert not checks.keys() & pkm_checks.keys(), "check names must differ"
        checks.update(pkm_checks)
        results[world] = spawn_checks(world, checks, tmp_path_factory.mktemp(f"checks{world}"))
    return results
