"""The wheel, installed without the checkout, is a working tcmlib: Colab has only what pip installs.

Builds the wheel offline (pip, setuptools, no build isolation, no index), installs it NON-editable
into a private folder and imports it in a fresh interpreter that cannot see the checkout: its
working directory is outside the repository, site-packages are added to ``sys.path`` without
their ``.pth`` files (so the editable install of the development venv is not active) and the
checkout is on no path.  There every packaged config must load by name, ``py.typed`` must be
there, and every ``tcmlib`` module must come from the installed copy.

``test_every_chapter_runs_from_the_installed_wheel`` (marker ``notebooks``; ``make test`` runs it as
its own step, the only run of the chapters there) goes as far as Colab: a fresh venv outside the
checkout with the wheel installed in it (its other dependencies are the development venv's, reached
through a ``.pth`` line, whose editable-install hook therefore never runs), every chapter's
``.ipynb`` copied alone into its own empty directory, and nbmake running them all in smoke mode in a
kernel of that venv.  A chapter's first cell pip-installs tcmlib only when ``import tcmlib`` fails
(Colab), so here it imports the wheel.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tcmlib.train import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "tcmlib" / "configs"
PIP_ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
# nbmake's options for the chapter run (make test passes its own through this variable): a smoke
# chapter takes under a minute, so a cell past 300 s is a kernel-message hang, and it is rerun.
NBMAKE_ARGS = os.environ.get("TCMLIB_NBMAKE_ARGS", "--nbmake-timeout=300 --reruns 2 --durations=5").split()

pytestmark = pytest.mark.slow

CHILD = r"""
import dataclasses, importlib.metadata, importlib.resources, json, sys
from pathlib import Path

target, checkout, extra = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), json.loads(sys.argv[3])
sys.path.extend(extra)  # the venv's site-packages (torch, yaml, ...), added without their .pth files
import tcmlib
from tcmlib.train import TrainConfig, available_configs, load_config, main

def inside(p, root):
    return Path(p).resolve().is_relative_to(root)

names = available_configs()
configs = {}
for name in names:
    cfg = load_config(name)
    assert isinstance(cfg, TrainConfig), name
    configs[name] = dataclasses.asdict(cfg)
