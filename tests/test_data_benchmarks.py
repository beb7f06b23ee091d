"""CUB / Cars / SOP / iNat loaders on tiny fabricated copies in the exact on-disk layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tcmlib.data.benchmarks import DATASET_NAMES, get_dataset, load_benchmark, verify_benchmark
from tcmlib.data.transforms import test_transform as photo_test_transform


def jpeg(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value % 256, 40, 90)).save(path, "JPEG")


def make_cub(root: Path) -> None:
    """200 classes x 2 images: CUB_200_2011/{images.txt, image_class_labels.txt, images/<class>/<file>}."""
    base = root / "CUB_200_2011"
    images, classes = [], []
    for i in range(1, 401):
        c = (i - 1) // 2 + 1
        rel = f"{c:03d}.Bird_{c}/Bird_{c}_{i:04d}.jpg"
        jpeg(base / "images" / rel, c)
        images.append(f"{i} {rel}")
        classes.append(f"{i} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(classes) + "\n")


def cars_name(c: int) -> str:
    return "Ram C/V Cargo Van Minivan 2012" if c == 120 else f"Car Model {c} 2012"


def make_cars_kaggle(root: Path) -> None:
    """196 classes, one image in each original half: names.csv, anno_{train,test}.csv, car_data/..."""
    (root / "names.csv").write_text("\n".join(cars_name(c) for c in range(1, 197)) + "\n")
    for half in ("train", "test"):
        rows = []
        for c in range(1, 197):
            fname = f"{c:05d}.jpg"
            jpeg(root / "car_data" / "car_data" / half / cars_name(c).replace("/", "-") / fname, c)
            rows.append(f"{fname},1,2,10,9,{c}")
        (root / f"anno_{half}.csv").write_text("\n".join(rows) + "\n")


def make_cars_mat(root: Path) -> None:
    """196 classes x 2 images in the original layout: cars_annos.mat + car_ims/."""
    from scipy.io import savemat

    n = 392
    annos = np.zeros(n, dtype=[("relative_im_path", "O"), ("bbox_x1", "O"), ("class", "O"), ("test", "O")])
    for i in range(n):
        rel = f"car_ims/{i + 1:06d}.jpg"
        jpeg(root / rel, i)
        annos[i] = (rel, 1, i // 2 + 1, i % 2)
    names = np.array([cars_name(c) for c in range(1, 197)], "O")
    savemat(str(root / "cars_annos.mat"), {"annotations": annos[None, :], "class_names": names})


def make_sop(root: Path) -> None:
    """Ebay_{train,test}.txt: classes 1-5 train, 6-10 test, 3 images each (class ids sparse-free)."""
    base = root / "Stanford_Online_Products"
    image_id = 0
    for split, classes in (("train", range(1, 6)), ("test", range(6, 11))):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for k in range(3):
                image_id += 1
                rel = f"bicycle_final/{c}_{k}.JPG"
                jpeg(base / rel, c)
                lines.append(f"{image_id} {c} 1 {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")


def make_inat(root: Path) -> None:
    """Category ids 7, 3, 11 train and 20, 5 test; 2 images each, split between the two jsons."""
    cats = {"train": [7, 3, 11], "test": [20, 5]}
    js = {name: {"images": [], "annotations": []} for name in ("train2018.json", "val2018.json")}
    split_dir = root / "Inat_dataset_splits"
    split_dir.mkdir(parents=True)
    image_id = 0
    for split, cs in cats.items():
        paths = []
        for c in cs:
            for k in range(2):
                image_id += 1
                rel = f"train_val2018/Plantae/{c}/img_{image_id}.jpg"
                jpeg(root / rel, c)
                which = "train2018.json" if k == 0 else "val2018.json"
                js[which]["images"].append({"id": image_id, "file_name": rel})
                js[which]["annotations"].append({"image_id": image_id, "category_id": c})
                paths.append(rel)
        (split_dir / f"Inaturalist_{split}_set1.txt").write_text("\n".join(paths) + "\n")
    for name, content in js.items():
        (root / name).write_text(json.dumps(content))


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    out = {}
    for name, make in (("cub", make_cub), ("cars", make_cars_kaggle), ("cars_mat", make_cars_mat),
                       ("sop", make_sop), ("inat", make_inat)):
        out[name] = tmp_path_factory.mktemp(name)
        make(out[name])
    return out


def test_cub_split_and_labels(roots):
    train = load_benchmark("cub", roots["cub"], "train")
    test = load_benchmark("cub", roots["cub"], "test")
    assert len(train) == len(test) == 200
    assert train.class_ids == list(range(1, 101)) and test.class_ids == list(range(101, 201))
    assert train.labels.tolist() == [i // 2 for i in range(200)]
    assert test.labels.tolist() == [i // 2 for i in range(200)]  # 101..200 -> 0..99
    img, y = test[3]
    assert isinstance(img, Image.Image) and y == 1
    assert "101.Bird_101" in str(test.paths[0])


@pytest.mark.parametrize("key", ["cars", "cars_mat"])
def test_cars_both_layouts(roots, key):
    train = load_benchmark("cars", roots[key], "train")
    test = load_benchmark("cars", roots[key], "test")
    assert len(train) == len(test) == 196  # 98 classes x 2 images (one from each original half)
    assert train.class_ids == list(range(1, 99)) and test.class_ids == list(range(99, 197))
    assert sorted(set(test.labels.tolist())) == list(range(98))
    if key == "cars":  # "/" in a class name becomes "-" in the folder name
        assert any("Ram C-V Cargo Van" in str(p) for p in test.paths)
    assert verify_benchmark("cars", roots[key], strict=False) == {
        "train": {"images": 196, "classes": 98}, "test": {"images": 196, "classes": 98}}


def test_sop_and_inat(roots):
    sop = load_benchmark("sop", roots["sop"], "test")
    assert len(sop) == 15 and sop.class_ids == list(range(6, 11))
    assert sop.labels.tolist() == [i // 3 for i in range(15)]
    inat_train = load_benchmark("inat", roots["inat"], "train")
    inat_test = load_benchmark("inat", roots["inat"], "test")
    assert inat_train.class_ids == [3, 7, 11] and inat_test.class_ids == [5, 20]
    assert inat_train.labels.tolist() == [1, 1, 0, 0, 2, 2]  # 7 -> 1, 3 -> 0, 11 -> 2
    assert inat_test.labels.tolist() == [1, 1, 0, 0]


def test_transform_applied(roots):
    ds = load_benchmark("cub", roots["cub"], "train", photo_test_transform(size=32, resize=36))
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_verify_strict_counts(roots):
    assert verify_benchmark("cub", roots["cub"], strict=False)["test"] == {"images": 200, "classes": 100}
    with pytest.raises(ValueError, match="expected 5864"):
        verify_benchmark("cub", roots["cub"], strict=True)


def test_missing_image_is_named(roots, tmp_path):
    make_sop(tmp_path)
    victim = tmp_path / "Stanford_Online_Products" / "bicycle_final" / "7_1.JPG"
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="7_1.JPG") as e:
        load_benchmark("sop", tmp_path, "test")
    assert "download_benchmark('sop'" in str(e.value)
    load_benchmark("sop", tmp_path, "train")  # the other split is complete


def test_missing_index_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="image_class_labels.txt|images.txt") as e:
        load_benchmark("cub", tmp_path, "train")
    assert "CUB_200_2011.tgz" in str(e.value)
    with pytest.raises(FileNotFoundError, match="cars_annos.mat"):
        load_benchmark("cars", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="Inaturalist_train_set1.txt"):
        load_benchmark("inat", tmp_path, "train")


def test_truncated_index_file(tmp_path):
    make_cub(tmp_path)
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    text = labels.read_text()
    labels.write_text(text[: len(text) // 2])  # cut mid-file (a half-written download)
    with pytest.raises(ValueError, match="image_class_labels.txt"):
        load_benchmark("cub", tmp_path, "train")
    labels.write_text(text[: len(text) // 2].rsplit("\n", 1)[0] + "\n")  # cut at a line end
    with pytest.raises(ValueError, match="truncated"):
        load_benchmark("cub", tmp_path, "test")


def test_corrupt_jpeg_is_named(tmp_path):
    make_sop(tmp_path)
    bad = tmp_path / "Stanford_Online_Products" / "bicycle_final" / "2_0.JPG"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    ds = load_benchmark("sop", tmp_path, "train")
    with pytest.raises(ValueError, match="2_0.JPG"):
        ds[3]
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="corrupt"):
        ds[3]
    with pytest.raises(ValueError, match="2_0.JPG"):
        verify_benchmark("sop", tmp_path, strict=False, check_images=True)


def test_registry(roots, tmp_path):
    assert len(get_dataset("cub", roots["cub"], "test")) == 200
    assert get_dataset("digits", None, "train").num_classes == 10
    glyphs = get_dataset("glyphs", tmp_path, "test", size="tiny")
    assert glyphs.num_classes == 40
    with pytest.raises(ValueError) as e:
        get_dataset("imagenet", tmp_path)
    assert all(n in str(e.value) for n in DATASET_NAMES)
    with pytest.raises(ValueError, match="split"):
        get_dataset("cub", roots["cub"], "val")


def test_uint8_photo_batches_normalised_on_the_device_equal_the_float_transforms() -> None:
    """train/test_transform(uint8=True) + DeviceNormalize on the batch = the float32 transforms, bit for bit."""
    import numpy as np
    import torch
    from PIL import Image

    from tcmlib.data.transforms import DeviceNormalize, test_transform, train_transform

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (60 + 7 * i, 80, 3), dtype=np.uint8)) for i in range(4)]
    for make in (lambda u: train_transform(32, uint8=u), lambda u: test_transform(32, 40, uint8=u)):
        torch.manual_seed(0)
        want = torch.stack([make(False)(im) for im in images])  # (4, 3, 32, 32) float32
        torch.manual_seed(0)
        raw = torch.stack([make(True)(im) for im in images])  # the same random crops, uint8
        assert raw.dtype == torch.uint8 and raw.element_size() * 4 == want.element_size()
        assert torch.equal(DeviceNormalize()(raw), want)
    assert DeviceNormalize()(want) is want  # a float batch passes through
