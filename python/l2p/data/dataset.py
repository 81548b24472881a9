"""The training dataset: rendered images with ``metadata.csv``, or a plain folder of real
images with sidecar ``.txt`` captions; fixed-size center crops or aspect-ratio buckets;
caption dropout for classifier-free guidance.

Every image is checked once when the dataset is built (PNG: PIL verify, the header and the
chunk checksums; other formats: a decode, of JPEG at reduced scale, since verify reads no
JPEG data and a truncated JPEG would pass it), so a missing or corrupt file costs a counted
warning, not a crash hours into training. Images are read as they are displayed: EXIF
orientation is applied before the size is read (for aspect buckets) and before cropping, and
16-bit greyscale is scaled to 8 bits (``convert("RGB")`` clips it to white), and transparent
images are composited over white (``convert("RGB")`` shows the colours hidden under
transparent pixels). A ``file_name``
that would leave the folder (absolute, ``..``, or a symlink pointing outside) is a ValueError
naming its row: metadata from elsewhere must not be able to make training read arbitrary
files.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from l2p.data.generate import MANIFEST as GENERATION_MANIFEST
from l2p.data.textfiles import read_csv, read_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_COLUMNS = ("text", "caption", "prompt")
# Metadata files of other tools' image-folder layouts (Hugging Face datasets reads these too).
OTHER_METADATA_FILES = ("metadata.jsonl", "metadata.parquet")


@dataclass(frozen=True)
class CaptionedFile:
    file_name: str  # relative to the dataset folder, "/"-separated
    path: Path
    caption: str


def _inside(root: Path, file_name: str, where: str) -> Path:
    """``root / file_name`` if it stays inside ``root``; else a ValueError naming ``where``."""
    if not file_name:
        raise ValueError(f"{where}: the row has no file_name (a row with fewer fields than the header?); "
                         "give every row the image's path inside the dataset folder, or remove the row")
    posix = PurePosixPath(file_name.replace("\\", "/"))
    if (posix.is_absolute() or PureWindowsPath(file_name).drive
            or ".." in posix.parts):
        raise ValueError(f"{where}: file_name {file_name!r} escapes the dataset folder; "
                         "file names must be relative paths inside it, without '..'")
    path = root / posix
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{where}: file_name {file_name!r} resolves outside the dataset folder "
                         f"(a symlink to {str(path.resolve())!r}); copy the file into the folder")
    return path


def list_captioned_files(root: str | os.PathLike, caption_column: str | None = None) -> list[CaptionedFile]:
    """The (file, caption) pairs of a dataset folder, images not yet checked.

    With ``root/metadata.csv``: its ``file_name`` column and the caption column (``caption_column``,
    else the first of text, caption, prompt). Without: every image file below ``root`` and the
    ``.txt`` file of the same stem beside it ("" when there is none).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    meta = root / "metadata.csv"
    generated = (root / GENERATION_MANIFEST).is_file()
    if generated and not meta.is_file():
        # Read as a plain folder, every image would train with the empty caption.
        raise ValueError(f"{root} was written by `l2p data generate` but has no metadata.csv yet (the run "
                         f"was interrupted before writing it); run `l2p data generate --merge-only --out {root}`")
    other = next((root / n for n in OTHER_METADATA_FILES if (root / n).is_file()), None)
    if other is not None and not meta.is_file():
        # Read as a plain folder, every image would train with the empty caption.
        raise ValueError(f"{root} has {other.name} but no metadata.csv; l2p reads captions from metadata.csv "
                         "(columns file_name and text) or from a .txt file beside each image: convert it")
    if meta.is_file():
        fields, rows = read_csv(meta)
        column = caption_column or next((c for c in CAPTION_COLUMNS if c in fields), None)
        if "file_name" not in fields or column not in fields:
            raise ValueError(f"{meta} needs a 'file_name' column and a caption column "
                             f"({caption_column or ' or '.join(CAPTION_COLUMNS)}); found {fields}")
        # Line numbers count the header as line 1, as an editor shows them.
        listed = [CaptionedFile(row["file_name"], _inside(root, row["file_name"] or "", f"{meta} line {line}"),
                                row[column] or "")
                  for line, row in enumerate(rows, 2)]
        if generated:
            _warn_unlisted_generated_images(root, {f.file_name for f in listed})
        return listed
    files = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        name = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in PurePosixPath(name).parts):
            continue  # hidden files, e.g. unfinished temporary PNGs
        sidecar = path.with_suffix(".txt")
        caption = read_text(sidecar).strip() if sidecar.is_file() else ""
        files.append(CaptionedFile(name, _inside(root, name, str(path)), caption))
    return files


