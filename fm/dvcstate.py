"""Keep DVC's view of the pipeline in step when a stage ran outside `dvc repro`.

When Prefect (or `fm <stage>`) runs a stage with the same inputs dvc.yaml declares, the
outputs are recorded with the equivalent of `dvc commit -f STAGE`, so `dvc status` and
`dvc repro` agree that the stage is up to date and both doors share one notion of "stale".
Runs on other paths or with --set overrides are not what dvc.yaml describes, and are left
unrecorded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

DVC_DEFAULTS = {"raw": "data/01_raw", "workdir": "data", "params_file": "params.yaml"}
log = logging.getLogger(__name__)


def matches_dvc_yaml(raw: str, workdir: str, params_file: str, overrides: list[str]) -> bool:
    """True when a run used exactly the paths and params that dvc.yaml's stages use."""
    given = {"raw": raw, "workdir": workdir, "params_file": params_file}
    same = all(os.path.normpath(given[k]) == os.path.normpath(v) for k, v in DVC_DEFAULTS.items())
    return same and not overrides and Path("dvc.yaml").is_file() and Path(".dvc").is_dir()


def record_stage(name: str, raw: str, workdir: str, params_file: str, overrides: list[str]) -> bool:
    """Record `name`'s outputs in dvc.lock (dvc commit -f); False when the run is not dvc.yaml's."""
    if os.environ.get("FM_NO_DVC_COMMIT") or not matches_dvc_yaml(raw, workdir, params_file, overrides):
        return False
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    with Repo(".") as repo:
        repo.commit(name, force=True)
    log.info("recorded stage %s in dvc.lock", name)
    return True


def stage_is_current(name: str) -> bool:
    """Whether DVC sees `name` as up to date (deps, params and outs match dvc.lock)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        return not repo.status(targets=[name])
