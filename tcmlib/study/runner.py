"""Carrying out a study: its results files, one run's record, and :func:`reproduce`.

A study's runs live in ``tcmlib/results/<study>/runs.jsonl`` (:func:`results_path`; package data), one JSON line
per finished run (:func:`run_record`: config, per-epoch history, test metrics, provenance), appended under a lock;
a planned study's power plan lies beside it in ``plan.json`` (:func:`write_plan`), its final runs' per-class
utility curves in ``classes/`` (:func:`class_utility`).  :func:`reproduce` trains, stage by stage, every run the
protocol (``tcmlib.study.protocols``) wants and the file lacks.  Several processes may share one study: each
claims a run with a non-blocking file lock before training it (:func:`_claim`), so no run is trained twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from tcmlib.experiments import config_key, run_cached, run_name
from tcmlib.runtime import is_smoke, scale as default_scale
from tcmlib.study.protocols import (Protocol, cell_length, cells, for_backbone, power_plan, protocol, stage_configs,
                                    with_plan)
from tcmlib.train import TrainConfig

__all__ = ["results_path", "load_runs", "plan_path", "load_plan", "provenance", "run_record", "class_utility",
           "write_plan", "reproduce", "load_study", "run_as_recorded"]

_REPO = Path(__file__).resolve().parents[2]  # the checkout (this file is tcmlib/study/runner.py)
_protocol_of = protocol  # (reproduce's ``protocol=`` argument shadows the function's name there)


# ---- results files ---------------------------------------------------------------------------------------------

def results_path(study: str, scale: str, root: str | os.PathLike | None = None, smoke: bool | None = None) -> Path:
    """``<root>/<study>/runs.jsonl`` (cpu), ``runs-gpu.jsonl`` (gpu), ``runs-smoke.jsonl`` (smoke).

    ``root`` defaults to ``tcmlib/results``, the committed results that ship with the package.
    """
    smoke = is_smoke() if smoke is None else smoke
    suffix = "-smoke" if smoke else "" if scale == "cpu" else f"-{scale}"
    base = Path(root) if root is not None else Path(__file__).resolve().parents[1] / "results"
    return base / study / f"runs{suffix}.jsonl"


def load_runs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished run in a ``runs.jsonl``, once per (stage, config key).

    A torn last line (a killed writer) is skipped; any other invalid line is an error.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    runs, seen = [], set()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue  # interrupted while appending: that run is simply not finished
            raise ValueError(f"{path}:{i + 1} is not valid JSON ({e}); fix or delete that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{i + 1} is a JSON {type(record).__name__}, not a run record (an object); "
                             "fix or delete that line")
        missing = [k for k in ("stage", "key") if k not in record]
        if missing:
            raise ValueError(f"{path}:{i + 1}: the run record lacks its {' and '.join(missing)} field (every "
                             "line of a runs.jsonl names its stage and config key); fix or delete that line")
        if (record.get("stage"), record.get("key")) in seen:
            continue  # one run recorded twice (two processes raced): the same config, the first counts
        seen.add((record.get("stage"), record.get("key")))
        runs.append(record)
    return runs


def plan_path(study: str, scale: str, root: str | os.PathLike | None = None, smoke: bool | None = None) -> Path:
    """The power plan of a planned study: ``plan.json`` (``plan-gpu.json``, ``plan-smoke.json``) beside its runs."""
    runs = results_path(study, scale, root, smoke=smoke)
    return runs.with_name(runs.name.replace("runs", "plan").replace(".jsonl", ".json"))


def load_plan(path: str | os.PathLike) -> dict[str, Any] | None:
    """The power plan at ``path`` (None when there is none yet)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from git (git checkout -- {path})") from None


