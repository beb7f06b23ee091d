"""The glyph benchmark: determinism, disjoint classes, caching, look-alikes, Computer Modern by glyph name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcmlib.data.glyphs import (
    GLYPH_PRESETS,
    GlyphPreset,
    font_charmap,
    generate_glyphs,
    glyph_table,
    load_glyphs,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("glyph_cache")


@pytest.fixture(scope="module")
def tiny(cache):
    return load_glyphs("train", "tiny", cache_dir=cache), load_glyphs("test", "tiny", cache_dir=cache)


def test_shapes_and_types(tiny):
    train, test = tiny
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8 and ds.images.ndim == 3 and ds.images.shape[1:] == (32, 32)
        assert ds.labels.dtype == torch.int64 and ds.labels.shape == (len(ds),)
        assert ds.num_classes == 40 and set(ds.labels.tolist()) == set(range(40))
        assert len(ds.fonts) == len(ds) and len(ds.chars) == len(ds.class_names) == 40
        x, y = ds[0]
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
        # every image has ink, and 2 instances per font for each class
        assert int(ds.images.flatten(1).amax(1).min()) > 0
        counts = np.bincount(ds.labels.numpy())
        assert counts.min() >= 2 * GLYPH_PRESETS["tiny"].min_fonts and counts.max() <= 2 * 5


def test_train_test_classes_disjoint(tiny):
    train, test = tiny
    assert not set(train.chars) & set(test.chars)
    assert train.chars == sorted(train.chars)


def test_cache_hit_and_determinism(tiny, cache, tmp_path):
    train, _ = tiny
    again = load_glyphs("train", "tiny", cache_dir=cache)
    assert again.cache_path == train.cache_path and train.cache_path.exists()
    assert not list(cache.glob("*.tmp.npz"))  # atomic write leaves no temporaries
    fresh = generate_glyphs("tiny", seed=0)  # regenerate from scratch: same arrays
    assert np.array_equal(fresh["train_images"], train.images.numpy())
    assert list(fresh["train_chars"]) == train.chars
    other = load_glyphs("train", "tiny", seed=1, cache_dir=tmp_path)
    assert other.cache_path != train.cache_path and other.chars != train.chars


def test_lookalikes_dropped(tiny):
    train, test = tiny
    dropped = train.dropped_lookalikes
    # Greek capital Alpha and Cyrillic capital A are pixel-identical to Latin A in DejaVu Sans
    assert dropped["\u0391"] == "A" and dropped["\u0410"] == "A"
    assert dropped["\u039a"] == "K"
    classes = set(train.chars) | set(test.chars)
    assert not classes & set(dropped)
    # no two kept classes share an unaugmented picture: checked on the catalogue itself
    from tcmlib.data.glyphs import _catalogue

    kept, dropped2 = _catalogue(GLYPH_PRESETS["tiny"])
    assert dropped2 == dropped and classes <= set(kept)
    assert all(ord(v) < ord(k) for k, v in dropped.items())


def test_computer_modern_by_glyph_name():
    cmmi = font_charmap("cmmi10")
    assert cmmi["\u03c9"] == "!"  # omega sits at the code of '!'
    assert "!" not in cmmi
    cmex = font_charmap("cmex10")
    assert "A" not in cmex  # cmex10's 'A' is a parenthesis piece
    cmr = font_charmap("cmr10")
    assert cmr["A"] == "A" and cmr["\u0393"] == "\xa1"  # Gamma: glyph name "Gamma" at code 0xA1
    assert all(len(k) == 1 for k in cmr)


@pytest.mark.parametrize("font,ref,chars", [
    ("cmr10", "DejaVuSerif", "\u0393\u0394\u03a9\u03a6AL"),
    ("cmmi10", "DejaVuSerif-Italic", "\u03c9\u03b1\u03b2\u0393\u03a6"),
])
def test_cm_glyphs_look_like_their_class(font, ref, chars):
    """A cm* glyph found by its name is, at 8x8, nearest to the same character in a Unicode font."""
    from PIL import Image

    from tcmlib.data.glyphs import _render_base, open_font

    def pic(f, ch):
        a = _render_base(open_font(f, 40), font_charmap(f)[ch], 64)
        v = np.asarray(Image.fromarray(a).resize((8, 8), Image.BOX)).astype(float).ravel()
        v -= v.mean()
        return v / np.linalg.norm(v)

    pool = "\u0393\u0394\u039b\u03a9\u03a3\u03a0\u03a6\u03c9\u03b1\u03b2!AL"
    refs = {ch: pic(ref, ch) for ch in pool}
    for ch in chars:
        v = pic(font, ch)
        assert max(refs, key=lambda r: float(refs[r] @ v)) == ch, (font, ch)


def test_custom_preset_and_errors(tmp_path):
    preset = GlyphPreset(5, 5, ("DejaVuSans", "DejaVuSerif"), 1, 2, 0x80)
    ds = load_glyphs("test", preset, image_size=16, cache_dir=tmp_path)
    assert ds.images.shape[1:] == (16, 16) and ds.num_classes == 5
    with pytest.raises(ValueError, match="usable characters"):
        generate_glyphs(GlyphPreset(500, 500, ("DejaVuSans",), 1, 1, 0x80))
    with pytest.raises(ValueError, match="split"):
        load_glyphs("val", "tiny", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="tiny"):
        load_glyphs("train", "huge", cache_dir=tmp_path)


def test_glyph_table(tiny):
    import matplotlib

    matplotlib.use("Agg")
    fig = glyph_table(tiny[0], n_classes=3, n_per_class=4)
    assert len(fig.axes) == 12
