"""Glyphs: our offline open-world benchmark, made from the fonts that ship with matplotlib.

Each class is one Unicode character; each image is that character drawn in one of the fonts
with a random augmentation.  Train and test classes are disjoint, so, as on CUB or SOP, the
model is tested on characters it never saw.  Some characters are easy (``W`` looks alike in
every font), some hard (thin symbols, accents, glyphs whose fonts disagree): class-dependent
difficulty, and hence inconsistent thresholds, arise without any help.

How it is made (every step is deterministic from ``seed``):

1. Fonts: the 24 usable TrueType fonts in ``matplotlib/mpl-data/fonts/ttf``: 12 DejaVu
   (Sans, Serif, Sans Mono, 4 styles each), 4 STIXGeneral, 8 Computer Modern (``cm*``).
   Left out: LastResort (a box for everything), ``*Display``, ``STIXSiz*`` and ``STIXNonUni*``.
2. Computer Modern: the ``cm*`` files use TeX encodings behind a Unicode-looking cmap
   (``cmex10`` maps ``A`` to a parenthesis piece, ``cmmi10`` maps ``!`` to omega).  We do not
   trust their cmaps: each code's *glyph name* is turned into its character with
   ``fontTools.agl`` (``omega`` -> ``ω``), and names that give no character or a private-use
   one are skipped.  So ``cmmi10`` draws ``ω`` from its code ``!``, and adds nothing to ``!``.
3. Characters: every character some font maps, except spaces, controls, private use,
   unassigned and combining marks; it must render non-empty (ink) in at least ``min_fonts``
   fonts.  Glyphs are centred on their ink box and keep their natural size (``.`` is small,
   ``W`` large); glyphs wider or taller than 80 % of the canvas are shrunk to fit.
4. Look-alikes: characters that are the same picture in some font (``I`` / Greek ``Ι``,
   ``K`` / Cyrillic ``К``, ``,`` / ``‚``, ``-`` / ``‐``) would be two classes a model cannot tell
   apart.  We render every character in every font at 32x32 without augmentation and
   quantise to 16 grey levels; going through the characters in code-point order, one whose
   picture equals, in some font, the picture of a character already kept is dropped
   (``Ι``, ``К``, ``‚`` and ``‐`` go; ``I``, ``K``, ``,`` and ``-`` stay).  So no two classes
   share a picture in any font.  The dropped ones are listed in
   ``GlyphDataset.dropped_lookalikes`` as ``{dropped: kept look-alike}``.  (This is done at
   32x32 whatever ``image_size`` is, so the classes do not depend on the image size.)
5. Split: the kept characters are permuted with ``seed``; the first ``n_train`` are the train
   classes, the next ``n_test`` the test classes.
6. Images: for each class, each font that draws it, ``instances_per_font`` augmented copies:
   rotation +-10 deg, scale 0.8-1.1, shift +-2 px, strokes thickened by 1 px half of the
   time; drawn white on black at twice the size and averaged down to ``image_size``.

The arrays are cached as a compressed ``.npz`` in ``$TCMLIB_CACHE`` (default
``~/.cache/tcmlib``); the key holds every generation parameter, the format version and the
matplotlib / Pillow versions (fonts and rasteriser), so a second load takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from tcmlib.data.arrays import ImageArrayDataset, Transform

__all__ = [
    "GLYPH_PRESETS",
    "GlyphPreset",
    "GlyphDataset",
    "load_glyphs",
    "generate_glyphs",
    "glyph_table",
    "font_charmap",
    "default_cache_dir",
    "ALL_FONTS",
]

FORMAT_VERSION = 2  # bump whenever the generated arrays change
REFERENCE_SIZE = 32  # look-alikes are detected at this resolution, whatever image_size is

DEJAVU_FONTS = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
)
STIX_FONTS = ("STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta")
CM_FONTS = ("cmr10", "cmb10", "cmti10", "cmss10", "cmtt10", "cmmi10", "cmsy10", "cmex10")
ALL_FONTS = DEJAVU_FONTS + STIX_FONTS + CM_FONTS


@dataclass(frozen=True)
class GlyphPreset:
    """The size of a glyph data set."""

    n_train: int  # train classes
    n_test: int  # test classes (disjoint from the train classes)
    fonts: tuple[str, ...]  # font file stems, see ALL_FONTS
    instances_per_font: int  # augmented images per (character, font)
    min_fonts: int  # a character needs ink in at least this many fonts
    max_codepoint: int  # only characters below this code point are candidates


GLYPH_PRESETS: dict[str, GlyphPreset] = {
    # tests and smoke runs: Latin / Greek / Cyrillic only, 5 fonts, ~1 s
    "tiny": GlyphPreset(40, 40, ("DejaVuSans", "DejaVuSerif-Italic", "DejaVuSansMono-Bold", "STIXGeneral",
                                 "cmr10"), 2, 4, 0x0500),
    "small": GlyphPreset(300, 300, ALL_FONTS, 2, 5, 0x110000),
    "default": GlyphPreset(1000, 1000, ALL_FONTS, 2, 5, 0x110000),
    # small's 300 train classes (the same characters: same catalogue, same permutation) and 1,000 test classes,
    # so that OPIS, a spread over test classes, is measured on three times as many classes at the same training cost
    "small_wide": GlyphPreset(300, 1000, ALL_FONTS, 2, 5, 0x110000),
}


def font_path(font: str) -> Path:
    """The ``.ttf`` file of a matplotlib-shipped font, e.g. ``font_path("DejaVuSans")``."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{font}.ttf"