def _warn_unlisted_generated_images(root: Path, listed: set[str]) -> None:
    """Warn about PNGs of a ``l2p data generate`` folder that its metadata.csv leaves out: a run
    interrupted after rendering them and before rewriting metadata.csv."""
    unlisted = [name for png in sorted((root / "images").glob("*/*.png")) if not png.name.startswith(".")
                and (name := png.relative_to(root).as_posix()) not in listed]
    if unlisted:
        warnings.warn(f"{root}: {len(unlisted)} generated images are not in metadata.csv (e.g. {unlisted[0]}) "
                      "and are left out; an interrupted `l2p data generate` rendered them: run `l2p data "
                      f"generate --merge-only --out {root}` to add them", RuntimeWarning, stacklevel=3)


# EXIF orientations (5-8) that turn the image by 90 degrees, swapping width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
# Greyscale modes with more than 8 bits a sample; PIL opens 16-bit PNG and TIFF as these.
_WIDE_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# Modes with an alpha channel; palette and plain modes carry transparency in info instead.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _displayed_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, what ImageOps.exif_transpose would give,
    without transposing the pixels."""
    width, height = im.size
    if im.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def _probe(path: Path, min_side: int) -> tuple[str | None, tuple[int, int]]:
    """("missing" | "corrupt" | "float_pixels" | "too_small" | None, (width, height) as displayed)."""
    if not path.is_file():
        return "missing", (0, 0)
    try:
        with Image.open(path) as im:
            if im.mode == "F":
                # Floating-point samples (TIFF) have no agreed range: convert("RGB") clips them
                # to 0..255, and an image stored in [0, 1] would come out black.
                return "float_pixels", (0, 0)
            is_png = im.format == "PNG"
            if is_png:
                im.verify()  # chunk CRCs and the end marker: catches truncation without inflating
            else:
                size = _displayed_size(im)
                # verify() reads no JPEG (or WebP, ...) data, so decode; draft() lets libjpeg
                # decode at 1/8 scale, which still reads every entropy-coded byte.
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        if is_png:  # verify() must come first and leaves the image unusable: open again
            with Image.open(path) as im:
                size = _displayed_size(im)
    except Exception:  # noqa: BLE001 - PIL raises many types for broken files
        return "corrupt", (0, 0)
    return ("too_small" if min(size) < min_side else None), size


def _to_rgb(im: Image.Image) -> Image.Image:
    """The image as displayed, in 8-bit RGB; transparent parts over white."""
    im = ImageOps.exif_transpose(im)
    if im.mode in _WIDE_GREY_MODES:
        # convert("RGB") clips these at 255 (mid grey 32768 comes out white); scale the 16-bit
        # range to 8 bits instead. Mode "I" is read as 16-bit too: that is what PIL gives for
        # 16-bit PNG and TIFF greyscale, and values above 65535 are clipped.
        values = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # convert("RGB") drops the alpha and keeps the colours stored under transparent pixels,
        # which no viewer shows and which are often arbitrary; composite over white instead,
        # as the image looks on a page.
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def make_buckets(base_size: int, patch_size: int, *, max_aspect: float = 2.0,
                 step: int | None = None) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (height, width): sides are multiples of ``patch_size`` (so every
    bucket is a whole token grid), areas close to ``base_size**2`` and aspect ratios within
    ``[1/max_aspect, max_aspect]``. ``step`` (a multiple of the patch, default base/16 rounded
    to the patch) spaces the heights."""
    if base_size % patch_size:
        raise ValueError(f"base size {base_size} must be a multiple of the patch size {patch_size}")
    step = step or max(patch_size, round(base_size / 16 / patch_size) * patch_size)
    if step % patch_size:
        raise ValueError(f"bucket step {step} must be a multiple of the patch size {patch_size}")
    area = base_size * base_size
    buckets = set()
    for h in range(step, int(base_size * math.sqrt(max_aspect)) + 1, step):
        w = max(patch_size, round(area / h / patch_size) * patch_size)
        if 1 / max_aspect <= w / h <= max_aspect:
            buckets.add((h, w))
    return sorted(buckets)


def _resize_center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    if image.size == (width, height):
        return image
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