assert main(["--config", "no_such_config"]) == 2  # a clear error, listing the names (stderr)
print(json.dumps({
    "file": tcmlib.__file__,
    "in_target": inside(tcmlib.__file__, target),
    "foreign_tcmlib": sorted(n for n, m in sys.modules.items() if n.split(".")[0] == "tcmlib"
                             and getattr(m, "__file__", None) and not inside(m.__file__, target)),
    # an entry of the checkout from which its tcmlib could be imported (a venv inside the checkout, as
    # in CI, holds no tcmlib folder: only the .pth hook of the editable install, which -S skips)
    "checkout_on_path": [p for p in sys.path if p and inside(p, checkout) and (Path(p) / "tcmlib").exists()],
    "py_typed": importlib.resources.files("tcmlib").joinpath("py.typed").is_file(),
    "study_runs": len(__import__("tcmlib.study").study.load_runs(
        __import__("tcmlib.study").study.results_path("ch07", "cpu", smoke=False))),
    "version": importlib.metadata.version("tcmlib"),
    "names": names,
    "configs": configs,
}, default=str))
"""


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the package sources (the checkout gets no build/ or egg-info)."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed: cannot build the wheel offline")
    try:  # not imported here: importing setuptools after distutils was loaded trips its distutils hack
        setuptools_version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("setuptools is not installed: cannot build the wheel offline (no build isolation)")
    if int(setuptools_version.split(".")[0]) < 64:
        pytest.skip(f"setuptools {setuptools_version} < 64 (pyproject's build requirement): cannot build offline")
    src = tmp / "src"
    shutil.copytree(ROOT / "tcmlib", src / "tcmlib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    out = tmp / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, env=PIP_ENV,
                          cwd=tmp, timeout=600)
    log = (proc.stdout + proc.stderr)[-3000:]
    if proc.returncode != 0 and any(s in log for s in ("No matching distribution", "Could not find a version",
                                                       "No module named 'wheel'")):
        pytest.skip(f"the wheel cannot be built offline here: {log}")
    assert proc.returncode == 0, f"pip wheel failed:\n{log}"
    wheels = sorted(out.glob("tcmlib-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("pkg"))


def test_wheel_ships_configs_py_typed_and_tested_torch_bounds(wheel: Path) -> None:
    files = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"tcmlib/configs/{p.name}" for p in CONFIG_DIR.glob("*.yaml")}
    missing = sorted(expected - files)
    assert len(expected) >= 50 and not missing, f"{len(missing)} configs not in the wheel, e.g. {missing[:3]}"
    assert "tcmlib/py.typed" in files
    results = {f"tcmlib/results/{p.parent.name}/{p.name}" for p in (ROOT / "tcmlib" / "results").glob("*/*.jsonl")}
    assert results and results <= files, f"committed results missing from the wheel: {sorted(results - files)}"
    assert not any(f.startswith(("tests/", "notebooks/", "configs/")) for f in files)
    meta = next(f for f in files if f.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
                if line.startswith("Requires-Dist: torch")]
    assert "Requires-Dist: torch>=2.5" in requires and "Requires-Dist: torchvision>=0.20" in requires, requires
    entry = zipfile.ZipFile(wheel).read(next(f for f in files if f.endswith(".dist-info/entry_points.txt"))).decode()
    assert "tcmlib-eval = tcmlib.evaluate:main" in entry and "tcmlib-train = tcmlib.train:main" in entry, entry
    deps = [line for line in zipfile.ZipFile(wheel).read(meta).decode().splitlines()
            if line.startswith(("Requires-Dist:", "Provides-Extra:"))]
    assert deps and not any("faiss" in line for line in deps), "tcmlib never imports faiss: no extra for it"


def test_installed_wheel_loads_every_config_by_name_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, env=PIP_ENV,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert not (target / "tcmlib" / "__init__.py").is_symlink()

    # torch, yaml, ... come from the venv's site-packages, added by the child without running .pth files
    # (the development venv's editable install of tcmlib is a .pth hook); the checkout is never added.
    extra = _site_dirs()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path)),
           "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "elsewhere"  # the working directory: outside the repository
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, "-S", "-s", "-c", CHILD, str(target), str(ROOT), json.dumps(extra)],
                          capture_output=True, text=True, env=env, cwd=run_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no_such_config" in proc.stderr and "glyphs_tiny" in proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    assert got["in_target"], f"tcmlib imported from {got['file']}, not from the installed wheel in {target}"
    assert not got["foreign_tcmlib"], f"tcmlib modules from outside the install: {got['foreign_tcmlib']}"
    assert not got["checkout_on_path"], got["checkout_on_path"]
    assert got["py_typed"]
    assert got["study_runs"] > 0, "the installed package cannot find the committed chapter-7 results"
    expected = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert got["names"] == expected
    for name in expected:  # the installed config is the checkout's, field for field
        mine = json.loads(json.dumps(dataclasses.asdict(load_config(name)), default=str))
        assert got["configs"][name] == mine, name


def _site_dirs() -> list[str]:
    """The development venv's site-packages (torch, yaml, ...) that hold no ``tcmlib`` folder."""
    site_dirs = {*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return [d for d in sorted(site_dirs) if Path(d).is_dir() and not (Path(d) / "tcmlib").exists()]


@pytest.mark.notebooks
def test_every_chapter_runs_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("nbmake") is None:
        pytest.skip("nbmake is not installed: cannot run the chapters (pip install -r requirements.txt)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # one path per line: added to sys.path, but the .pth files inside (the editable hook) are not run
    (purelib / "zz_dev_dependencies.pth").write_text("\n".join(_site_dirs()) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--target", str(purelib), str(wheel)], capture_output=True, text=True, env=PIP_ENV,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(TCMLIB_SMOKE="1", OMP_WAIT_POLICY="PASSIVE", PYTHONNOUSERSITE="1")
    run = tmp_path / "run"
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 14, notebooks
    for nb in notebooks:  # each chapter alone in an empty directory, as in a Colab runtime
        (run / nb.stem).mkdir(parents=True)
        shutil.copy2(nb, run / nb.stem / nb.name)
    where = subprocess.run([str(py), "-c", "import sys, tcmlib; print(tcmlib.__file__); "
                            "print(sorted(m for m in sys.modules if 'editable' in m))"],
                           capture_output=True, text=True, env=env, cwd=run, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    file, editable = where.stdout.strip().splitlines()
    assert Path(file).resolve().is_relative_to(purelib.resolve()), f"tcmlib imported from {file}, not the wheel"
    assert editable == "[]", f"the development venv's editable install is active: {editable}"

    proc = subprocess.run([str(py), "-m", "pytest", "--nbmake", *NBMAKE_ARGS, "-q", "-p", "no:cacheprovider",
                           str(run)], capture_output=True, text=True, env=env, cwd=run, timeout=4 * 3600)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, f"a chapter failed from the installed wheel:\n{(proc.stdout + proc.stderr)[-8000:]}"
    assert f"{len(notebooks)} passed" in proc.stdout, proc.stdout[-3000:]
