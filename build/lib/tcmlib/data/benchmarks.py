"""CUB-200-2011, Cars-196, Stanford Online Products and iNaturalist-2018: open-world splits, checked.

Each loader reads the index files of the on-disk layout pytorch-metric-learning's ``datasets``
module produces (and, for Cars, also the original ``cars_annos.mat`` + ``car_ims/``), keeps the
standard classes of the split (train and test classes are disjoint), remaps the labels to
``0..C-1`` and checks that every listed image exists.  Whatever is missing or unreadable raises
``FileNotFoundError`` / ``ValueError`` naming the file and saying how to get the data.

Layouts and splits::

    =========  ========================================================  =================  =================
    name       layout under ``root``                                      train              test
    =========  ========================================================  =================  =================
    ``cub``    ``CUB_200_2011/{images.txt, image_class_labels.txt,        classes 1-100,     101-200, 5,924
               images/}``                                                 5,864 images
    ``cars``   ``names.csv, anno_{train,test}.csv,                        classes 1-98,      99-196, 8,131
               car_data/car_data/{train,test}/<name, / -> ->/``           8,054
               or ``cars_annos.mat`` + ``car_ims/``
    ``sop``    ``Stanford_Online_Products/Ebay_{train,test}.txt``         11,318 classes,    11,316, 60,502
                                                                          59,551
    ``inat``   ``train_val2018/, train2018.json, val2018.json,             5,690 classes,     2,452, 136,093
               Inat_dataset_splits/Inaturalist_{train,test}_set1.txt``    325,846
    =========  ========================================================  =================  =================

Use :func:`load_benchmark` (or :func:`get_dataset`, which also knows ``glyphs``, ``digits``
and ``mnist``), :func:`verify_benchmark` to check a copy, :func:`download_benchmark` on Colab.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = [
    "BENCHMARKS", "BenchmarkSpec", "ImageListDataset", "cub_index", "cars_index", "sop_index", "inat_index",
    "load_benchmark", "verify_benchmark", "download_benchmark", "get_dataset", "DATASET_NAMES",
]


@dataclass(frozen=True)
class BenchmarkSpec:
    """What a complete copy holds, and how to get one."""

    title: str
    train_classes: int
    test_classes: int
    train_images: int
    test_images: int
    how_to_get: str


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "cub": BenchmarkSpec(
        "CUB-200-2011", 100, 100, 5864, 5924,
        "Get it with tcmlib.data.download_benchmark('cub', root) (1.1 GB), or download "
        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz and extract it into root "
        "(root/CUB_200_2011/images.txt must exist).",
    ),
    "cars": BenchmarkSpec(
        "Cars-196", 98, 98, 8054, 8131,
        "Get it with tcmlib.data.download_benchmark('cars', root) (1.9 GB, Kaggle "
        "'jutrera/stanford-car-dataset-by-classes-folder'), or extract that Kaggle zip into root "
        "(root/names.csv, root/anno_train.csv, root/car_data/car_data/...), or put the original "
        "cars_annos.mat and car_ims/ into root.",
    ),
    "sop": BenchmarkSpec(
        "Stanford Online Products", 11318, 11316, 59551, 60502,
        "Get it with tcmlib.data.download_benchmark('sop', root) (2.9 GB), or download "
        "Stanford_Online_Products.zip (https://cvgl.stanford.edu/projects/lifted_struct/) and extract it "
        "into root (root/Stanford_Online_Products/Ebay_train.txt must exist).",
    ),
    "inat": BenchmarkSpec(
        "iNaturalist-2018 (Smooth-AP split)", 5690, 2452, 325846, 136093,
        "Get it with tcmlib.data.download_benchmark('inat', root) (~130 GB; needs pip install gdown "
        "for the split files), or extract train_val2018.tar.gz, train2018.json.tar.gz, val2018.json.tar.gz "
        "(https://github.com/visipedia/inat_comp/tree/master/2018) and the Smooth-AP split files "
        "Inat_dataset_splits/ (https://github.com/Andrew-Brown1/Smooth_AP) into root.",
    ),
}

_KAGGLE = "https://www.kaggle.com/api/v1/datasets/download"
_INAT = "https://ml-inat-competition-datasets.s3.amazonaws.com/2018"
_DOWNLOADS: dict[str, list[tuple[str, str]]] = {  # (url, file name) per data set
    "cub": [("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "CUB_200_2011.tgz")],
    "cars": [(f"{_KAGGLE}/jutrera/stanford-car-dataset-by-classes-folder",
              "stanford-car-dataset-by-classes-folder.zip")],
    "sop": [("https://drive.usercontent.google.com/download?id=1TclrpQOF_ullUP99wk_gjGN8pKvtErG8"
             "&export=download&authuser=0&confirm=t", "Stanford_Online_Products.zip")],
    "inat": [
        (f"{_INAT}/train_val2018.tar.gz", "train_val2018.tar.gz"),
        (f"{_INAT}/train2018.json.tar.gz", "train2018.json.tar.gz"),
        (f"{_INAT}/val2018.json.tar.gz", "val2018.json.tar.gz"),
        ("gdrive:1sXfkBTFDrRU3__-NUs1qBP3sf_0uMB98", "Inat_dataset_splits.zip"),
    ],
}

Index = tuple[list[Path], list[int]]  # image paths, original class ids


def _missing(name: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{BENCHMARKS[name].title}: missing {path}. {BENCHMARKS[name].how_to_get}")


def _read_lines(name: str, path: Path) -> list[str]:
    if not path.is_file():
        raise _missing(name, path)
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _bad_line(name: str, path: Path, lineno: int, line: str, expected: str) -> ValueError:
    return ValueError(
        f"{BENCHMARKS[name].title}: {path} line {lineno} is malformed ({line!r}; expected {expected}); "
        f"the file is truncated or corrupt. {BENCHMARKS[name].how_to_get}"
    )


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def cub_index(root: str | os.PathLike, split: str) -> Index:
    """CUB-200-2011: classes 1-100 train, 101-200 test (``images.txt`` + ``image_class_labels.txt``)."""
    _check_split(split)
    base = Path(root) / "CUB_200_2011"
    tables = []
    for fname in ("images.txt", "image_class_labels.txt"):
        path, table = base / fname, {}
        for i, line in enumerate(_read_lines("cub", path), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[0].isdigit():
                raise _bad_line("cub", path, i, line, "'<image id> <value>'")
            if fname == "image_class_labels.txt" and not (parts[1].isdigit() and 1 <= int(parts[1]) <= 200):
                raise _bad_line("cub", path, i, line, "'<image id> <class id 1-200>'")
            table[int(parts[0])] = parts[1]
        tables.append(table)
    images, classes = tables
    if images.keys() != classes.keys():
        raise ValueError(
            f"CUB-200-2011: {base / 'images.txt'} lists {len(images)} images but "
            f"{base / 'image_class_labels.txt'} labels {len(classes)}; one of them is truncated. "
            f"{BENCHMARKS['cub'].how_to_get}"
        )
    lo, hi = (1, 100) if split == "train" else (101, 200)
    paths, ids = [], []
    for image_id in sorted(images):
        c = int(classes[image_id])
        if lo <= c <= hi:
            paths.append(base / "images" / images[image_id])
            ids.append(c)
    return paths, ids


def cars_index(root: str | os.PathLike, split: str) -> Index:
    """Cars-196: classes 1-98 train, 99-196 test (from both original halves).

    Kaggle layout (``names.csv``, ``anno_{train,test}.csv``, ``car_data/car_data/``) if
    ``names.csv`` exists, else the original ``cars_annos.mat`` + ``car_ims/``.
    """
    _check_split(split)
    root = Path(root)
    lo, hi = (1, 98) if split == "train" else (99, 196)
    paths, ids = [], []
    if (root / "names.csv").is_file():
        names = [n.strip() for n in _read_lines("cars", root / "names.csv") if n.strip()]
        for half in ("train", "test"):
            path = root / f"anno_{half}.csv"
            for i, line in enumerate(_read_lines("cars", path), 1):
                if not line.strip():
                    continue
                parts = line.strip().split(",")
                if len(parts) < 2 or not parts[-1].strip().isdigit() or not 1 <= int(parts[-1]) <= len(names):
                    raise _bad_line("cars", path, i, line, f"'<file>,x1,y1,x2,y2,<class 1..{len(names)}>'")
                c = int(parts[-1])
                if lo <= c <= hi:
                    folder = names[c - 1].replace("/", "-")
                    paths.append(root / "car_data" / "car_data" / half / folder / parts[0])
                    ids.append(c)
        return paths, ids
    mat = root / "cars_annos.mat"
    if not mat.is_file():
        raise _missing("cars", root / "names.csv (Kaggle layout) or cars_annos.mat (original layout)")
    from scipy.io import loadmat

    try:
        annos = loadmat(str(mat), squeeze_me=True)["annotations"]
        rows = [(str(a["relative_im_path"]), int(a["class"])) for a in annos.ravel()]
    except Exception as e:  # noqa: BLE001 - scipy raises many kinds of errors on a bad file
        raise ValueError(f"Cars-196: cannot read {mat} ({e}). {BENCHMARKS['cars'].how_to_get}") from e
    for rel, c in rows:
        if lo <= c <= hi:
            paths.append(root / rel)
            ids.append(c)
    return paths, ids


def sop_index(root: str | os.PathLike, split: str) -> Index:
    """Stanford Online Products: ``Ebay_{split}.txt`` (header; class_id = column 1, path = column 3)."""
    _check_split(split)
    base = Path(root) / "Stanford_Online_Products"
    path = base / f"Ebay_{split}.txt"
    paths, ids = [], []
    for i, line in enumerate(_read_lines("sop", path), 1):
        parts = line.split()
        if i == 1 or not parts:
            continue
        if len(parts) != 4 or not parts[1].isdigit():
            raise _bad_line("sop", path, i, line, "'image_id class_id super_class_id path'")
        paths.append(base / parts[3])
        ids.append(int(parts[1]))
    return paths, ids


def inat_index(root: str | os.PathLike, split: str) -> Index:
    """iNaturalist-2018, Smooth-AP split: paths from ``Inaturalist_{split}_set1.txt``, labels: json."""
    _check_split(split)
    root = Path(root)
    split_file = root / "Inat_dataset_splits" / f"Inaturalist_{split}_set1.txt"
    rel_paths = [p.strip() for p in _read_lines("inat", split_file) if p.strip()]
    label_of: dict[str, int] = {}
    for fname in ("train2018.json", "val2018.json"):
        path = root / fname
        if not path.is_file():
            raise _missing("inat", path)
        try:
            with open(path, encoding="utf-8") as f:
                js = json.load(f)
            cat = {a["image_id"]: int(a["category_id"]) for a in js["annotations"]}
            label_of.update({im["file_name"]: cat[im["id"]] for im in js["images"]})
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"iNaturalist-2018: cannot read {path} ({e!r}). {BENCHMARKS['inat'].how_to_get}"
            ) from e
    paths, ids = [], []
    for i, rel in enumerate(rel_paths, 1):
        if rel not in label_of:
            raise ValueError(
                f"iNaturalist-2018: {split_file} line {i} names {rel!r}, which neither train2018.json nor "
                f"val2018.json lists; the files do not belong together. {BENCHMARKS['inat'].how_to_get}"
            )
        paths.append(root / rel)
        ids.append(label_of[rel])
    return paths, ids


INDEXES: dict[str, Callable[[str | os.PathLike, str], Index]] = {
    "cub": cub_index, "cars": cars_index, "sop": sop_index, "inat": inat_index,
}


class ImageListDataset(Dataset):
    """Images listed by path, labels remapped to ``0..C-1`` (in the order of the original class ids).

    ``dataset[i]`` returns ``(transform(PIL RGB image), label)``; an image that cannot be read
    raises ``ValueError`` naming it.  ``class_ids[c]`` is the original id of label ``c``.
    """

    def __init__(self, name: str, paths: list[Path], original_ids: list[int],
                 transform: Optional[Callable[[Image.Image], Any]] = None) -> None:
        self.name = name
        self.paths = list(paths)  # (N,)
        self.class_ids = sorted(set(original_ids))  # (C,) original id of each label
        to_label = {c: i for i, c in enumerate(self.class_ids)}
        self.labels = torch.tensor([to_label[c] for c in original_ids], dtype=torch.int64)  # (N,)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path = self.paths[i]
        if not path.is_file():
            raise _missing(self.name, path)
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")  # decodes the whole file: truncated JPEGs fail here
        except (OSError, SyntaxError, UnidentifiedImageError) as e:
            raise ValueError(
                f"{BENCHMARKS[self.name].title}: cannot read image {path} ({e}); the file is corrupt or "
                f"truncated: replace it. {BENCHMARKS[self.name].how_to_get}"
            ) from e
        return (self.transform(img) if self.transform is not None else img), int(self.labels[i])

    def __repr__(self) -> str:
        return f"ImageListDataset({self.name!r}, {len(self)} images, {self.num_classes} classes)"


def _check_files(name: str, paths: list[Path]) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        raise FileNotFoundError(
            f"{BENCHMARKS[name].title}: {len(missing)} of {len(paths)} listed images are missing, "
            f"e.g. {shown}. "
            f"{BENCHMARKS[name].how_to_get}"
        )


def load_benchmark(
    name: str,
    root: str | os.PathLike,
    split: str = "train",
    transform: Optional[Callable[[Image.Image], Any]] = None,
    *,
    download: bool = False,
    check_files: bool = True,
) -> ImageListDataset:
    """One split of ``"cub"``, ``"cars"``, ``"sop"`` or ``"inat"`` under ``root``.

    ``download=True`` fetches the data first when ``root`` does not hold it yet;
    ``check_files`` checks that every listed image exists (a stat per file).
    """
    if name not in INDEXES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(INDEXES)}")
    if download:
        try:
            INDEXES[name](root, split)
        except (FileNotFoundError, ValueError):
            download_benchmark(name, root)
    paths, ids = INDEXES[name](root, split)
    if not paths:
        raise ValueError(f"{BENCHMARKS[name].title}: the {split} split under {root} is empty. "
                         f"{BENCHMARKS[name].how_to_get}")
    if check_files:
        _check_files(name, paths)
    return ImageListDataset(name, paths, ids, transform)


def verify_benchmark(name: str, root: str | os.PathLike, *, strict: bool = True, check_images: bool = False
           ) -> dict[str, dict[str, int]]:
    """Check a copy: index files parse, every listed image exists, train / test classes are disjoint.

    ``strict``: also compare class and image counts with the full data set (use ``False`` for a
    partial or fabricated copy).  ``check_images``: decode every image (slow).
    Returns ``{"train": {"images": n, "classes": c}, "test": {...}}``; raises on any problem.
    """
    if name not in INDEXES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(INDEXES)}")
    spec, out, class_sets = BENCHMARKS[name], {}, []
    for split in ("train", "test"):
        paths, ids = INDEXES[name](root, split)
        _check_files(name, paths)
        if check_images:
            ds = ImageListDataset(name, paths, ids)
            for i in range(len(ds)):
                ds[i]
        out[split] = {"images": len(paths), "classes": len(set(ids))}
        class_sets.append(set(ids))
        if split == "train":
            want = (spec.train_images, spec.train_classes)
        else:
            want = (spec.test_images, spec.test_classes)
        if strict and (out[split]["images"], out[split]["classes"]) != want:
            raise ValueError(
                f"{spec.title} {split}: found {out[split]['images']} images of "
                f"{out[split]['classes']} classes, "
                f"expected {want[0]} of {want[1]}; the copy under {root} is incomplete "
                f"(strict=False accepts a partial copy). {spec.how_to_get}"
            )
    if class_sets[0] & class_sets[1]:
        raise ValueError(f"{spec.title}: {len(class_sets[0] & class_sets[1])} classes are in both splits")
    return out


def download_benchmark(name: str, root: str | os.PathLike) -> None:
    """Download and extract a benchmark into ``root`` (for Colab; shows tqdm progress), then verify it.

    Hosts are fragile (no checksums; Google Drive may refuse): on failure, follow the manual
    instructions in the error message.
    """
    from torchvision.datasets.utils import download_file_from_google_drive, download_url, extract_archive

    if name not in _DOWNLOADS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(_DOWNLOADS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for url, fname in _DOWNLOADS[name]:
        archive = root / fname
        try:
            if url.startswith("gdrive:"):
                download_file_from_google_drive(url.split(":", 1)[1], str(root), fname)
            else:
                download_url(url, str(root), fname)
            extract_archive(str(archive), str(root), remove_finished=True)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise RuntimeError(f"downloading {url} failed ({e!r}). {BENCHMARKS[name].how_to_get}") from e
    verify_benchmark(name, root, strict=True)


DATASET_NAMES = ("cub", "cars", "sop", "inat", "glyphs", "digits", "mnist")


def get_dataset(name: str, root: Optional[str | os.PathLike], split: str = "train", transform: Any = None,
                download: bool = False, **kwargs: Any) -> Dataset:
    """Any data set of the book by name: ``cub cars sop inat glyphs digits mnist``.

    ``root``: the data directory (for ``glyphs`` the cache directory, ``None`` = default;
    ignored by ``digits``).  Extra keyword arguments go to the loader (e.g. ``size="tiny"``
    for glyphs, ``seed=1``).
    """
    if name in INDEXES:
        if root is None:
            raise ValueError(f"{name} needs root, the directory that holds (or will hold) the data")
        return load_benchmark(name, root, split, transform, download=download, **kwargs)
    if name == "glyphs":
        from tcmlib.data.glyphs import load_glyphs

        return load_glyphs(split, cache_dir=root, transform=transform, **kwargs)
    if name == "digits":
        from tcmlib.data.digits import load_digits_split

        return load_digits_split(split, transform=transform, **kwargs)
    if name == "mnist":
        from tcmlib.data.digits import load_mnist

        if root is None:
            raise ValueError("mnist needs root, the directory that holds (or will hold) MNIST/raw")
        return load_mnist(root, split, download=download, transform=transform, **kwargs)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
