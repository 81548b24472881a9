"""Training tiny DiT (DDPM epsilon, class labels as captions) and Qwen-Image (flow with
exponential dynamic shift, Qwen2.5-VL captions of any length) sources: the loss falls on a
fixed batch and frozen weights stay the source's."""

from __future__ import annotations

import csv

import pytest
import torch

from _trainkit import make_config, make_images
from l2p import testing
from l2p.train.loop import Trainer

BUILDERS = {"dit": testing.build_tiny_dit_pipeline, "qwen_image": testing.build_tiny_qwen_image_pipeline}
# DiT captions are classes: names of its id2label, ids as digits.
DIT_CAPTIONS = ["goldfish", "207", "tench", "1", "Tinca tinca", "golden retriever", "0", "5"]
SAMPLE_PROMPTS = {"dit": "[goldfish, 207]", "qwen_image": "[a red square, a blue disc]"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for name, build in BUILDERS.items():
        build(root / name)
    return {name: root / name for name in BUILDERS}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    text = make_images(root / "text", n=8)
    classes = make_images(root / "classes", n=8)
    with open(classes / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row, caption in zip(rows, DIT_CAPTIONS):
        row["text"] = caption
    with open(classes / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return {"dit": classes, "qwen_image": text}


@pytest.mark.parametrize("family", BUILDERS)
def test_loss_falls_and_frozen_weights_stay(family, sources, data, tmp_path):
    cfg = make_config(sources[family], data[family], tmp_path / "run", train__max_steps=10, optim__lr=3e-3,
                      optim__schedule="constant", optim__warmup_steps=0, data__caption_dropout=0.0,
                      sample__every=0, sample__prompts=SAMPLE_PROMPTS[family], sample__seeds="[0]",
                      sample__steps=2, checkpoint__every=0)
    trainer = Trainer(cfg)
    assert trainer.model.config.patch_size == 4  # both VAE factors are 2 (Qwen's counted as convert does)
    batch = trainer._micro_batch(step=0, slots=[0, 1, 2, 3], batch=trainer._load([0, 1, 2, 3]))
    with torch.no_grad():
        before = trainer._loss(*batch).item()
        # In train mode too, the loss of a fixed batch is fixed (DiT's own label dropout is off).
        assert trainer._loss(*batch).item() == before
    result = trainer.run()
    with torch.no_grad():
        after = trainer._loss(*batch).item()
    assert after < 0.95 * before, (before, after, result.losses)

    import diffusers
    source = getattr(diffusers, trainer.source.transformer_class).from_pretrained(str(sources[family] / "transformer"))
    src = dict(source.named_parameters())
    frozen = [(n, p) for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert frozen and trainer.trainable_report.trainable_blocks
    for name, p in frozen:
        assert torch.equal(p, src[name.removeprefix("transformer.")]), name
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    assert (result.final_dir / "pipeline" / "model_index.json").is_file()


def test_dit_caption_dropout_is_the_null_class(sources, data, tmp_path):
    """data.caption_dropout drops to the null class; the label embedders' own random dropout
    (one per block, from the global RNG) is off."""
    from diffusers.models.embeddings import LabelEmbedding

    trainer = Trainer(make_config(sources["dit"], data["dit"], tmp_path / "run", data__caption_dropout=0.5))
    embedders = [m for m in trainer.model.modules() if isinstance(m, LabelEmbedding)]
    assert len(embedders) == 3 and all(m.dropout_prob == 0 for m in embedders) and trainer.model.training
    cond = trainer._micro_batch(step=0, slots=list(range(8)), batch=trainer._load(list(range(8)))).cond
    labels = trainer.family.call(cond, torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), trainer.model,
                                 1.0)["class_labels"].tolist()
    expected = [1, 207, 0, 1, 0, 207, 0, 5]
    assert 1000 in labels and all(got in (want, 1000) for got, want in zip(labels, expected)), labels


def test_qwen_image_captions_of_any_length_share_a_batch(sources, data, tmp_path):
    """Caption dropout puts the empty caption's (shorter) embeddings beside full captions."""
    trainer = Trainer(make_config(sources["qwen_image"], data["qwen_image"], tmp_path / "run",
                                  data__caption_dropout=0.5))
    batch = trainer._micro_batch(step=0, slots=list(range(8)), batch=trainer._load(list(range(8))))
    lengths = {e.shape[0] for e in batch.cond["prompt_embeds"]}
    assert len(lengths) == 2, lengths  # captions and the empty caption
    with torch.no_grad():
        assert torch.isfinite(trainer._loss(*batch))


@pytest.mark.parametrize("family", BUILDERS)
def test_the_embedding_cache_gives_the_text_encoders_conditioning(family, sources, data, tmp_path):
    """Class ids (DiT) and unpadded per-caption rows (Qwen-Image) come back from the cache as
    the family's conditioning computes them, so a run from the cache trains on the same batch."""
    from l2p.data.embed import build_embedding_cache

    build_embedding_cache(sources[family], data[family], out=tmp_path / "cache", batch_size=3, progress=False)
    runs = [Trainer(make_config(sources[family], data[family], tmp_path / name, data__caption_dropout=0.5, **extra))
            for name, extra in (("encoders", {}), ("cached", {"data__embeddings": tmp_path / "cache"}))]
    (x0_a, cond_a, *_), (x0_b, cond_b, *_) = (
        t._micro_batch(step=0, slots=list(range(8)), batch=t._load(list(range(8)))) for t in runs)
    torch.testing.assert_close(x0_a, x0_b, rtol=0, atol=0)
    assert cond_a.keys() == cond_b.keys()
    for name in cond_a:
        a, b = cond_a[name], cond_b[name]
        for x, y in zip(a, b) if isinstance(a, list) else [(a, b)]:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