def _append(path: Path, record: Mapping[str, Any]) -> None:
    """Append one line under an exclusive lock (several ``reproduce`` processes may share a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: one process at a time, please
            pass
        text = path.read_text() if path.exists() else ""
        if text and not text.endswith("\n"):  # drop a torn line left by a kill
            path.write_text(text[: text.rfind("\n") + 1])
        with open(path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


# ---- one run and its record ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _code_version() -> tuple[str | None, bool | None]:
    """``(commit, tcmlib has uncommitted changes)`` of the checkout, read once per process.

    Read when the process first asks (``reproduce`` asks before training), so a record names the
    code the process loaded, even if the checkout moves on while a long study runs.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "tcmlib"], cwd=_REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def provenance(command: str | None = None) -> dict[str, Any]:
    """Where and how a result was made: commit (of the code this process loaded), command, versions, device."""
    commit, dirty = _code_version()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or platform.machine())
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu_model)
    except OSError:
        pass
    return {"commit": commit, "tcmlib_dirty": dirty, "command": command or shlex.join([Path(sys.executable).name,
                                                                                          *sys.argv]),
            "torch": torch.__version__, "python": platform.python_version(), "device": device,
            "cpu_model": cpu_model, "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_record(study: str, stage: str, backbone: str, loss: str, variant: str, cfg: TrainConfig,
               *, cache_dir: str | os.PathLike | None = None, command: str | None = None,
               n_boot: int = 1000, class_store: Path | None = None, class_every: int = 0) -> dict[str, Any]:
    """Train (or load from the run cache) one run and return its results line.

    ``class_store`` (final runs of a study that keeps them): the folder where the run's per-class utility curves go,
    every ``class_every``-th threshold, as ``<key>.npz`` (``utility`` float16 (K', T), ``thresholds`` (K',),
    ``class_ids`` (T,)); the record holds the file's sha256.
    """
    import numpy as np

    from tcmlib.metrics import utility_curves
    from tcmlib.report import opis_bootstrap_ci

    t0 = time.perf_counter()
    res = run_cached(cfg, cache_dir=cache_dir)
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {"study": study, "stage": stage, "backbone": backbone, "loss": loss,
                              "variant": variant, "seed": cfg.seed, "key": config_key(cfg), "name": run_name(cfg),
                              "config": dataclasses.asdict(cfg), "history": res.history, "final": res.final}
    if stage == "final":
        emb, labels = res.test_embeddings()
        curves = utility_curves(emb, labels)
        ci = opis_bootstrap_ci(curves, n_boot=n_boot, seed=cfg.seed)
        record["test_opis_ci"] = [ci.lo, ci.hi]
        if class_store is not None and class_every > 0:
            class_store.mkdir(parents=True, exist_ok=True)
            target = class_store / f"{record['key']}.npz"
            tmp = class_store / f".{record['key']}.tmp.npz"
            np.savez_compressed(tmp, utility=curves.utility[::class_every].numpy().astype(np.float16),
                                thresholds=curves.thresholds[::class_every].numpy(),
                                class_ids=curves.class_ids.numpy())
            os.replace(tmp, target)
            record["class_curves"] = {"file": f"classes/{target.name}", "sha256": _sha256_file(target),
                                      "every": class_every}
    record["wall_s"] = round(time.perf_counter() - t0, 2)
    record["train_wall_s"] = round(wall, 2)
    record["trained_now"] = res.trained
    record["provenance"] = provenance(command)
    return record