def open_font(font: str, size: int) -> ImageFont.FreeTypeFont:
    """A matplotlib font at ``size`` px, with Pillow's basic layout (the same with or without libraqm)."""
    return ImageFont.truetype(str(font_path(font)), size, layout_engine=ImageFont.Layout.BASIC)


def _is_candidate(ch: str) -> bool:
    """Printable, non-combining, assigned, not private use."""
    cat = unicodedata.category(ch)
    return cat[0] not in "ZCM"  # Z: separators, C: controls / format / private / unassigned, M: marks


# The AGL maps the glyph names "Delta" and "Omega" to the increment and ohm signs; in TeX fonts
# they are the Greek capitals.
_AGL_GREEK = {"\u2206": "\u0394", "\u2126": "\u03a9"}


def font_charmap(font: str) -> dict[str, str]:
    """Map each character the font draws to the character code to ask the font for.

    For Unicode fonts this is the identity on the cmap.  For the TeX-encoded ``cm*`` fonts the
    character is read from each glyph's name with ``fontTools.agl`` (``cmmi10``:
    ``{"ω": "!", ...}``); codes whose glyph name gives no character (or a private-use one)
    are left out.
    """
    from fontTools import agl
    from fontTools.ttLib import TTFont

    with TTFont(str(font_path(font)), lazy=True) as tt:
        cmap = tt.getBestCmap()
    if not font.startswith("cm"):
        return {chr(c): chr(c) for c in sorted(cmap)}
    out: dict[str, str] = {}
    for code in sorted(cmap):
        ch = agl.toUnicode(cmap[code])
        ch = _AGL_GREEK.get(ch, ch)
        if len(ch) == 1 and unicodedata.category(ch) != "Co" and ch not in out:
            out[ch] = chr(code)
    return out


