"""Train once, then load: a cache of finished runs keyed by their configuration.

Chapters that compare many trainings call :func:`run_cached` (one run) or :func:`run_grid`
(configs x seeds).  The first call trains; every later call with the same configuration loads
the finished run from disk in well under a second, so the book builds fast and a chapter that
needs another chapter's models simply asks for the same configs::

    from tcmlib.experiments import run_cached, run_grid, summarize
    from tcmlib.train import load_config

    cfg = load_config("glyphs_tiny", epochs=1)  # a config that ships with tcmlib, by name
    res = run_cached(cfg)                 # trains (or resumes, or loads)
    res.final["OPIS"], res.trained        # last evaluation; did this call train?
    emb, labels = res.test_embeddings()   # cached beside the run
    model = res.load_model()

Layout: ``<cache_dir>/<name>-<key>/`` with ``config.yaml``, ``metrics.jsonl`` / ``metrics.csv``
(written by :func:`tcmlib.train.fit`), ``model.pt`` (final weights), ``summary.json`` (written
last: its presence marks the run complete; it records the size and sha256 of ``model.pt``) and,
once asked for, ``test_embeddings.pt``.  Every file is written atomically (temporary file,
fsync, rename).  A finished entry is verified before it is used: an unreadable ``summary.json``,
a key that is not this config's, or a ``model.pt`` that is missing or differs from what the
summary recorded makes the entry corrupt; it is then deleted and retrained, with a message.
``key`` is a hash of every config field except ``run_dir``, ``progress`` and ``device`` (where
and how verbosely a run goes does not change what it computes).  A directory without
``summary.json`` is a run that was interrupted: the next call resumes it from its newest
checkpoint (``fit(..., resume=True)``), exactly where it stopped.

The cache lives in ``$TCMLIB_RUNS`` if set, else ``<repo>/.cache/tcm-book/runs`` when tcmlib
is used from the book's repository, else ``~/.cache/tcmlib/runs``.  On Colab, point
``TCMLIB_RUNS`` at a mounted Drive folder to keep runs between sessions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from tcmlib.models import Embedder, build_embedder
from tcmlib.train import LEGACY_VALUES, SMALL_DATASETS, TrainConfig, build_data, embed, fit, input_size, load_config

__all__ = ["RunResult", "run_cached", "run_grid", "summarize", "tcm_deltas", "config_key", "default_runs_dir",
           "format_table", "write_csv", "read_csv", "METRICS"]

METRICS = ("R@1", "MAP@R", "OPIS", "eps_OPIS")  # the paper's table: accuracy and consistency
# do not change what a run computes (when a run saves a checkpoint does not change its weights or numbers)
IGNORED_FIELDS = ("run_dir", "progress", "device", "checkpoint_every_minutes")
_REPO = Path(__file__).resolve().parents[1]


def default_runs_dir() -> Path:
    """``$TCMLIB_RUNS``, else ``<repo>/.cache/tcm-book/runs`` inside the book's repository, else ``~/.cache/tcmlib/runs``."""
    if os.environ.get("TCMLIB_RUNS"):
        return Path(os.environ["TCMLIB_RUNS"]).expanduser()
    if (_REPO / "pyproject.toml").exists() and (_REPO / "notebooks").is_dir():
        return _REPO / ".cache" / "tcm-book" / "runs"
    return Path.home() / ".cache" / "tcmlib" / "runs"


def _as_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """A validated :class:`TrainConfig` (dicts go through ``load_config``: unknown keys are an error)."""
    cfg = config if isinstance(config, TrainConfig) else load_config(None, **dict(config))
    cfg.validate()
    return cfg


def config_key(config: TrainConfig | Mapping[str, Any]) -> str:
    """A 12-hex-digit hash of every config field except those in :data:`IGNORED_FIELDS` (``run_dir``, ...).

    Stable across processes and Python versions (sorted JSON of plain values); any change to a field
    that affects training or evaluation (seed, epochs, a TCM margin, ...) gives another key.
    """
    values = dataclasses.asdict(_as_config(config))
    for name in IGNORED_FIELDS:
        values.pop(name)
    for name, old in LEGACY_VALUES.items():  # fields added later: hashed only when they change the old run
        if values[name] == old:
            values.pop(name)
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_name(config: TrainConfig) -> str:
    """A readable directory prefix: ``glyphs-small_cnn-smooth_ap-tcm-s0``."""
    tcm = "-tcm" if config.tcm else ""
    return f"{config.dataset}-{config.backbone.replace(':', '_')}-{config.loss}{tcm}-s{config.seed}"