def _sha256_file(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def class_utility(path: str | os.PathLike, record: Mapping[str, Any]) -> Any:
    """The per-class utility curves a final run kept: float64 array (K', T), checked against its recorded sha256.

    ``path``: the study's ``runs.jsonl`` (the curves lie in ``classes/`` beside it; a run reused from another
    study keeps them in that study's folder, beside this one).
    """
    import numpy as np

    info = record.get("class_curves")
    if info is None:
        raise ValueError(f"run {record.get('name')} kept no per-class curves (only the converged study's final runs do)")
    folder = Path(path).parent
    if "reused_from" in record:
        folder = folder.parent / record["reused_from"]
    file = folder / info["file"]
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing: its run's per-class curves; restore it from git")
    if _sha256_file(file) != info["sha256"]:
        raise ValueError(f"{file} does not match the sha256 its run recorded; restore it from git")
    with np.load(file) as z:
        return z["utility"].astype(np.float64)


# ---- carrying out a study --------------------------------------------------------------------------------------

def write_plan(study: str = "converged", *, scale: str | None = None, results_root: str | os.PathLike | None = None,
               smoke: bool | None = None, command: str | None = None) -> Path | None:
    """Add to ``plan.json`` every cell whose training length is now decided; never change a cell already planned.

    Returns the plan's path when it changed, else None.  The plan must be committed before the cell's final runs
    (which wait for it), so that the order is on record.
    """
    scale = scale or default_scale()
    p = _protocol_of(study, scale, smoke=smoke)
    if not p.planned:
        raise ValueError(f"study {study!r} has no power plan (its final seeds are fixed in its protocol)")
    path = plan_path(study, scale, results_root, smoke=smoke)
    runs = load_runs(results_path(study, scale, results_root, smoke=smoke))
    pilot = load_runs(results_path("ch07", "cpu", None, smoke=False))
    old = load_plan(path)
    ready = [(b, loss) for b, loss in cells(p)
             if cell_length(p, runs, b, loss)[0] is not None]
    if not ready:
        return None
    new = power_plan(dataclasses.replace(p, backbones=tuple(dict.fromkeys(b for b, _ in ready)),
                                         backbone_protocol={b: {**dict(p.backbone_protocol.get(b, {})),
                                                                "losses": tuple(loss for bb, loss in ready if bb == b)}
                                                            for b, _ in ready}), runs, pilot)
    plan = old or {k: v for k, v in new.items() if k != "cells"} | {"cells": {}}
    added = [c for c in new["cells"] if c not in plan["cells"]]
    if not added:
        return None
    for c in added:
        plan["cells"][c] = {**new["cells"][c], "provenance": provenance(command)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def reproduce(study: str = "ch07", *, scale: str | None = None, only: Sequence[str] = (), results_root: str |
              os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, max_runs: int | None = None,
              command: str | None = None, smoke: bool | None = None, progress: bool = True,
              protocol: Protocol | None = None) -> Path:
    """Train every run of ``study`` that ``runs.jsonl`` lacks, stage by stage, appending as each finishes.

    ``only``: restrict to cells named ``backbone/loss`` or backbones (e.g. ``["small_cnn"]``).
    ``max_runs``: stop after this many new runs (to work in pieces).  Returns the results file.
    ``protocol``: a changed protocol (e.g. ``dataclasses.replace(P, epochs=10)``) to train instead of
    the study's own; its runs go to ``study``'s file under ``results_root``, so give a folder of
    your own.  Runs already there with the same stage and config are kept, not retrained.
    """
    from tqdm.auto import tqdm

    scale = scale or default_scale()
    if protocol is None:
        p = _protocol_of(study, scale, smoke=smoke)
    elif not isinstance(protocol, Protocol):
        raise TypeError(f"protocol= takes a tcmlib.study.Protocol (e.g. dataclasses.replace(P, epochs=10)), "
                        f"not {type(protocol).__name__}")
    else:
        p = protocol
    path = results_path(study, scale, results_root, smoke=smoke)
    unplanned = p
    if p.planned:  # the final seeds of the cells planned so far (see write_plan)
        p = with_plan(p, load_plan(plan_path(study, scale, results_root, smoke=smoke)))
    _code_version()  # pin the commit of the code this process runs
    chosen = [c for c in cells(p) if not only or f"{c[0]}/{c[1]}" in only or c[0] in only]
    if only and not chosen:
        raise ValueError(f"--only {list(only)} matches no cell; cells: {[f'{b}/{loss}' for b, loss in cells(p)]}")
    new = 0
    donors = _donors(p, scale, results_root, smoke)
    for backbone, loss in chosen:
        # a planned study's final stage runs again after tuning: the selected margins join it then
        for stage in (*p.stages, *(("final",) if p.planned and p.stages[-1] == "tune" else ())):
            if stage == "final" and p.planned and (smoke if smoke is not None else is_smoke()):
                # smoke mode plans as it goes; a real study's plan is written and committed by hand first
                write_plan(study, scale=scale, results_root=results_root, smoke=smoke)
                p = with_plan(unplanned, load_plan(plan_path(study, scale, results_root, smoke=smoke)))
            runs = load_runs(path)
            wanted = stage_configs(p, runs, backbone, loss, stage)
            if wanted is None:
                break
            bar = tqdm(total=len(wanted), desc=f"{backbone}/{loss} {stage}", disable=not progress, dynamic_ncols=True)
            while True:  # several processes may share a stage: each takes the runs no other has claimed
                done = {r["key"] for r in load_runs(path) if r["stage"] == stage}
                todo = [(v, c) for v, c in wanted if config_key(c) not in done]
                bar.n = len(wanted) - len(todo)
                bar.refresh()
                if not todo:
                    break
                ran = False
                for variant, cfg in todo:
                    donor = donors.get((stage, config_key(cfg)))
                    if donor is None and max_runs is not None and new >= max_runs:
                        return path
                    with _claim(path, stage, config_key(cfg)) as mine:
                        if not mine or config_key(cfg) in {r["key"] for r in load_runs(path) if r["stage"] == stage}:
                            continue
                        if donor is not None:  # the same run, recorded by another study: reuse it
                            _append(path, {**donor, "study": study, "reused_from": donor["study"]})
                        else:
                            bar.set_postfix_str(f"{variant} seed {cfg.seed}")
                            keep = for_backbone(p, backbone).class_curves_every
                            _append(path, run_record(study, stage, backbone, loss, variant, cfg,
                                                     cache_dir=cache_dir, command=command,
                                                     class_store=path.parent / "classes" if keep else None,
                                                     class_every=keep))
                            new += 1
                    ran = True
                    bar.update(1)
                if not ran:  # what is left is being trained by another process: wait for its records
                    time.sleep(5)
            bar.close()
    return path


def _donors(p: Protocol, scale: str, results_root: str | os.PathLike | None, smoke: bool | None
            ) -> dict[tuple[str, str], dict[str, Any]]:
    """``(stage, key) -> record`` of the runs this study may reuse from the studies it names."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for other in p.reuse:
        for r in load_runs(results_path(other, scale, results_root, smoke=smoke)):
            if "reused_from" not in r:
                out.setdefault((r["stage"], r["key"]), r)
    return out


@contextlib.contextmanager
def _claim(path: Path, stage: str, key: str) -> Iterator[bool]:
    """A non-blocking exclusive claim on one run of a results file; yields whether this process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: a single process, always its own claim
        yield True
        return
    folder = path.parent / ".claims"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{stage}-{key}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- what the chapters load ------------------------------------------------------------------------------------

def load_study(study: str, scale: str | None = None, *, retrain: bool = False, smoke: bool | None = None
               ) -> tuple[Protocol, Path, list[dict[str, Any]]]:
    """``(protocol, results file, runs)`` of a study, as the chapters load it.

    The committed file by default; with ``retrain=True`` (or when the file is missing) the runs it
    lacks are trained first through :func:`reproduce`; smoke mode always trains a tiny version live
    into a temporary folder (the run cache still serves runs an earlier chapter trained).
    """
    scale = scale or default_scale()
    smoke = is_smoke() if smoke is None else smoke
    p = protocol(study, scale, smoke=smoke)
    path = results_path(study, scale, root=_smoke_root() if smoke else None, smoke=smoke)
    if smoke or retrain or not path.exists():
        if not (smoke or retrain):
            print(f"{path} is not here: training the study now")
        reproduce(study, scale=scale, results_root=path.parents[1], smoke=smoke)
    return p, path, load_runs(path)


@functools.lru_cache(maxsize=1)
def _smoke_root() -> str:
    """One temporary results root per process, so smoke studies in one kernel can reuse each other."""
    import tempfile

    return tempfile.mkdtemp(prefix="tcmlib-smoke-results-")


def run_as_recorded(cfg: TrainConfig, runs: Sequence[Mapping[str, Any]], *,
                    cache_dir: str | os.PathLike | None = None) -> Any:
    """:func:`~tcmlib.experiments.run_cached` with torch's thread count set to the one the recorded run of
    ``cfg`` used (its ``provenance["threads"]``), so that on the recording CPU the run is the recorded
    one bit for bit (CPU kernels round differently with another thread count, and training amplifies
    that).  Without a record of ``cfg`` in ``runs`` the thread count is left alone."""
    key = config_key(cfg)
    threads = next((r["provenance"]["threads"] for r in runs if r["key"] == key), None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return run_cached(cfg, cache_dir=cache_dir)
    finally:
        torch.set_num_threads(before)