def _render_base(font: ImageFont.FreeTypeFont, code: str, canvas: int) -> Optional[np.ndarray]:
    """Draw one glyph white on black, centred on its ink box, in a ``canvas x canvas`` uint8 array.

    Returns ``None`` when the glyph has no ink.
    """
    left, top, right, bottom = font.getbbox(code)
    if right <= left or bottom <= top:
        return None
    im = Image.new("L", (int(right - left) + 2, int(bottom - top) + 2))
    ImageDraw.Draw(im).text((1 - left, 1 - top), code, font=font, fill=255)
    box = im.getbbox()
    if box is None:
        return None
    im = im.crop(box)
    w, h = im.size
    limit = int(0.8 * canvas)
    if max(w, h) > limit:  # too big: shrink to fit, keep the aspect ratio
        f = limit / max(w, h)
        w, h = max(1, round(w * f)), max(1, round(h * f))
        im = im.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new("L", (canvas, canvas))
    out.paste(im, ((canvas - w) // 2, (canvas - h) // 2))
    return np.asarray(out)


def _augment(base: np.ndarray, rng: np.random.Generator, out_size: int) -> np.ndarray:
    """Rotate +-10 deg, scale 0.8-1.1, shift +-2 output px, thicken strokes by 0 or 1 px; downsample 2x."""
    s = base.shape[0]  # = 2 * out_size
    angle = np.deg2rad(rng.uniform(-10.0, 10.0))
    scale = rng.uniform(0.8, 1.1)
    tx, ty = rng.uniform(-2.0, 2.0, size=2) * (s / out_size)
    thick = bool(rng.integers(0, 2))  # strokes 1 output pixel wider, half of the time
    im = Image.fromarray(base)
    if thick:
        im = im.filter(ImageFilter.MaxFilter(3))  # +1 px each side at twice the size
    # PIL wants the inverse map: input = c + R(-angle) (output - c - t) / scale
    c = s / 2.0
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    a, b, d, e = cos, sin, -sin, cos
    ox, oy = c + tx, c + ty
    im = im.transform((s, s), Image.Transform.AFFINE, (a, b, c - a * ox - b * oy, d, e, c - d * ox - e * oy),
                      resample=Image.Resampling.BILINEAR)
    return np.asarray(im.resize((out_size, out_size), Image.Resampling.BOX))


def _font_size(canvas: int) -> int:
    return int(round(0.625 * canvas))  # capital letters ~ 45 % of the canvas height


def _catalogue(preset: GlyphPreset) -> tuple[list[str], dict[str, str]]:
    """Characters usable as classes (sorted by code point) and the dropped look-alikes {dropped: kept}."""
    canvas = 2 * REFERENCE_SIZE
    maps = {f: font_charmap(f) for f in preset.fonts}
    cands = sorted({ch for m in maps.values() for ch in m if ord(ch) < preset.max_codepoint})
    cands = [ch for ch in cands if _is_candidate(ch)]
    pictures: dict[str, list[tuple[int, bytes]]] = {ch: [] for ch in cands}  # (font, digest of 32x32 picture)
    for fi, f in enumerate(preset.fonts):
        font = open_font(f, _font_size(canvas))
        for ch in cands:
            if ch not in maps[f]:
                continue
            base = _render_base(font, maps[f][ch], canvas)
            if base is None:
                continue
            small = np.asarray(Image.fromarray(base).resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.Resampling.BOX))
            pictures[ch].append((fi, hashlib.blake2b((small >> 4).tobytes(), digest_size=16).digest()))
    # In code-point order: a character whose picture equals, in some font, that of an already kept
    # character is dropped; otherwise it is kept and claims its pictures.  (Not transitive: a font
    # that draws "Ῐ" without its breve drops "Ῐ" as a look-alike of "I", but not "Ĭ" along with it.)
    owner: dict[tuple[int, bytes], str] = {}
    kept: list[str] = []
    dropped: dict[str, str] = {}
    for ch in cands:
        if len(pictures[ch]) < preset.min_fonts:
            continue
        twin = next((owner[p] for p in pictures[ch] if p in owner), None)
        if twin is not None:
            dropped[ch] = twin
            continue
        kept.append(ch)
        owner.update({p: ch for p in pictures[ch]})
    return kept, dropped


def _render_split(chars: Sequence[str], preset: GlyphPreset, seed: int, image_size: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images uint8 (N, H, W), labels int64 (N,) and font indices int16 (N,) for the given classes."""
    canvas = 2 * image_size
    images, labels, font_ids = [], [], []
    fonts = [(i, f, open_font(f, _font_size(canvas)), font_charmap(f))
             for i, f in enumerate(preset.fonts)]
    for label, ch in enumerate(chars):
        for fi, _, font, cmap in fonts:
            if ch not in cmap:
                continue
            base = _render_base(font, cmap[ch], canvas)
            if base is None:
                continue
            for k in range(preset.instances_per_font):
                rng = np.random.default_rng([seed, ord(ch), fi, k])  # independent of order
                images.append(_augment(base, rng, image_size))
                labels.append(label)
                font_ids.append(fi)
    return (np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int64),
            np.asarray(font_ids, dtype=np.int16))


def generate_glyphs(size: str | GlyphPreset = "default", *, seed: int = 0, image_size: int = 32
                    ) -> dict[str, np.ndarray]:
    """Generate both splits (no cache): a dict of arrays, as stored in the cache file."""
    preset = GLYPH_PRESETS[size] if isinstance(size, str) else size
    kept, dropped = _catalogue(preset)
    need = preset.n_train + preset.n_test
    if len(kept) < need:
        raise ValueError(
            f"only {len(kept)} usable characters for {preset.n_train} + {preset.n_test} classes; "
            "lower n_train / n_test or min_fonts, or raise max_codepoint"
        )
    perm = np.random.default_rng(seed).permutation(len(kept))
    train = sorted(kept[i] for i in perm[: preset.n_train])
    test = sorted(kept[i] for i in perm[preset.n_train: need])
    out: dict[str, np.ndarray] = {
        "fonts": np.asarray(preset.fonts),
        "dropped": np.asarray(list(dropped), dtype="<U1"),
        "dropped_to": np.asarray(list(dropped.values()), dtype="<U1"),
    }
    for name, chars in (("train", train), ("test", test)):
        images, labels, font_ids = _render_split(chars, preset, seed, image_size)
        out[f"{name}_chars"] = np.asarray(chars, dtype="<U1")
        out[f"{name}_images"], out[f"{name}_labels"], out[f"{name}_font_ids"] = images, labels, font_ids
    return out


def default_cache_dir() -> Path:
    """``$TCMLIB_CACHE`` if set, else ``~/.cache/tcmlib``."""
    return Path(os.environ.get("TCMLIB_CACHE") or Path.home() / ".cache" / "tcmlib")


def cache_file(size: str | GlyphPreset, seed: int, image_size: int,
               cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where :func:`load_glyphs` caches a data set: the name hashes every generation parameter."""
    import matplotlib
    import PIL

    preset = GLYPH_PRESETS[size] if isinstance(size, str) else size
    key = json.dumps({"format": FORMAT_VERSION, "preset": asdict(preset), "seed": seed,
                      "image_size": image_size,
                      "matplotlib": matplotlib.__version__, "pillow": PIL.__version__}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    name = size if isinstance(size, str) else "custom"
    return Path(cache_dir or default_cache_dir()) / f"glyphs-{name}-{image_size}px-seed{seed}-{digest}.npz"


class GlyphDataset(ImageArrayDataset):
    """One split of the glyph data set (see the module docstring).

    Attributes: ``images`` uint8 ``(N, H, W)``, ``labels`` int64 ``(N,)`` in ``0..C-1``,
    ``chars`` (C,) the character of each class, ``class_names`` (C,) like ``"U+0041 A"``,
    ``fonts`` (N,) the font of each image, ``dropped_lookalikes`` ``{dropped: kept}`` over
    both splits, ``cache_path``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, chars: list[str], fonts: list[str],
                 dropped_lookalikes: dict[str, str], transform: Optional[Transform] = None,
                 cache_path: Optional[Path] = None) -> None:
        names = [f"U+{ord(ch):04X} {ch}" for ch in chars]
        super().__init__(images, labels, names, transform)
        self.chars = list(chars)
        self.fonts = list(fonts)
        self.dropped_lookalikes = dict(dropped_lookalikes)
        self.cache_path = cache_path


def load_glyphs(
    split: str = "train",
    size: str | GlyphPreset = "default",
    *,
    seed: int = 0,
    image_size: int = 32,
    cache_dir: Optional[str | os.PathLike] = None,
    transform: Optional[Transform] = None,
) -> GlyphDataset:
    """Load (generating and caching on first use) one split of the glyph benchmark.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint classes).
        size: ``"tiny"`` (40 + 40 classes, ~1 s), ``"small"`` (300 + 300), ``"default"``
            (1,000 + 1,000 classes, 2 images per font), or a :class:`GlyphPreset`.
        seed: fixes the class split and every augmentation.
        image_size: side of the square images (rendered at twice this size, then averaged down).
        cache_dir: where the ``.npz`` goes; default ``$TCMLIB_CACHE`` or ``~/.cache/tcmlib``.
        transform: applied to the ``[0, 1]`` float tensor ``(1, H, W)``; default ``(x - 0.5) / 0.5``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(size, str) and size not in GLYPH_PRESETS:
        raise ValueError(f"unknown glyph size {size!r}; use one of {sorted(GLYPH_PRESETS)} or a GlyphPreset")
    path = cache_file(size, seed, image_size, cache_dir)
    if path.exists():
        try:
            return _read_cache(path, split, transform)
        except Exception as e:  # truncated / garbage / missing arrays: regenerate
            warnings.warn(f"glyph cache {path} is corrupt ({type(e).__name__}: {e}); regenerating it")
            path.unlink(missing_ok=True)
    _write_cache(path, generate_glyphs(size, seed=seed, image_size=image_size))
    return _read_cache(path, split, transform)


def _write_cache(path: Path, arrays: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub mistypes **kwds
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: readers see the old state or the whole file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_cache(path: Path, split: str, transform: Optional[Transform]) -> GlyphDataset:
    with np.load(path) as z:
        fonts = [str(f) for f in z["fonts"]]
        font_ids = z[f"{split}_font_ids"]
        return GlyphDataset(
            images=torch.from_numpy(z[f"{split}_images"]),
            labels=torch.from_numpy(z[f"{split}_labels"]),
            chars=[str(c) for c in z[f"{split}_chars"]],
            fonts=[fonts[i] for i in font_ids],
            dropped_lookalikes=dict(zip((str(c) for c in z["dropped"]), (str(c) for c in z["dropped_to"]))),
            transform=transform,
            cache_path=path,
        )


def glyph_table(dataset: ImageArrayDataset, n_classes: int = 8, n_per_class: int = 10, *, seed: int = 0):
    """A matplotlib figure: ``n_classes`` random classes (rows) x ``n_per_class`` of their images."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    labels = dataset.labels.numpy()
    n_classes = min(n_classes, dataset.num_classes)
    classes = np.sort(rng.choice(dataset.num_classes, size=n_classes, replace=False))
    fig, axes = plt.subplots(len(classes), n_per_class, figsize=(0.8 * n_per_class, 0.8 * len(classes)),
                             squeeze=False)
    for row, c in zip(axes, classes):
        idx = np.flatnonzero(labels == c)
        idx = np.sort(rng.choice(idx, size=min(n_per_class, len(idx)), replace=False))
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(idx):
                ax.imshow(dataset.images[idx[j]].numpy(), cmap="gray", vmin=0, vmax=255)
        code = dataset.class_names[c].split(" ")[0]  # "U+0041"
        row[0].set_ylabel(code, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.2)
    return fig
