"""DVC's view of the pipeline: dvc.yaml generated from the stage table, and dvc.lock kept in step.

`dvc repro` runs the stages from dvc.yaml; `fm run` (Prefect) and `fm <stage>` run them too,
and record what they ran with the equivalent of `dvc commit -f STAGE`, so that whichever door
ran a stage, `dvc status` and `dvc repro` agree on what is up to date:

- a stage is current when DVC says so (its code deps, params sections and inputs match
  dvc.lock) and the run's effective settings for the sections it reads equal params.yaml's
  (a `--set` override of one of them makes it stale for this run, and only it);
- a stage that ran is recorded only when it ran with dvc.yaml's paths and params.yaml's
  settings for its sections and every upstream stage's: an overridden run (or one that read an
  overridden run's outputs) is never recorded as if params.yaml had made it.

Paths are resolved against the project root (the folder holding dvc.yaml and .dvc/), found from
the params file's folder upwards, so a run started from another directory sees the same state.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fm.config import Params, load_params
from fm.paths import Paths

DVC_RAW, DVC_WORKDIR, DVC_PARAMS = "data/01_raw", "data", "params.yaml"
log = logging.getLogger(__name__)
RESTORE_LOCK = ("Restore it (`git checkout -- dvc.lock`) or delete it: every stage then counts as stale and is "
                "recorded again when it runs")
# DVC serialises on a repo lock file; threads of one process (parallel DAG branches) take turns here.
_dvc_mutex = threading.RLock()


def find_root(start: str | os.PathLike) -> Path | None:
    """The nearest folder at or above `start` holding dvc.yaml and .dvc/ (None outside a DVC project)."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / ".dvc").is_dir():
            return folder
    return None


def new_run_id() -> str:
    """A run id that sorts by start time: UTC timestamp and 4 random hex digits, e.g. 20261201-213015-9f3a."""
    import secrets
    import time

    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


@dataclass(frozen=True)
class RunContext:
    """What a run was asked to do: its paths, params file and overrides (all as given)."""

    raw: str
    workdir: str
    params_file: str
    overrides: tuple[str, ...] = ()
    run_id: str = field(default_factory=lambda: new_run_id())  # one per `fm run` / `fm <stage>`: the registry's run

    @property
    def paths(self) -> Paths:
        return Paths(self.raw, self.workdir)

    def params(self) -> Params:
        return load_params(self.params_file, list(self.overrides))

    @property
    def root(self) -> Path | None:
        params_dir = Path(self.params_file).resolve().parent
        return find_root(params_dir)

    def dvc_paths(self) -> bool:
        """True when raw, workdir and params file are the ones dvc.yaml's stages use."""
        root = self.root
        if root is None:
            return False
        given = (Path(self.raw), Path(self.workdir), Path(self.params_file))
        expected = (root / DVC_RAW, root / DVC_WORKDIR, root / DVC_PARAMS)
        return all(g.resolve() == e for g, e in zip(given, expected))

    def overridden_sections(self, sections: tuple[str, ...]) -> list[str]:
        """The sections among `sections` whose effective settings differ from the params file's."""
        if not self.overrides:
            return []
        base, effective = load_params(self.params_file), self.params()
        return [s for s in sections if getattr(base, s) != getattr(effective, s)]

    def tracked(self, name: str) -> tuple[bool, str]:
        """Whether stage `name` of this run is what dvc.yaml describes; else why not (one line)."""
        from fm.stages import STAGES, ancestors

        if self.root is None:
            return False, ""  # not a DVC project: nothing to record, nothing to say
        if not self.dvc_paths():
            return False, "paths or params file differ from dvc.yaml's"
        changed = self.overridden_sections(STAGES[name].sections)
        if changed:
            return False, f"--set overrides change params section(s) {', '.join(changed)}"
        # Its inputs are the products of an overridden upstream stage: not what params.yaml makes either.
        upstream = [u for u in ancestors(name) if self.overridden_sections(STAGES[u].sections)]
        if upstream:
            return False, f"it reads the outputs of {', '.join(upstream)}, run with --set overrides"
        return True, ""


