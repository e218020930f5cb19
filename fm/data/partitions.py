"""Per-partition work of the data stages, run here or mapped as Prefect tasks on a Dask cluster (issue 13).

    from fm.data.partitions import map_partitions
    results = map_partitions(work, items, cfg.partitions, name="ingest")   # [work(item) for item in items]

A data stage splits its input into partitions (ingest: the raw files; validate: row ranges of a table) and
gives each to a module-level function that writes what it made to a file of its own in the stage's temporary
output folder and returns a small summary; the stage then joins the partitions in order. Which machine ran a
partition never shows in the outputs, so they are the same whichever runner ran them.

`partitions.runner` (params.yaml) chooses:
    local   each partition in this process, in order (the default; no scheduler to start)
    dask    a Prefect task per partition, mapped on prefect-dask's DaskTaskRunner: a local Dask cluster of
            `partitions.dask_workers` worker processes by default, or the scheduler at `partitions.dask_address`
            (tcp://host:8786) for a real cluster, whose workers must see the work dir at the same path.
            Each task run shows in the Prefect UI under a flow run named fm-<stage>-partitions.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from fm.config import PartitionsConfig


def map_partitions(work: Callable[[Any], Any], items: Sequence, cfg: PartitionsConfig, name: str) -> list:
    """[work(item) for item in items], in order, run as `cfg.runner` says. `work` must be a module-level
    function and items and results picklable (a Dask worker is another process)."""
    items = list(items)
    if cfg.runner == "local" or not items:
        return [work(item) for item in items]
    return _on_dask(work, items, cfg, name)


def _on_dask(work, items: list, cfg: PartitionsConfig, name: str) -> list:
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    @task(name=f"{name}-partition", retries=0)
    def partition(item):
        return work(item)

    def run_on(address: str) -> list:
        @flow(name=f"fm-{name}-partitions", task_runner=DaskTaskRunner(address=address), validate_parameters=False)
        def mapped(todo: list) -> list:
            return [future.result() for future in partition.map(todo)]

        return mapped(items)

    if cfg.dask_address:  # a real cluster: its workers reach the Prefect API their own settings name
        return run_on(cfg.dask_address)

    @flow(name=f"fm-{name}-local-cluster", validate_parameters=False)
    def on_local_cluster() -> list:
        from distributed import LocalCluster
        from prefect.client.orchestration import get_client

        # The workers report their task runs to this run's Prefect API (without it, each would start a
        # temporary server of its own); one thread per worker process: the partitions' work runs in parallel.
        with get_client(sync_client=True) as client:
            env = {"PREFECT_API_URL": str(client.api_url).rstrip("/")}
        with LocalCluster(n_workers=cfg.dask_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          env=env) as cluster:
            return run_on(cluster.scheduler_address)

    return on_local_cluster()
