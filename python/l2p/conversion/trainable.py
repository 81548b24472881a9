"""``set_trainable``: which parameters of a pixel model learn."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from l2p.models import PixelTransformer2DModel

_FIRST_LAST = re.compile(r"first_last:(\d+)")


@dataclass
class TrainableReport:
    policy: str
    trainable: int
    total: int
    trainable_names: list[str] = field(default_factory=list)
    frozen_names: list[str] = field(default_factory=list)
    # The blocks (in the adapter's order) that are trainable, for "first_last:N".
    trainable_blocks: list[str] = field(default_factory=list)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return (f"policy {self.policy}: {self.trainable:,} of {self.total:,} parameters "
                f"trainable ({share:.1f}%) in {len(self.trainable_names)} tensors; "
                f"{len(self.frozen_names)} tensors frozen")


def set_trainable(
    model: PixelTransformer2DModel, policy: str | Sequence[str] = "first_last:5"
) -> TrainableReport:
    """Set ``requires_grad`` on every parameter of ``model`` and report the split.

    Policies:
        "first_last:N": the pixel embedding, the first N and last N blocks (the adapter's
            block sequence, e.g. FLUX double then single blocks, Z-Image noise_refiner then
            layers), the final norm/modulation that feeds the head, and the head train;
            everything else (middle blocks, timestep/text/caption embedders, position
            tables) is frozen. With 2N >= the number of blocks every block trains.
        "all": every parameter.
        patterns: a list of fnmatch patterns over parameter names (or one string of
            comma-separated patterns), e.g. ["head.*", "transformer.x_embedder.*"].
    """
    if not isinstance(model, PixelTransformer2DModel):
        raise TypeError(
            f"set_trainable takes a PixelTransformer2DModel (from convert_to_pixel), got "
            f"{type(model).__name__}"
        )
    names = [n for n, _ in model.named_parameters()]
    blocks: list[str] = []
    if isinstance(policy, str) and policy == "all":
        selected = set(names)
        label = "all"
    elif isinstance(policy, str) and policy.startswith("first_last"):
        match = _FIRST_LAST.fullmatch(policy)
        if match is None:
            raise ValueError(
                f"policy {policy!r}: write first_last:N with N a whole number, e.g. first_last:5"
            )
        n = int(match.group(1))
        all_blocks = [name for name, _ in model.blocks()]
        if 2 * n >= len(all_blocks):
            blocks = all_blocks
        else:
            blocks = all_blocks[:n] + all_blocks[len(all_blocks) - n:]
        adapter = model.adapter
        prefixes = (
            [f"transformer.{adapter.input_module}"]
            + blocks
            + [f"transformer.{m}" for m in adapter.output_modules]
            + ["head"]
        )
        selected = {
            name for name in names if any(name == p or name.startswith(p + ".") for p in prefixes)
        }
        label = policy
    else:
        if isinstance(policy, str):
            patterns = [p.strip() for p in policy.split(",")]
        else:
            patterns = list(policy) if isinstance(policy, Sequence) else []
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(
                f"policy must be 'all', 'first_last:N' or name patterns, got {policy!r}"
            )
        selected = set()
        for pattern in patterns:
            hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
            if not hits:
                raise ValueError(
                    f"pattern {pattern!r} matches no parameter; names look like "
                    f"{names[0]!r} or 'head.fuse.weight'"
                )
            selected |= hits
        label = ",".join(patterns)

    report = TrainableReport(label, 0, 0, trainable_blocks=blocks)
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected)
        report.total += param.numel()
        if name in selected:
            report.trainable += param.numel()
            report.trainable_names.append(name)
        else:
            report.frozen_names.append(name)
    return report