@dataclass
class RunResult:
    """A finished run: its config, per-epoch history, last evaluation, and where its files are."""

    config: TrainConfig
    history: list[dict[str, Any]]
    final: dict[str, Any]  # the last epoch's record: R@k, MAP@R, OPIS, eps_OPIS, loss parts, times
    run_dir: Path
    key: str
    trained: bool  # True when this call trained (or resumed); False when it loaded a finished run

    @property
    def checkpoint(self) -> Path:
        """The final weights (``model.pt``: the Embedder's ``state_dict``)."""
        return self.run_dir / "model.pt"

    def load_model(self, device: str | torch.device = "cpu") -> Embedder:
        """Rebuild the Embedder of this run and load its final weights (checksum-verified); returned in eval mode.

        Raises ``ValueError`` (:class:`CorruptCacheEntry`) when ``model.pt`` is missing or not the file
        the run wrote; ``run_cached`` on the same config then retrains it.
        """
        cfg = self.config
        _read_summary(cfg, self.run_dir, self.key)  # verifies model.pt against the recorded size and sha256
        in_channels = 1 if cfg.dataset in SMALL_DATASETS else 3
        model = build_embedder(cfg.backbone, cfg.dim, False, in_channels, small_input=cfg.small_input,
                               image_size=input_size(cfg), frozen_bn=cfg.frozen_bn)
        model.load_state_dict(torch.load(self.checkpoint, map_location="cpu", weights_only=True))
        return model.to(device).eval()

    def test_embeddings(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings (N, D) float32, labels (N,))`` of the test split; computed once, then read from disk."""
        path = self.run_dir / "test_embeddings.pt"
        if path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                return saved["embeddings"].detach(), saved["labels"]  # (a file that kept a graph flag: plain data)
            except Exception as e:  # truncated or foreign: computed again below
                warnings.warn(f"{path} cannot be read ({type(e).__name__}); computing the embeddings again")
        _, test, _ = build_data(self.config)
        emb, labels = embed(self.load_model(device), test, batch_size=self.config.eval_batch_size, device=device)
        _atomic_write(path, lambda fh: torch.save({"embeddings": emb, "labels": labels}, fh))
        return emb, labels


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir/.lock`` so two processes never train the same run at once."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, same behaviour otherwise
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class CorruptCacheEntry(ValueError):
    """A finished cache entry whose files do not match what its summary recorded."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    """``write(fh)`` into a temporary file beside ``path``, fsync, then rename onto ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _verify_file(run_dir: Path, name: str, record: Mapping[str, Any]) -> None:
    path = run_dir / name
    if not path.is_file():
        raise CorruptCacheEntry(f"{path} is missing")
    size = path.stat().st_size
    if size != record.get("size"):
        raise CorruptCacheEntry(f"{path} has {size} bytes, the summary recorded {record.get('size')} (truncated?)")
    if _sha256(path) != record.get("sha256"):
        raise CorruptCacheEntry(f"{path} differs from the file this run wrote (sha256 mismatch)")


