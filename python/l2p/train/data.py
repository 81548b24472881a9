"""What the trainer reads: images with captions, in an order that depends only on (seed, epoch).

The order is a seeded permutation per epoch and the position (epoch, index) is checkpointed,
so a resumed run reads exactly the samples the uninterrupted run would have read; under
torchrun every rank takes its slice of the same global batch, so K processes see the samples
one process would with the same global batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class DataPosition:
    epoch: int = 0
    index: int = 0  # samples of this epoch already consumed (whole global batches)
    sampler_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class BatchPlan:
    """The global batches of every epoch, a pure function of (dataset, global batch, seed,
    epoch): a seeded permutation cut into global batches (an epoch's remainder is dropped), or,
    with aspect-ratio buckets, the data package's bucket sampler run with the global batch
    size (every global batch holds one bucket, so one tensor shape)."""

    def __init__(self, dataset, global_batch: int, seed: int, buckets: bool = False):
        self.dataset, self.global_batch, self.seed, self.buckets = dataset, global_batch, seed, buckets
        self._cached: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        G = self.global_batch
        if self.buckets:
            from l2p.data.dataset import AspectRatioBucketSampler

            sampler = AspectRatioBucketSampler(self.dataset, G, seed=self.seed, shuffle=True, drop_last=True)
            sampler.set_epoch(epoch)
            batches = list(sampler)
        else:
            seed = int(np.random.SeedSequence([self.seed, epoch, 0x5A]).generate_state(1)[0])
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(seed)).tolist()
            batches = [order[i:i + G] for i in range(0, len(order) - G + 1, G)]
        if not batches:
            where = "any aspect-ratio bucket" if self.buckets else "the dataset"
            raise ValueError(f"{where} holds fewer than one global batch ({G} = batch_size x grad_accum "
                             f"x processes; {len(self.dataset)} images); lower train.batch_size")
        self._cached = (epoch, batches)
        return batches

    def take(self, pos: DataPosition) -> tuple[list[int], DataPosition]:
        """The dataset indices of the next global batch and the position after it."""
        epoch, index = pos.epoch, pos.index
        if index // self.global_batch >= len(self.epoch_batches(epoch)):
            epoch, index = epoch + 1, 0
        picked = self.epoch_batches(epoch)[index // self.global_batch]
        return list(picked), DataPosition(epoch, index + self.global_batch, pos.sampler_seed)


def local_batches(plan: BatchPlan, position: DataPosition, batch_size: int, grad_accum: int,
                  world_size: int, rank: int):
    """This rank's micro-batches (index lists) from ``position`` on, in training order: the
    batch sampler of the prefetching DataLoader."""
    while True:
        indices, position = plan.take(position)
        for a in range(grad_accum):
            start = a * batch_size * world_size + rank * batch_size
            yield indices[start:start + batch_size]


def dataset_digest(dataset) -> str:
    """A sha256 of the dataset's usable images in order (file names and captions): what the
    batch plan is a function of, recorded in checkpoints so that a resume can tell whether
    the data changed in between."""
    digest = hashlib.sha256()
    for file in dataset.files:
        digest.update(f"{len(file.file_name)}:{file.file_name}{len(file.caption)}:{file.caption}".encode())
    return digest.hexdigest()


def sample_seed(seed: int, step: int, slot: int) -> int:
    """The seed of one sample's noise, time and caption-dropout draw: a function of the run
    seed, the step and the sample's slot in the global batch only."""
    a, b = np.random.SeedSequence([seed, step, slot]).generate_state(2)
    return (int(a) << 32 | int(b)) & ((1 << 63) - 1)


def open_dataset(path: str | Path, resolution: int, seed: int = 0, *, patch_size: int | None = None,
                 max_aspect: float | None = None, caption_column: str | None = None) -> torch.utils.data.Dataset:
    """The data package's dataset (images + metadata.csv, or images with .txt captions),
    center-cropped to ``resolution`` or, with ``max_aspect``, to the aspect-ratio bucket of
    about ``resolution``^2 pixels (sides multiples of ``patch_size``) nearest each image; the
    captions from metadata.csv's ``caption_column`` (None: text, caption or prompt). Its
    own caption dropout stays off: the trainer draws the dropout coin per (seed, step, slot) so
    that resumed and multi-process runs are exact."""
    from l2p.data.dataset import ImageCaptionDataset, make_buckets

    if not path:
        raise ValueError("data.path is empty: set it to an images folder with metadata.csv "
                         "(--set data.path=DIR)")
    buckets = make_buckets(resolution, patch_size, max_aspect=max_aspect) if max_aspect else None
    dataset = ImageCaptionDataset(path, size=resolution, buckets=buckets, caption_dropout=0.0, seed=seed,
                                  caption_column=caption_column)
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no usable images")
    return dataset


def collate(samples: list[dict]) -> dict:
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "text": [s["text"] for s in samples],
            "index": [s["index"] for s in samples]}
