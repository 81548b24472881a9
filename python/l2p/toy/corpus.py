"""Training corpora of the toy world, in the trainer's layout (``images/`` + ``metadata.csv``):

- ``synthetic``: the source's own generations for ShapesWorld training prompts (the paper's data);
- ``verified``: the same generations, kept only where the scorer finds the prompt in them: each
  prompt gets ``candidates`` tries (try 0 has the seed of the synthetic corpus's image for that
  prompt) and keeps the first that passes; a prompt with no passing try is left out. A filter
  of this kind is how a weak source's mistakes are kept out of its own training data;
- ``real``: ground-truth renders of the same prompts.

Every builder resumes: finished images are skipped, each file lands with one ``os.replace``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from l2p.atomic import atomic_path, write_json, write_text
from l2p.toy.prompts import PromptRecord

CORPORA = ("synthetic", "verified", "real")


def write_prompt_file(records: list[PromptRecord], path: Path) -> Path:
    """The records' prompts, one per line (the input of ``generate_images``). Rewritten when the
    records changed, so that generating into a folder rendered from other prompts is refused
    (by its manifest) instead of mixing two prompt lists."""
    text = "".join(r.prompt + "\n" for r in records)
    if not path.exists() or path.read_text() != text:
        write_text(path, text)
    return path


def write_synthetic_corpus(source_dir: Path, records: list[PromptRecord], out: Path, *, size: int,
                           steps: int, guidance: float, seed: int, images_per_prompt: int = 1,
                           device: str | None = None, prompt_indices=None) -> Path:
    """The source's generations for ``records`` (or only those at ``prompt_indices``),
    ``images_per_prompt`` each (image i of prompt p seeded by ``derive_seed(seed, p, i)``, so
    the first image of a prompt is the same in every corpus rendered with this seed)."""
    from l2p.data.generate import GenerationConfig, generate_images

    out.mkdir(parents=True, exist_ok=True)
    prompts = write_prompt_file(records, out.parent / f"{out.name}-prompts.txt")
    generate_images(GenerationConfig(
        source=str(source_dir), prompts=str(prompts), out=str(out), images_per_prompt=images_per_prompt,
        steps=steps, guidance=guidance, height=size, width=size, seed=seed, batch_size=32, device=device),
        prompt_indices=prompt_indices)
    return out


def write_verified_corpus(source_dir: Path, records: list[PromptRecord], out: Path, *, size: int,
                          steps: int, guidance: float, seed: int, candidates: int = 4,
                          device: str | None = None) -> dict:
    """The source's generations that the scorer accepts: up to ``candidates`` tries per prompt
    (rendered into ``<out>-candidates``), the first accepted one copied into ``out``.

    Tries go in rounds: round i renders try i only for the prompts no earlier try satisfied,
    so a source that gets most prompts right first time costs little more than the plain
    synthetic corpus. Returns (and writes to ``out/verification.json``) how many prompts kept
    an image, overall and per category, and each prompt's verdicts (1 accepted, 0 rejected,
    -1 not tried), so the selection's bias (hard categories keep fewer prompts) is on record
    next to the corpus."""
    from l2p.data.generate import image_name, rebuild_metadata
    from l2p.toy.scorer import score_images

    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, got {candidates}")
    record_path = out / "verification.json"
    prompts_sha256 = hashlib.sha256("\n".join(r.prompt for r in records).encode()).hexdigest()
    if record_path.exists():
        verification = json.loads(record_path.read_text())
        if (verification["candidates"], verification.get("prompts_sha256")) == (candidates, prompts_sha256):
            return verification
        raise ValueError(f"{out} holds a verified corpus of other prompts or another number of tries; "
                         "use a new folder")
    pool = out.parent / f"{out.name}-candidates"
    verdicts = np.full((len(records), candidates), -1, dtype=np.int64)
    for attempt in range(candidates):
        todo = [p for p in range(len(records)) if not (verdicts[p] == 1).any()]
        if not todo:
            break
        write_synthetic_corpus(source_dir, records, pool, size=size, steps=steps, guidance=guidance, seed=seed,
                               images_per_prompt=attempt + 1, device=device, prompt_indices=todo)
        images = np.stack([np.asarray(Image.open(pool / image_name(p, attempt)).convert("RGB")) for p in todo])
        results, _ = score_images(images, [records[p].scene for p in todo])
        verdicts[todo, attempt] = [int(r.correct) for r in results]

    (out / "images").mkdir(parents=True, exist_ok=True)
    for p, row in enumerate(verdicts):
        if (row == 1).any():
            name = image_name(p, int(np.argmax(row == 1)))
            target = out / name
            if not target.exists():
                with atomic_path(target) as tmp:
                    shutil.copyfile(pool / name, tmp)  # keeps the PNG's generation record
    rows = rebuild_metadata(out)
    if rows == 0:
        raise ValueError(
            f"the scorer accepted none of the source's generations for {len(records)} prompts "
            f"({candidates} tries each), so the verified corpus would be empty; give more tries per "
            "prompt, or use a better-trained source")
    categories = np.array([r.category for r in records])
    kept = (verdicts == 1).any(axis=1)
    verification = {
        "candidates": candidates, "prompts": len(records), "prompts_sha256": prompts_sha256,
        "kept": int(kept.sum()), "images": rows,
        "generated": int((verdicts >= 0).sum()),
        "kept_fraction": float(kept.mean()),
        "first_try_accepted": float((verdicts[:, 0] == 1).mean()),
        "kept_by_category": {c: float(kept[categories == c].mean()) for c in dict.fromkeys(categories)},
        "verdicts": verdicts.tolist(),
    }
    write_json(record_path, verification, indent=1)
    return verification


def verification_summary(verification: dict | None) -> dict | None:
    """A verified corpus's record without the per-prompt verdicts, for reports."""
    return {k: v for k, v in verification.items() if k != "verdicts"} if verification else None


def cache_text_embeddings(cfg, source_dir: Path) -> None:
    """Where the trainer config ``cfg`` would encode its captions on every batch
    (``data.embeddings: auto`` and no cache yet), encode every caption of its corpus, the empty
    prompt and its sample prompts once with the source's frozen text encoder into
    ``<data.path>/embeddings``, which ``auto`` then finds. Encoding on every batch took 110 of the
    826 ms of a toy training step on the CPU (batch 16, one thread). Resumes: captions already
    cached are skipped."""
    from l2p.data.embed import build_embedding_cache

    if cfg.data.embeddings == "auto":
        build_embedding_cache(source_dir, cfg.data.path, progress=False, extra_captions=cfg.sample.prompts)


def write_real_corpus(records: list[PromptRecord], out: Path, size: int) -> Path:
    """Ground-truth renders of ``records``."""
    from l2p.toy.render import render

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for rec in records:
        name = f"images/{rec.index:06d}.png"
        path = out / name
        if not path.exists():
            with atomic_path(path) as tmp:
                render(rec.scene, size).save(tmp, format="PNG")
        rows.append({"file_name": name, "text": rec.prompt})
    with atomic_path(out / "metadata.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return out
