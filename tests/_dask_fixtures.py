"""The fixtures of the tests that run on a Dask cluster: asyncio only (Dask's client needs it),
and one cluster per test module, started with the ``dask`` command (``_dask_cluster.py``).

A test module imports the three functions below; each registers the fixture its decorator names:
``anyio_backend``, ``_cluster`` and ``cluster``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _dask_cluster
import pytest
from _dask_cluster import DaskCluster, dask_cluster


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ],
    scope="module",
    name="anyio_backend",
)
def dask_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    if request.param[1].get("use_uvloop"):
        pytest.importorskip("uvloop")
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module", name="_cluster")
def dask_cluster_of_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaskCluster, Any]]:
    from distributed import Client

    tests = str(Path(__file__).parent)  # the workers import the test modules by name
    with (
        dask_cluster(tmp_path_factory.mktemp("dask"), workers=2, pythonpath=[tests]) as cluster,
        Client(cluster.scheduler_address, set_as_default=False) as client,
    ):
        yield cluster, client


@pytest.fixture(name="cluster")
def module_cluster(_cluster: tuple[DaskCluster, Any]) -> DaskCluster:
    """The module's cluster, once both workers are connected (a killed one is restarted by its nanny)."""
    cluster, client = _cluster
    try:
        client.wait_for_workers(2, timeout=_dask_cluster.START_TIMEOUT)
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}; the cluster's logs:\n{cluster.logs()}") from exc
    return cluster
