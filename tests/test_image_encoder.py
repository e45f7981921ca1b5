"""The built-in image encoder on images generated here: width, determinism, batching, bad files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from itemsage.encoders import image as image_encoder
from itemsage.encoders.image import ImageEncoder


def _image(kind: str, size=(320, 240)) -> Image.Image:
    w, h = size
    if kind == "gradient":
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
        rgb = np.concatenate([x + 0 * y, y + 0 * x, 255 - (x + y) / 2], axis=2)
        return Image.fromarray(rgb.astype(np.uint8), "RGB")
    if kind == "checker":
        yy, xx = np.mgrid[0:h, 0:w]
        board = (((xx // 20) + (yy // 20)) % 2 * 255).astype(np.uint8)
        return Image.fromarray(board, "L")  # grayscale: converted to RGB
    if kind == "noise":
        rng = np.random.default_rng(0)
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if kind == "red_disc":  # RGBA: transparent background becomes white
        yy, xx = np.mgrid[0:h, 0:w]
        inside = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[inside] = (200, 20, 20, 255)
        return Image.fromarray(rgba, "RGBA")
    raise ValueError(kind)


KINDS = ("gradient", "checker", "noise", "red_disc")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, kind in enumerate(KINDS):
        path = root / f"{kind}.png"
        _image(kind, size=(320 + 40 * i, 240)).save(path)
        paths.append(path)
    (root / "corrupt.jpg").write_bytes(b"this is not an image")
    return {"good": paths, "missing": root / "missing.png", "corrupt": root / "corrupt.jpg"}


@pytest.fixture(scope="module")
def encoder():
    return ImageEncoder(device="cpu")


def test_width_finite_and_distinct(encoder, files):
    assert encoder.dim == 1280
    vectors, errors = encoder.encode_paths(files["good"], progress=False)
    assert vectors.shape == (len(KINDS), 1280) and vectors.dtype == np.float32
    assert errors == [None] * len(KINDS)
    assert np.isfinite(vectors).all() and (np.abs(vectors).sum(1) > 0).all()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit @ unit.T
    off_diagonal = cosine[~np.eye(len(KINDS), dtype=bool)]
    assert off_diagonal.max() < 0.9, cosine  # different images, different vectors


def test_deterministic_across_instances(files):
    first, _ = ImageEncoder().encode_paths(files["good"], progress=False)
    image_encoder._load_model.cache_clear()  # force a second, independent load of the weights
    second, _ = ImageEncoder().encode_paths(files["good"], progress=False)
    np.testing.assert_array_equal(first, second)


def test_batch_equals_one_by_one(encoder, files):
    batched, _ = encoder.encode_paths(files["good"], batch_size=3, progress=False)  # batches of 3 + 1
    for row, path in enumerate(files["good"]):
        single, _ = encoder.encode_paths([path], batch_size=1, progress=False)
        np.testing.assert_allclose(batched[row], single[0], atol=1e-4, rtol=0)


def test_bad_files_reported_per_row(encoder, files):
    good = files["good"]
    paths = [good[0], files["missing"], good[1], files["corrupt"], good[2]]
    vectors, errors = encoder.encode_paths(paths, batch_size=2, progress=False)
    assert [e is None for e in errors] == [True, False, True, False, True]
    assert "missing.png" in errors[1] and "FileNotFoundError" in errors[1]
    assert "corrupt.jpg" in errors[3]
    assert not vectors[1].any() and not vectors[3].any()
    for row, path in ((0, good[0]), (2, good[1]), (4, good[2])):
        single, _ = encoder.encode_paths([path], progress=False)
        np.testing.assert_allclose(vectors[row], single[0], atol=1e-4, rtol=0)


def test_encode_images_matches_files(encoder, files):
    images = [Image.open(p) for p in files["good"]]  # PNG is lossless: same pixels as the files
    from_images = encoder.encode_images(images, batch_size=2)
    from_files, _ = encoder.encode_paths(files["good"], progress=False)
    np.testing.assert_allclose(from_images, from_files, atol=1e-4, rtol=0)
    assert encoder.encode_images([]).shape == (0, 1280)


def test_preprocess_shape_and_range():
    x = image_encoder.preprocess(_image("gradient", size=(500, 100)))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    white = image_encoder.preprocess(Image.new("RGBA", (50, 80), (0, 0, 0, 0)))
    np.testing.assert_allclose(white, 1.0)  # fully transparent -> white background