@contextmanager
def _dvc_at(root: Path):
    """Hold the DVC mutex, in the project root: DVC's run cache resolves `dvc.yaml` against the
    working directory, so a served run (or one started elsewhere) would be "outside the repo".
    Stage code never depends on the working directory (flows pass absolute paths), so changing it
    for the length of one DVC call under the mutex is safe."""
    from dvc.exceptions import DvcException

    with _dvc_mutex:
        before = os.getcwd()
        if Path(before).resolve() != root:
            os.chdir(root)
        try:
            with _repo(root) as repo:
                yield repo
        except DvcException as e:  # one line naming the file, not DVC's traceback
            if "dvc.lock" in str(e):
                raise ValueError(f"{root / 'dvc.lock'} cannot be read ({e}): it records which stages are up to date. "
                                 f"{RESTORE_LOCK}") from e
            raise ValueError(f"DVC failed in {root}: {e}") from e
        except (NotImplementedError, LookupError, TypeError, AttributeError) as e:
            # DVC trusts the fields of a lock entry it could parse: one cut inside (`hash: m`) fails deep inside it
            raise ValueError(f"DVC failed in {root} ({type(e).__name__}: {e}): if {root / 'dvc.lock'} is damaged, "
                             f"{RESTORE_LOCK[0].lower()}{RESTORE_LOCK[1:]}") from e
        finally:
            os.chdir(before)


def _repo(root: Path):
    """A DVC Repo at root, with DVC's logging made a library's: `import dvc` binds its own handlers to
    the sys.stdout/stderr of that moment (a closed stream later, under a test runner or a served run)
    and logs INFO per commit; here its warnings go through the caller's logging like any library's."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    for name in ("dvc", "dvc_objects", "dvc_data"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.WARNING)
        logger.propagate = True
    return Repo(str(root))


def _target(root: Path, name: str) -> str:
    return f"{root / 'dvc.yaml'}:{name}"


def stage_is_current(ctx: RunContext, name: str) -> bool:
    """Whether stage `name` can be skipped: what dvc.yaml describes, and DVC sees it up to date."""
    tracked, _ = ctx.tracked(name)
    if not tracked:
        return False
    with _dvc_at(ctx.root) as repo:
        return not repo.status(targets=[_target(ctx.root, name)])


def check_lock(ctx: RunContext, name: str) -> None:
    """For a stage that will be recorded: a ValueError naming dvc.lock now if DVC cannot read it, rather than
    once the stage has done its work (a damaged lock never lets a stage pass for up to date either)."""
    if ctx.tracked(name)[0]:
        from dvc.dvcfile import Lockfile

        with _dvc_at(ctx.root) as repo:
            Lockfile(repo, str(ctx.root / "dvc.lock")).load()


def record_stage(ctx: RunContext, name: str) -> tuple[bool, str]:
    """Record stage `name`'s deps, params and outs in dvc.lock (dvc commit -f); (done, why not)."""
    tracked, why = ctx.tracked(name)
    if not tracked:
        return False, why
    with _dvc_at(ctx.root) as repo:
        repo.commit(_target(ctx.root, name), force=True)
    log.info("recorded stage %s in dvc.lock", name)
    return True, ""


# ---------------------------------------------------------------------------------------------
# dvc.yaml, generated from the stage table

HEADER = """\
# Generated from the stage table in fm/stages.py by `fm dvc-yaml`: do not edit by hand
# (tests/test_wiring.py fails when this file and the table disagree).
# `dvc repro` runs each stage as `fm <stage>` (activate the venv first: `source .venv/bin/activate`).
# Code deps are the fm modules each stage imports; params are whole params.yaml sections.
"""


def dvc_yaml_dict() -> dict:
    from fm.stages import STAGES, resolve

    paths = Paths(DVC_RAW, DVC_WORKDIR)
    rel = lambda name: resolve(name, paths).as_posix()  # noqa: E731
    stages = {}
    for stage in STAGES.values():
        entry: dict = {"desc": stage.help, "cmd": f"fm {stage.name}"}
        entry["deps"] = [rel(d) for d in stage.deps] + list(stage.code_deps())
        entry["params"] = list(stage.sections)
        entry["outs"] = [rel(o) for o in stage.outs]
        if stage.metrics:
            entry["metrics"] = [rel(m) for m in stage.metrics]
        if stage.plots:
            entry["plots"] = [{rel(p): dict(props)} for p, props in stage.plots.items()]
        stages[stage.name] = entry
    return {"stages": stages}


def render_dvc_yaml() -> str:
    return HEADER + yaml.safe_dump(dvc_yaml_dict(), sort_keys=False, allow_unicode=True, width=120)