class ImageCaptionDataset(Dataset):
    """Images and captions for training, as ``{"pixel_values": (3, H, W) float in [-1, 1],
    "text": str, "index": int}`` (plus ``"embeddings"``, a dict of tensors, when an
    :class:`~l2p.data.embed.PromptEmbeddingCache` is given).

    ``size`` (an int or (height, width)) center-crops every image to one size; ``buckets``
    (from :func:`make_buckets`) instead gives each image the bucket closest to its aspect
    ratio; pair it with :class:`AspectRatioBucketSampler` so a batch shares one size.
    ``caption_dropout`` replaces the caption with "" with that probability, decided by
    (seed, epoch, index): call ``set_epoch`` each epoch (before creating the DataLoader
    iterator when workers are used). Unusable images are dropped at construction and counted in
    ``skipped`` (missing, corrupt, float_pixels, too_small); ``missing_captions`` counts images
    with an empty caption (in metadata.csv, or no ``.txt`` beside them in a plain folder),
    ``upscaled`` the images smaller than their crop (height or width), which are enlarged.
    """

    def __init__(self, root: str | os.PathLike, *, size: int | tuple[int, int] = 1024,
                 buckets: Sequence[tuple[int, int]] | None = None, caption_dropout: float = 0.0,
                 seed: int = 0, caption_column: str | None = None, min_side: int = 0,
                 embeddings=None, num_threads: int = 8):
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.root = Path(root)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.buckets = [tuple(b) for b in buckets] if buckets else None
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.epoch = 0
        self.embeddings = embeddings

        candidates = list_captioned_files(self.root, caption_column)
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            probes = list(pool.map(lambda f: _probe(f.path, min_side), candidates))
        self.skipped: Counter = Counter()
        bad: list[str] = []
        self.files: list[CaptionedFile] = []
        self.image_sizes: list[tuple[int, int]] = []  # (width, height) as PIL reports
        for file, (problem, wh) in zip(candidates, probes):
            if problem:
                self.skipped[problem] += 1
                bad.append(f"{file.file_name} ({problem})")
            else:
                self.files.append(file)
                self.image_sizes.append(wh)
        self.missing_captions = sum(1 for f in self.files if not f.caption)
        if bad:
            warnings.warn(f"{self.root}: skipped {len(bad)} of {len(candidates)} images "
                          f"({dict(self.skipped)}), e.g. {', '.join(bad[:3])}", RuntimeWarning, stacklevel=2)
        if self.missing_captions:
            # In metadata.csv too: an empty caption column (e.g. 'text' left empty beside a filled
            # 'caption') would otherwise train unconditionally without a word.
            where = ("an empty caption in metadata.csv" if (self.root / "metadata.csv").is_file()
                     else "no .txt caption")
            warnings.warn(f"{self.root}: {self.missing_captions} of {len(self.files)} images have {where} "
                          "and train with the empty caption", RuntimeWarning, stacklevel=2)
        if self.buckets:
            ratios = np.log([w / h for h, w in self.buckets])
            self.item_buckets = [int(np.argmin(np.abs(ratios - math.log(w / h)))) for w, h in self.image_sizes]
        else:
            self.item_buckets = [0] * len(self.files)
        # A corpus rendered at a lower resolution than the training one (512 for a 1024 run)
        # would otherwise train on blurred, upscaled images without a word.
        upscaled = [i for i, (w, h) in enumerate(self.image_sizes)
                    if h < self.target_size(i)[0] or w < self.target_size(i)[1]]
        self.upscaled = len(upscaled)
        if upscaled:
            first = upscaled[0]
            (w, h), (th, tw) = self.image_sizes[first], self.target_size(first)
            warnings.warn(f"{self.root}: {len(upscaled)} of {len(self.files)} images are smaller than the size "
                          f"they are cropped to and are upscaled (e.g. {self.files[first].file_name}: {w}x{h} "
                          f"for {tw}x{th}); render or collect images of at least that size, or train at a "
                          "lower resolution", RuntimeWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def target_size(self, index: int) -> tuple[int, int]:
        """(height, width) that item ``index`` is cropped to."""
        return self.buckets[self.item_buckets[index]] if self.buckets else self.size

    def caption(self, index: int) -> str:
        """The caption of item ``index`` this epoch, after caption dropout."""
        if self.caption_dropout > 0:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if rng.random() < self.caption_dropout:
                return ""
        return self.files[index].caption

    def __getitem__(self, index: int) -> dict:
        file = self.files[index]
        height, width = self.target_size(index)
        try:
            with Image.open(file.path) as im:
                image = _resize_center_crop(_to_rgb(im), height, width)
        except OSError as exc:
            raise OSError(f"{file.file_name} passed the check but cannot be decoded ({exc}); "
                          "remove or replace it") from exc
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        item = {"pixel_values": pixels.float() / 127.5 - 1.0, "text": self.caption(index), "index": index}
        if self.embeddings is not None:
            item["embeddings"] = self.embeddings[item["text"]]
        return item


class AspectRatioBucketSampler(Sampler[list[int]]):
    """A batch sampler whose batches hold indices of one bucket (so one tensor shape).

    Each epoch (``set_epoch``) shuffles within buckets and then the order of batches, from
    (seed, epoch): reproducible and the same on every rank. With ``world_size`` > 1 rank r takes
    batches r, r + world_size, ...; every rank gets the same number of batches.
    """

    def __init__(self, dataset: ImageCaptionDataset, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.dataset, self.batch_size = dataset, batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        by_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.dataset.item_buckets):
            by_bucket.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            if self.shuffle:
                indices = [indices[i] for i in rng.permutation(len(indices))]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) - len(batches) % self.world_size
        return batches[:usable]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._all_batches()[self.rank::self.world_size])

    def __len__(self) -> int:
        return len(self._all_batches()) // self.world_size
