"""Decoding awkward and broken files: correct pixels for the first, a recorded reason for the second."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from embedder.cache.reader import FeatureCache
from embedder.data.decode import load_rgb
from embedder.errors import BadImageError
from embedder.extract.local import embed
from tests.conftest import fast_config
from tests.corpus import BAD, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


def test_every_good_file_decodes_to_rgb_uint8(corpus):
    root, expected = corpus
    for name, outcome in expected.items():
        if outcome != "ok":
            continue
        t = load_rgb(root / name)
        assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3, name


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_file_raises_with_a_reason(corpus, name):
    root, _ = corpus
    with pytest.raises(BadImageError) as err:
        load_rgb(root / name)
    assert BAD[name] in err.value.reason
    assert err.value.reason


def test_missing_file_is_a_bad_image_not_a_crash(tmp_path):
    with pytest.raises(BadImageError, match="file not found"):
        load_rgb(tmp_path / "nope.jpg")


def test_small_pixel_limit_refuses_before_decoding(corpus):
    root, _ = corpus
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_rgb(root / "plain.jpg", max_pixels=100)


def test_exif_orientation_is_applied(corpus):
    root, _ = corpus
    stored = Image.open(root / "exif_rotated.jpg").size
    assert stored == (64, 48)
    assert tuple(load_rgb(root / "exif_rotated.jpg").shape) == (3, 64, 48)  # shown rotated: 48 wide, 64 high


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    wide = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    assert load_rgb(tmp_path / "g16.png")[0, 0].tolist() == [0, 128, 255, 4]


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent black
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    px = load_rgb(tmp_path / "a.png")[:, 0].T.tolist()
    assert px[0] == [255, 0, 0]
    assert px[1] == [255, 255, 255]
    assert all(126 <= v <= 128 for v in px[2])


def test_cmyk_is_converted_to_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=100)
    r, g, b = load_rgb(tmp_path / "cyan.jpg")[:, 4, 4].tolist()
    assert r < 30 and g > 225 and b > 225


def test_corpus_run_records_every_bad_file_and_embeds_every_good_one(corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "corpus.h5"
    report = embed(fast_config(root, out))
    good = sorted(n for n, o in expected.items() if o == "ok")
    with FeatureCache(out) as cache:
        assert sorted(cache.paths) == good
        errors = dict(cache.errors)
        assert np.isfinite(cache.features()).all()
    assert sorted(errors) == sorted(BAD)
    for name, fragment in BAD.items():
        assert fragment in errors[name], (name, errors[name])
    assert report.embedded == len(good) and len(report.errors) == len(BAD)


def test_extreme_aspect_ratio_is_recorded_not_allocated(tmp_path):
    Image.new("RGB", (60000, 1), (10, 20, 30)).save(tmp_path / "banner.png")
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "fine.png")
    out = tmp_path / "c.h5"
    embed(fast_config(tmp_path, out, max_pixels=10_000_000, layout="flat"))
    with FeatureCache(out) as cache:
        assert cache.paths == ["fine.png"]
        assert "extreme aspect ratio" in dict(cache.errors)["banner.png"]


def test_bytes_in_memory_decode_like_files(corpus):
    from embedder.data.decode import load_rgb_bytes

    root, _expected = corpus
    assert torch.equal(load_rgb_bytes((root / "exif_rotated.jpg").read_bytes()), load_rgb(root / "exif_rotated.jpg"))
    for name, fragment in BAD.items():
        with pytest.raises(BadImageError) as err:
            load_rgb_bytes((root / name).read_bytes())
        assert fragment in err.value.reason


# ---------------------------------------------------------------- limits, and decoding small


@pytest.mark.parametrize("side", [9000, 10_000, 20_000])  # ours alone; past PIL's warning; past PIL's own refusal
def test_bomb_refusal_quotes_the_configured_limit_not_pils(side):
    from embedder.data.decode import load_rgb_bytes
    from tests.corpus import bomb_png

    with pytest.raises(BadImageError) as err:
        load_rgb_bytes(bomb_png(side, side), max_pixels=50_000_000, raise_limit="restart with a larger --max-x")
    reason = err.value.reason
    assert "decompression bomb" in reason and "exceeds the limit of 50000000" in reason
    assert str(side * side) in reason and "--max-x" in reason
    assert str(Image.MAX_IMAGE_PIXELS) not in reason and str(2 * Image.MAX_IMAGE_PIXELS) not in reason


def test_a_limit_above_pils_is_honoured_up_to_pils_own_refusal(tmp_path, monkeypatch):
    from embedder.data.decode import load_rgb_bytes

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's levels made small: warns past 1000, refuses past 2000
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, format="PNG")
    assert tuple(load_rgb_bytes(buf.getvalue(), max_pixels=10**6).shape) == (3, 40, 40)  # PIL's warning ignored
    buf = io.BytesIO()
    Image.new("RGB", (50, 50), (1, 2, 3)).save(buf, format="PNG")
    with pytest.raises(BadImageError, match="PIL's own hard limit of 2000"):  # past it, PIL refuses in Image.open
        load_rgb_bytes(buf.getvalue(), max_pixels=10**6)


def _box_reduce(t: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return torch.nn.functional.adaptive_avg_pool2d(t.float()[None], size)[0].numpy()


def test_min_side_decodes_a_jpeg_small_and_upright(tmp_path):
    from embedder.data.decode import load_rgb_bytes, shown_size

    y, x = np.mgrid[0:600, 0:800]
    smooth = np.stack([x * 255 // 800, y * 255 // 600, (x + y) * 255 // 1400], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(smooth).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    data = (tmp_path / "photo.jpg").read_bytes()
    full = load_rgb(tmp_path / "photo.jpg")
    small = load_rgb(tmp_path / "photo.jpg", min_side=100)
    assert tuple(full.shape) == (3, 800, 600)  # upright: portrait
    assert tuple(small.shape) == (3, 200, 150)  # libjpeg's 1/4 scale, the most that keeps 150 >= 100
    assert torch.equal(load_rgb_bytes(data, min_side=100), small)
    assert np.abs(_box_reduce(full, (200, 150)) - small.float().numpy()).mean() < 2  # the same picture
    assert shown_size(data) == (600, 800)  # as shown, from the header alone


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16"])
def test_min_side_keeps_the_rules_for_alpha_palettes_and_sixteen_bits(tmp_path, mode):
    y, x = np.mgrid[0:400, 0:600]
    if mode == "RGBA":
        a = np.stack([x * 255 // 600, y * 255 // 400, np.full_like(x, 90), np.where(x < 300, 0, 255)], -1)
        img = Image.fromarray(a.astype(np.uint8), "RGBA")
    elif mode == "P":
        img = Image.fromarray(((x // 150) * 60).astype(np.uint8), "L").convert("P")
        img.info["transparency"] = 0  # palette entry 0 (the leftmost quarter) is transparent
    else:
        img = Image.fromarray((x * 65535 // 600).astype(np.uint16))
    img.save(tmp_path / "a.png")
    full, small = load_rgb(tmp_path / "a.png"), load_rgb(tmp_path / "a.png", min_side=100)
    assert tuple(small.shape) == (3, 100, 150)  # box-reduced by 4
    assert np.abs(_box_reduce(full, (100, 150)) - small.float().numpy()).max() <= 2
    if mode != "I;16":
        assert (small[:, :, :30] == 255).all()  # transparent: white, not the colour underneath


def test_alpha_is_reduced_strip_by_strip_exactly_as_whole():
    from embedder.data.decode import _reduce

    rgba = np.random.default_rng(0).integers(0, 256, (701, 3001, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA")  # ~8.4 MB: several 4 MB strips
    for factor in (2, 3, 7):
        assert np.array_equal(np.asarray(_reduce(img, 701 // factor)), np.asarray(img.reduce(factor)))


# ---------------------------------------------------------------- exact JPEGs through torchvision


def _photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """A photograph (scikit-image's astronaut) resized to w x h, with sensor-like noise."""
    import skimage.data

    img = Image.fromarray(skimage.data.astronaut()).resize((w, h), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(seed).normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **{"quality": 90, **save})
    return buf.getvalue()


def _adobe_transform(data: bytes, transform: int) -> bytes:
    """`data` with its Adobe APP14 colour transform set: 2 = YCCK (what Photoshop writes for CMYK)."""
    at = data.index(b"\xff\xeeAdobe"[:2])
    length = int.from_bytes(data[at + 2 : at + 4], "big")
    assert data[at + 4 : at + 9] == b"Adobe"
    return data[: at + 1 + length] + bytes([transform]) + data[at + 2 + length :]


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _scan_damaged(data: bytes, seed: int = 0) -> bytes:
    """A few bytes of the entropy-coded data overwritten: libjpeg warns, recovers and decodes."""
    damaged, rng = bytearray(data), np.random.default_rng(seed)
    start = data.rindex(b"\xff\xda") + 20
    for at in rng.integers(start, len(data) - 4, 3):
        damaged[at] = int(rng.integers(0, 256))
    return bytes(damaged)


def _jpeg_kinds() -> dict[str, bytes]:
    """The kinds of JPEG real collections hold, each made by PIL (libjpeg-turbo) itself."""
    photo = _photo(480, 640)
    cmyk = Image.fromarray(np.random.default_rng(1).integers(0, 256, (96, 128, 4), dtype=np.uint8), "CMYK")
    kinds = {
        "baseline 4:2:0": _jpeg(photo),
        "baseline 4:2:2": _jpeg(photo, subsampling=1),
        "baseline 4:4:4": _jpeg(photo, subsampling=0),
        "quality 50": _jpeg(photo, quality=50),
        "quality 100": _jpeg(photo, quality=100),
        "progressive": _jpeg(photo, progressive=True),
        "optimised Huffman tables": _jpeg(photo, optimize=True),
        "restart markers": _jpeg(photo, restart_marker_blocks=4),
        "grayscale": _jpeg(photo.convert("L")),
        "RGB, not YCbCr (Adobe transform 0)": _jpeg(photo, keep_rgb=True),
        "CMYK, every K (Adobe)": _jpeg(cmyk),
        "YCCK (Adobe transform 2)": _adobe_transform(_jpeg(cmyk), 2),
        "ICC profile": _jpeg(photo, icc_profile=b"\0" * 512),
        "odd size 333x517": _jpeg(_photo(517, 333)),
        "small 7x5": _jpeg(_photo(5, 7)),
        "1x1": _jpeg(_photo(1, 1)),
        "big 3000x2000": _jpeg(_photo(2000, 3000)),
        "data after the end": _jpeg(photo) + b"trailing bytes",
        "extraneous bytes before a marker": _jpeg(photo)[:-2] + b"\0\1\2\xff\xd9",
        "damaged scan data": _scan_damaged(_jpeg(photo)),
    }
    kinds.update({f"EXIF orientation {o}": _jpeg(_photo(48, 64), exif=_exif(o)) for o in range(1, 9)})
    return kinds


JPEG_KINDS = _jpeg_kinds()


@pytest.fixture
def through_torchvision(monkeypatch):
    """Counts the files torchvision decodes."""
    from embedder.data import decode

    real, calls = decode._jpeg_decoder(), []
    assert real is not None, "this torchvision has no decode_jpeg: every JPEG goes through PIL"
    monkeypatch.setattr(decode, "_jpeg_decoder", lambda: lambda data: calls.append(len(data)) or real(data))
    return calls


def _pil_only(monkeypatch):
    from embedder.data import decode

    monkeypatch.setattr(decode, "_jpeg_decoder", lambda: None)


@pytest.mark.parametrize("kind", sorted(JPEG_KINDS))
def test_torchvision_decodes_every_kind_of_jpeg_to_pils_very_pixels(tmp_path, monkeypatch, kind, through_torchvision):
    # Why caches keep their "decoder" component: the fast path changes no pixel, nor the layout.
    path = tmp_path / "image.jpg"
    path.write_bytes(JPEG_KINDS[kind])
    fast, fast_view = load_rgb(path), load_rgb(path, contiguous=False)
    turned = kind.startswith("EXIF orientation") and not kind.endswith(" 1")
    assert len(through_torchvision) == (0 if turned else 2)  # it did run (photos to turn upright are PIL's)
    _pil_only(monkeypatch)
    pil, pil_view = load_rgb(path), load_rgb(path, contiguous=False)
    assert torch.equal(fast, pil) and fast.is_contiguous()
    assert torch.equal(fast_view, pil_view) and fast_view.stride() == pil_view.stride()


def test_the_format_is_told_by_the_bytes_not_the_name(tmp_path, through_torchvision):
    (tmp_path / "a_jpeg.png").write_bytes(JPEG_KINDS["baseline 4:2:0"])
    Image.new("RGB", (8, 8), (9, 8, 7)).save(tmp_path / "a_png.jpg", format="PNG")
    load_rgb(tmp_path / "a_png.jpg")
    assert through_torchvision == []
    load_rgb(tmp_path / "a_jpeg.png")
    assert len(through_torchvision) == 1


def _broken_jpegs() -> dict[str, bytes]:
    data = JPEG_KINDS["baseline 4:2:0"]
    sof = data.index(b"\xff\xc0")
    huge = data[: sof + 5] + (30_000).to_bytes(2, "big") * 2 + data[sof + 9 :]  # claims 30000 x 30000
    return {
        "half": data[: len(data) // 2],
        "no end marker": data[:-2],
        "headers only": data[:600],
        "start of image only": data[:3],
        "damaged headers": data[:400] + bytes(200) + data[600:],
        "progressive, half": JPEG_KINDS["progressive"][: len(JPEG_KINDS["progressive"]) // 2],
        "bomb": huge,
    }


@pytest.mark.parametrize("kind", sorted(_broken_jpegs()))
def test_a_broken_jpeg_gets_pils_own_reason(tmp_path, monkeypatch, kind, through_torchvision):
    path = tmp_path / "broken.jpg"
    path.write_bytes(_broken_jpegs()[kind])
    with pytest.raises(BadImageError) as fast:
        load_rgb(path, max_pixels=100_000_000 if kind != "bomb" else 10_000_000)
    if kind == "bomb":
        assert "decompression bomb" in fast.value.reason and through_torchvision == []  # refused before decoding
    _pil_only(monkeypatch)
    with pytest.raises(BadImageError) as pil:
        load_rgb(path, max_pixels=100_000_000 if kind != "bomb" else 10_000_000)
    assert fast.value.reason == pil.value.reason


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_bad_corpus_keeps_its_reasons_through_torchvision(corpus, monkeypatch, name, through_torchvision):
    root, _ = corpus
    with pytest.raises(BadImageError) as fast:
        load_rgb(root / name)
    _pil_only(monkeypatch)
    with pytest.raises(BadImageError) as pil:
        load_rgb(root / name)
    assert fast.value.reason == pil.value.reason and BAD[name] in fast.value.reason


@pytest.mark.parametrize("model", ["resnet18", "efficientnet_lite0"])  # bilinear and bicubic resizing
def test_the_reader_resizes_the_decoders_layout_to_the_same_batches(tmp_path, model):
    # The reader resizes the decoder's [H, W, 3] layout (3-6x faster): the batch must be the one
    # resizing a contiguous copy gave, value for value and stride for stride.
    from embedder.data.transforms import geometric_transform
    from embedder.extract.core import BatchReader
    from embedder.models.registry import get_backbone_spec

    pre = get_backbone_spec(model).preprocessing
    sizes = [(pre.resize_size, 300), (300, pre.resize_size), (517, 333), (100, 80), (640, 480)]
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(tmp_path / f"{i}.{'jpg' if i % 2 else 'png'}")
        _photo(h, w).save(paths[-1], exif=_exif(6 if i == 3 else 1))
    batch = BatchReader(tmp_path, [p.name for p in paths], np.arange(len(paths)), len(paths), pre)[0]["images"]
    transform = geometric_transform(pre)
    before = torch.stack([transform(load_rgb(p)) for p in paths])
    assert torch.equal(batch, before) and batch.stride() == before.stride()


# ---------------------------------------------------------------- --jpeg-draft (opt-in)


def test_jpeg_min_side_dct_scales_jpegs_alone(tmp_path):
    _photo(600, 800).save(tmp_path / "photo.jpg", quality=90)
    _photo(600, 800).save(tmp_path / "photo.png")
    assert tuple(load_rgb(tmp_path / "photo.jpg", jpeg_min_side=100).shape) == (3, 150, 200)  # 1/4: 150 >= 100
    assert tuple(load_rgb(tmp_path / "photo.jpg", jpeg_min_side=40).shape) == (3, 75, 100)  # libjpeg's least: 1/8
    assert tuple(load_rgb(tmp_path / "photo.png", jpeg_min_side=100).shape) == (3, 600, 800)  # not a JPEG


def _photos(folder, n=4):
    folder.mkdir()
    for i in range(n):
        _photo(480 + 40 * i, 640, seed=i).save(folder / f"{i}.jpg", quality=90)
    return folder


def test_jpeg_draft_is_recorded_and_close_to_exact(tmp_path):
    from embedder.cache.fingerprint import fingerprint_of

    src = _photos(tmp_path / "photos")
    exact = embed(fast_config(src, tmp_path / "exact.h5", layout="flat"))
    draft = embed(fast_config(src, tmp_path / "draft.h5", layout="flat", jpeg_draft=True))
    with FeatureCache(exact.out) as e, FeatureCache(draft.out) as d:
        assert "jpeg_draft" not in e.components and "DCT scaling" in d.components["jpeg_draft"]
        assert {k: v for k, v in d.components.items() if k != "jpeg_draft"} == e.components
        assert draft.fingerprint == fingerprint_of(d.components) != exact.fingerprint
        a, b = e.features(), d.features()
    assert not np.array_equal(a, b)  # the pixels did change
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99, cosine


@pytest.mark.parametrize("first", [False, True])
def test_appending_with_the_other_jpeg_draft_setting_is_refused(tmp_path, first):
    from embedder.errors import CacheMismatchError

    src = _photos(tmp_path / "photos", n=2)
    out = tmp_path / "c.h5"
    embed(fast_config(src, out, layout="flat", jpeg_draft=first))
    _photo(300, 400).save(src / "new.jpg")
    with pytest.raises(CacheMismatchError) as err:
        embed(fast_config(src, out, layout="flat", jpeg_draft=not first))
    assert list(err.value.differences) == ["jpeg_draft"]
    assert embed(fast_config(src, out, layout="flat", jpeg_draft=first)).embedded == 1  # the same setting appends


def test_search_by_image_accepts_a_jpeg_draft_cache(tmp_path):
    # Queries are decoded exactly: the draft changed the cache's decoding, not its backbone.
    from embedder.search.query import query_backbone

    report = embed(fast_config(_photos(tmp_path / "photos", n=1), tmp_path / "c.h5", layout="flat", jpeg_draft=True))
    with FeatureCache(report.out) as cache:
        assert query_backbone(cache.components).spec.name == "resnet18"