def _verify_legacy_model(cfg: TrainConfig, path: Path) -> None:
    """An entry written before checksums: ``model.pt`` must load and fit this config's Embedder."""
    if not path.is_file():
        raise CorruptCacheEntry(f"{path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCacheEntry(f"{path} cannot be read ({type(e).__name__})") from None
    in_channels = 1 if cfg.dataset in SMALL_DATASETS else 3
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's RNG alone
        model = build_embedder(cfg.backbone, cfg.dim, False, in_channels, small_input=cfg.small_input,
                               image_size=input_size(cfg), frozen_bn=cfg.frozen_bn)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not isinstance(state, dict) or {k: tuple(getattr(v, "shape", ())) for k, v in state.items()} != want:
        raise CorruptCacheEntry(f"{path} does not hold this run's model (another architecture or run)")


def _read_summary(cfg: TrainConfig, run_dir: Path, key: str) -> dict[str, Any]:
    """The verified summary of a finished entry; :class:`CorruptCacheEntry` when anything does not match."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCacheEntry(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(summary, dict) or not {"key", "history", "final"} <= set(summary):
        raise CorruptCacheEntry(f"{path} lacks the keys key, history, final")
    if summary["key"] != key:
        raise CorruptCacheEntry(f"{path} belongs to run {summary['key']}, not {key}")
    files = summary.get("files")
    if files is None:  # written before checksums were recorded: check what can be checked, then record them
        _verify_legacy_model(cfg, run_dir / "model.pt")
        summary["files"] = {"model.pt": _file_record(run_dir / "model.pt")}
        _atomic_write(path, lambda fh: fh.write(json.dumps(summary, indent=1, default=str).encode()))
    else:
        for name, record in files.items():
            _verify_file(run_dir, name, record)
    return summary


def _load(cfg: TrainConfig, run_dir: Path, key: str, trained: bool) -> RunResult:
    summary = _read_summary(cfg, run_dir, key)
    return RunResult(config=cfg, history=summary["history"], final=summary["final"], run_dir=run_dir, key=key,
                     trained=trained)


def _clear(run_dir: Path) -> None:
    for child in run_dir.iterdir():
        if child.name != ".lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def run_cached(config: TrainConfig | Mapping[str, Any], *, cache_dir: str | os.PathLike | None = None,
               force: bool = False, keep_checkpoints: bool = False, quiet: bool | None = None) -> RunResult:
    """Load the finished run of ``config`` from the cache, or train it (resuming a partial run) and cache it.

    Args:
        config: a :class:`TrainConfig` or a dict of its fields; its ``run_dir`` is ignored (the run
            goes to ``<cache_dir>/<name>-<key>``).
        cache_dir: the cache root; default :func:`default_runs_dir`.
        force: delete any cached or partial run of this config and train from scratch.
        keep_checkpoints: keep the resumable training checkpoints (weights + optimiser state) after
            the run completes; by default only the final weights, ``model.pt``, are kept.
        quiet: hide the per-epoch and checkpoint lines ``fit`` prints; default: when ``config.progress``
            is False (then a notebook shows only what the page prints itself).

    Raises ``ValueError`` for a bad config (before any work), and whatever :func:`tcmlib.train.fit` raises.
    """
    cfg = _as_config(config)
    key = config_key(cfg)
    run_dir = Path(cache_dir) if cache_dir is not None else default_runs_dir()
    run_dir = run_dir / f"{run_name(cfg)}-{key}"
    with _locked(run_dir):
        if force:
            _clear(run_dir)
        for stale in run_dir.glob(".*.tmp"):  # interrupted atomic writes (we hold the lock: none is in progress)
            stale.unlink(missing_ok=True)
        for old in ("summary.json.tmp", "test_embeddings.tmp"):  # the names older versions used
            (run_dir / old).unlink(missing_ok=True)
        if (run_dir / "summary.json").exists():
            try:
                return _load(cfg, run_dir, key, trained=False)
            except CorruptCacheEntry as e:
                msg = f"cached run {run_dir.name} is corrupt ({e}); deleting it and training it again"
                warnings.warn(msg, stacklevel=2)
                print(msg, file=sys.stderr)
                _clear(run_dir)
        # new or interrupted: fit() resumes from the newest checkpoint if there is one, else starts over
        # (restart: this folder is the cache's own, named by the config's key, and holds no finished run)
        quiet = not cfg.progress if quiet is None else quiet
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            result = fit(cfg, resume=True, restart=True, run_dir=str(run_dir))
        state = result.model.state_dict()
        _atomic_write(run_dir / "model.pt", lambda fh: torch.save(state, fh))
        summary = {"key": key, "config": dataclasses.asdict(cfg), "final": result.final, "history": result.history,
                   "files": {"model.pt": _file_record(run_dir / "model.pt")}}
        text = json.dumps(summary, indent=1, default=str).encode()
        _atomic_write(run_dir / "summary.json", lambda fh: fh.write(text))  # written last: marks the run complete
        if not keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return _load(cfg, run_dir, key, trained=True)


def describe(config: TrainConfig) -> dict[str, Any]:
    """The columns that identify a run in a table: data, backbone, loss, TCM and its settings, seed."""
    row: dict[str, Any] = {"dataset": config.dataset, "backbone": config.backbone, "loss": config.loss,
                           "tcm": bool(config.tcm)}
    if isinstance(config.tcm, dict):
        row.update({k: float(v) for k, v in config.tcm.items()})
    row["seed"] = config.seed
    return row


def run_grid(configs: Mapping[str, TrainConfig | Mapping[str, Any]] | Sequence[TrainConfig | Mapping[str, Any]],
             seeds: Iterable[int] = (0,), *, cache_dir: str | os.PathLike | None = None, force: bool = False,
             progress: bool = True) -> list[dict[str, Any]]:
    """Run (or load) every config with every seed; one row (a dict) per run.

    Each row holds ``name`` (the mapping's key, or :func:`run_name` without the seed), the columns of
    :func:`describe`, the final record (its training ``loss`` renamed ``train_loss``), ``trained``
    and ``key``.  A tqdm bar counts the runs; each
    run's own bars are switched off.
    """
    items = list(configs.items()) if isinstance(configs, Mapping) else [(None, c) for c in configs]
    cfgs = [(name, _as_config(c)) for name, c in items]  # validate all before training any
    jobs = [(name, dataclasses.replace(c, seed=int(s), progress=False)) for name, c in cfgs for s in seeds]
    rows = []
    bar = tqdm(jobs, desc="runs", disable=not progress, dynamic_ncols=True)
    for name, cfg in bar:
        bar.set_postfix_str(f"{name or run_name(cfg)} seed {cfg.seed}")
        res = run_cached(cfg, cache_dir=cache_dir, force=force)
        final = {("train_loss" if k == "loss" else k): v for k, v in res.final.items()}  # "loss" names the loss
        rows.append({"name": name or run_name(dataclasses.replace(cfg, seed=0))[:-3], **describe(cfg), **final,
                     "trained": res.trained, "key": res.key})
    return rows


def summarize(rows: Sequence[Mapping[str, Any]], by: Sequence[str] = ("backbone", "loss", "tcm"),
              metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Group ``rows`` by the columns ``by``; per group: ``n``, ``<metric>_mean`` and ``<metric>_std``.

    The std is the sample standard deviation (n - 1), NaN for a single run. Groups keep the order in
    which they first appear.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[b] for b in by), []).append(row)
    out = []
    for values, members in groups.items():
        rec: dict[str, Any] = dict(zip(by, values))
        rec["n"] = len(members)
        for m in metrics:
            xs = [float(r[m]) for r in members]
            mean = sum(xs) / len(xs)
            rec[f"{m}_mean"] = mean
            rec[f"{m}_std"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
        out.append(rec)
    return out


def tcm_deltas(summary: Sequence[Mapping[str, Any]], by: Sequence[str] = ("backbone", "loss"),
               metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Pair each ``tcm=False`` group of a :func:`summarize` table with its ``tcm=True`` twin (same ``by``).

    Per pair and metric: ``<m>_base``, ``<m>_tcm`` (means), ``<m>_delta`` (tcm - base) and
    ``<m>_rel`` (delta / base; NaN when base is 0).
    """
    index = {(tuple(r[b] for b in by), bool(r["tcm"])): r for r in summary}
    out = []
    for (values, tcm), base in index.items():
        if tcm or (values, True) not in index:
            continue
        with_tcm = index[(values, True)]
        rec: dict[str, Any] = dict(zip(by, values))
        for m in metrics:
            b, t = base[f"{m}_mean"], with_tcm[f"{m}_mean"]
            rec.update({f"{m}_base": b, f"{m}_tcm": t, f"{m}_delta": t - b, f"{m}_rel": (t - b) / b if b else math.nan})
        out.append(rec)
    return out


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}" if abs(value) < 1e-2 and value else f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """A Markdown table of ``rows`` (floats to ``digits`` decimals, small ones to ``digits`` significant digits)."""
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, ""), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` (dicts) as a CSV with the union of their keys as header; return the path."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a CSV written by :func:`write_csv`; numbers become floats/ints, ``True``/``False`` bools."""
    import csv

    def parse(v: str) -> Any:
        if v in ("True", "False"):
            return v == "True"
        for typ in (int, float):
            try:
                return typ(v)
            except ValueError:
                pass
        return v

    with open(path, newline="") as fh:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


if __name__ == "__main__":  # python -m tcmlib.experiments reproduce ...: the command lives in tcmlib.reproduce
    from tcmlib.reproduce import main  # (only when run as a script: importing this module never imports study)

    raise SystemExit(main())
