"""Images in a prompt: read and checked, resized for the target's vision tower, and placed.

Gemma 4's chat template writes one image token per image (`<|image|>`); the prompt then
holds, per image, its begin token, one soft token per embedding the vision tower gives, and
its end token (as transformers' Gemma4Processor expands it). Reading an image needs only
Pillow; the resize and the tower are mlx-vlm's (the `vision` extra), imported on first use:
a text-only load reads no vision weight and imports nothing more.
"""

import hashlib
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

EXTRA = 'pip install "mlx-mtp[vision]"'
MAX_IMAGE_BYTES = 20 << 20  # an image file or data URL's bytes
MAX_IMAGE_PIXELS = 50_000_000  # decoded width x height (Pillow's own bomb check is 89M)
MAX_IMAGES = 16  # per request
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")  # (MPO: a phone camera's JPEG)
# Images decoded and resized at once, per process: a 50M-pixel image takes about 0.5 GB while
# it is, and a server prepares each request's images on a thread of its own.
PREPARING = threading.BoundedSemaphore(2)
DEFAULT_SOFT_TOKENS = 280  # transformers' Gemma4ImageProcessor default, as published


class ImageError(ValueError):
    """An image that cannot be used; the message is one line."""


def _need(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImageError(f"images need the vision extra: {EXTRA}") from None


@dataclass(frozen=True, eq=False)
class Image:
    """One image, ready for the tower: its pixels resized and rescaled, [3, H, W] float32,
    and the sha256 of the bytes it was read from (what a kept conversation is keyed on)."""

    pixels: np.ndarray
    soft_tokens: int
    digest: str


@dataclass(eq=False)
class Vision:
    """A multimodal target's image settings, read from its config; the tower itself is
    loaded on the first image (`tower`)."""

    path: Path
    config: dict  # the checkpoint's vision_config
    image_token: int
    begin_token: int
    end_token: int
    pad_token: int
    soft_tokens: int  # most soft tokens per image (the resize budget)
    bidirectional: bool  # sliding layers attend both ways within an image (26B, 31B)
    _tower: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def of(cls, path: Path, config: dict) -> Optional["Vision"]:
        """From a checkpoint's config (None: no vision tower)."""
        vision = config.get("vision_config")
        tokens = [config.get(k) for k in ("image_token_id", "boi_token_id", "eoi_token_id")]
        if not vision or None in tokens:
            return None
        text = config.get("text_config") or {}
        soft = DEFAULT_SOFT_TOKENS
        for name in ("processor_config.json", "preprocessor_config.json"):
            try:
                data = json.loads((path / name).read_text())
            except (OSError, ValueError):
                continue
            data = data.get("image_processor", data) if isinstance(data, dict) else None
            soft = data.get("max_soft_tokens", soft) if isinstance(data, dict) else soft
            if not (isinstance(soft, int) and not isinstance(soft, bool) and soft >= 1):
                raise ImageError(f"{path / name}: max_soft_tokens must be an integer >= 1, got {soft!r}")
            break
        return cls(path, vision, *tokens,
                   text.get("pad_token_id", config.get("pad_token_id", 0)), soft,
                   text.get("use_bidirectional_attention") == "vision")

    def tower(self, hidden: int, dtype):
        """The vision tower and its projection into the target's embeddings (loaded once)."""
        with self._lock:
            if self._tower is None:
                from .models.vision import VisionTower

                self._tower = VisionTower.load(self.path, self.config, hidden, dtype)
            return self._tower

    def prepare(self, source: Union[str, Path, bytes]) -> Image:
        """An image from a path or its bytes, checked and resized as the tower wants it."""
        data = read_bytes(source)
        processing = _need("mlx_vlm.models.gemma4.processing_gemma4")
        processor = processing.Gemma4ImageProcessor(
            patch_size=self.config.get("patch_size", 16), max_soft_tokens=self.soft_tokens,
            pooling_kernel_size=self.config.get("pooling_kernel_size", 3))
        with PREPARING:
            picture = decode(data)
            try:
                out, soft = processor.preprocess([picture])
            except ValueError as e:
                raise ImageError(f"cannot resize this image ({e})") from None
        pixels = out["pixel_values"][0]  # (of the one image: a list or a stacked array)
        return Image(np.asarray(pixels, np.float32), int(soft[0]), hashlib.sha256(data).hexdigest())

    def placed(self, ids: Sequence[int], images: Sequence[Image]) -> List[int]:
        """The prompt with each image token (one per image, in order) expanded to the
        image's begin token, soft tokens and end token."""
        at = [i for i, t in enumerate(ids) if t == self.image_token]
        if len(at) != len(images):
            raise ImageError(f"the prompt has {len(at)} image placeholder(s) for {len(images)} image(s)")
        out, last = [], 0
        for i, image in zip(at, images):
            out += list(ids[last:i]) + [self.begin_token] + [self.image_token] * image.soft_tokens + [self.end_token]
            last = i + 1
        return out + list(ids[last:])


def read_bytes(source: Union[str, Path, bytes]) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif not isinstance(source, (str, Path)):
        raise ImageError(f"an image is a file's path or its bytes, got {type(source).__name__}")
    else:
        path = Path(source).expanduser()
        try:
            if not path.is_file():  # (nor a directory, a FIFO or a device: reading one may never end)
                raise ImageError(f"cannot read {source}: {'not a file' if path.exists() else 'no such file'}")
            size = path.stat().st_size
            if size > MAX_IMAGE_BYTES:
                raise ImageError(f"{source}: {size} bytes, over the {MAX_IMAGE_BYTES} bytes an image may have")
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read {source}: {e.strerror or e}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"the image has {len(data)} bytes, over the {MAX_IMAGE_BYTES} an image may have")
    if not data:
        raise ImageError("the image is empty")
    return data


def decode(data: bytes):
    """A decoded RGB Pillow image; one-line errors for what is not a whole image of a
    supported format, or too many pixels."""
    PIL = _need("PIL.Image")
    from PIL import ImageOps

    try:
        picture = PIL.open(io.BytesIO(data))
        if picture.format not in FORMATS:
            raise ImageError(f"unsupported image format {picture.format} (supported: {', '.join(FORMATS)})")
        width, height = picture.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageError(f"the image is {width} x {height} pixels, over the {MAX_IMAGE_PIXELS} allowed")
        picture.load()
        picture = ImageOps.exif_transpose(picture)  # a photo as it is shown (as transformers loads it)
    except ImageError:
        raise
    except PIL.UnidentifiedImageError:
        raise ImageError("not an image (or a format Pillow cannot read)") from None
    except (OSError, ValueError, SyntaxError, PIL.DecompressionBombError) as e:
        raise ImageError(f"a corrupt or truncated image ({' '.join(str(e).split())})") from None
    if picture.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: Pillow's RGB would clip it to white
        picture = PIL.fromarray((np.asarray(picture, np.float64) / 257).clip(0, 255).astype(np.uint8), "L")
    return picture.convert("RGB")


def soft_runs(ids: Sequence[int], image_token: int) -> List[Tuple[int, int]]:
    """(start, length) of each run of soft tokens in placed ids."""
    runs = []
    for i, t in enumerate(ids):
        if t != image_token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def check_count(count: int, vision: Optional[Vision], name: str = "this target"):
    """That a target (`vision`: None, no tower) can take `count` images in one request."""
    if count and vision is None:
        raise ImageError(f"{name} has no vision tower: images need a multimodal Gemma 4 checkpoint")
    if count > MAX_IMAGES:
        raise ImageError(f"{count} images, over the {MAX_IMAGES} a request may have")


def check_placed(ids: Sequence[int], images: Sequence[Image], vision: Vision):
    """That a prompt holds each image's soft tokens where `Vision.placed` puts them."""
    runs = soft_runs(ids, vision.image_token)
    if [n for _, n in runs] != [image.soft_tokens for image in images]:
        raise ImageError(f"the prompt's image soft tokens ({[n for _, n in runs]}) do not match its "
                         f"images ({[image.soft_tokens for image in images]}): place them with Vision.placed")
    for start, n in runs:  # (a prompt that continues a conversation may start after the begin token)
        if (start > 0 and ids[start - 1] != vision.begin_token) or (start + n < len(ids) and ids[start + n] != vision.end_token):
            raise ImageError("an image's soft tokens must sit between its begin and end tokens")


def image_spans(ids: Sequence[int], images: Sequence[Image], vision: Optional[Vision]) -> Tuple[Tuple[int, int, str], ...]:
    """Per image: (position of its first soft token, their number, its digest), as a
    conversation keeps them (`PromptCache.images`)."""
    if not images:
        return ()
    runs = soft_runs(ids, vision.image_token)
    return tuple((start, length, image.digest) for (start, length), image in zip(runs, images))
