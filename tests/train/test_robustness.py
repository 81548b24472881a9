"""Non-finite steps, gradient checkpointing, background loading and low-memory mode."""

from __future__ import annotations

import pytest
import torch

from _trainkit import make_config
from l2p.train.config import ConfigError
from l2p.train.loop import NonFiniteLossError, Trainer


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _poison(trainer, bad_steps):
    """Make the loss NaN at the given (0-based) steps."""
    real = trainer._loss_and_parts

    def loss(*args):
        value, parts = real(*args)
        return (value * float("nan") if trainer.step in bad_steps else value), parts

    trainer._loss_and_parts = loss


def test_nonfinite_step_is_skipped_and_counted(sources, images, tmp_path):
    trainer = Trainer(make_config(sources["pixart"], images, tmp_path / "run", train__max_steps=3))
    _poison(trainer, {1})
    trainer.train_step()
    before, ema_before = _params(trainer), {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    opt_before = trainer.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    loss, _, finite = trainer.train_step()
    assert not finite and loss != loss and trainer.skipped_steps == 1 and trainer.step == 2
    after = _params(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(ema_before[k], v) for k, v in trainer.ema.state_dict().items())
    assert torch.equal(opt_before, trainer.optimizer.state_dict()["state"][0]["exp_avg"])
    _, _, finite = trainer.train_step()
    assert finite and trainer.consecutive_nonfinite == 0
    assert any(not torch.equal(after[k], v) for k, v in _params(trainer).items())


def test_too_many_nonfinite_steps_stop_with_advice(sources, images, tmp_path):
    trainer = Trainer(make_config(sources["pixart"], images, tmp_path / "run", train__max_nonfinite_steps=2))
    _poison(trainer, set(range(100)))
    with pytest.raises(NonFiniteLossError, match=r"2 steps in a row \(the last at step 2.*non-finite in the last "
                                                  r"one: the model's output.*lower optim.lr.*fp32.*data"):
        trainer.run()


def test_nonfinite_conditioning_is_named(sources, images, tmp_path):
    """A NaN in the text conditioning (a broken embedding cache, say) is what the error names."""
    trainer = Trainer(make_config(sources["pixart"], images, tmp_path / "run", train__max_nonfinite_steps=1))
    real = trainer.text

    def text(captions):
        cond = real(captions)
        name = next(k for k, v in cond.items() if torch.is_tensor(v) and v.is_floating_point())
        return {**cond, name: cond[name] * float("nan")}

    trainer.text = text
    with pytest.raises(NonFiniteLossError, match=r"non-finite in the last one: conditioning '"):
        trainer.run()


def test_gradient_checkpointing_and_workers_change_nothing(sources, images, tmp_path):
    base = Trainer(make_config(sources["sd3"], images, tmp_path / "a", train__max_steps=2,
                               logging__tensorboard="true", logging__every=1))
    base.run()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/peak_memory_gb"} \
        <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    other = Trainer(make_config(sources["sd3"], images, tmp_path / "b", train__max_steps=2,
                                model__gradient_checkpointing="all", data__num_workers=1))
    other.run()
    a, b = _params(base), _params(other)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_low_memory_needs_the_cache(sources, images, tmp_path):
    with pytest.raises(ConfigError, match="l2p data embed"):
        Trainer(make_config(sources["sd3"], images, tmp_path / "run", low_memory__enabled="true"))


def test_captions_missing_from_the_cache_are_refused_at_the_start(sources, images, tmp_path):
    """An image added after `l2p data embed` would fail only when drawn (hours in, and under
    torchrun on one rank, leaving the others waiting): the trainer refuses it before training."""
    import csv
    import shutil

    from l2p.data.embed import build_embedding_cache

    data = tmp_path / "data"
    shutil.copytree(images, data)
    build_embedding_cache(sources["pixart"], data, progress=False, device="cpu")
    shutil.copy(data / "img_000.png", data / "img_new.png")
    with open(data / "metadata.csv", "a", newline="") as f:
        csv.writer(f).writerow(["img_new.png", "a caption added after embedding"])
    with pytest.raises(ConfigError, match=r"1 captions .* not in the text-embedding cache .*'a caption added after "
                                          r"embedding'.*l2p data embed"):
        Trainer(make_config(sources["pixart"], data, tmp_path / "run", data__embeddings="auto"))


def test_low_memory_trains_from_cached_embeddings(sources, images, tmp_path):
    import shutil

    from l2p.data.embed import EmbeddingCache, build_embedding_cache

    data = tmp_path / "data"
    shutil.copytree(images, data)
    build_embedding_cache(sources["flux"], data, progress=False, device="cpu")
    trainer = Trainer(make_config(sources["flux"], data, tmp_path / "run", train__max_steps=2,
                                  data__embeddings="auto", low_memory__enabled="true"))
    assert isinstance(trainer.text, EmbeddingCache)
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in trainer.params)
    result = trainer.run()
    assert all(torch.isfinite(torch.tensor(result.losses)))

    # The export is the source + the delta, as `l2p merge` writes it: the frozen tensors as the
    # float32 source stores them, not the bf16 copies the run held.
    from safetensors.torch import load_file

    from l2p.conversion import convert_folder, merge_folder

    final = tmp_path / "run" / "final"
    convert_folder(sources["flux"], tmp_path / "converted", head=trainer._head_config(),
                   seed=trainer.cfg.model.init_seed)
    merge_folder(tmp_path / "converted", final / "delta.safetensors", tmp_path / "merged")

    def stored(folder):
        return {k: v for f in sorted((folder / "transformer").glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    exported, expected = stored(final / "pipeline"), stored(tmp_path / "merged")
    assert exported.keys() == expected.keys()
    assert all(exported[k].dtype == v.dtype and torch.equal(exported[k], v) for k, v in expected.items())
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert frozen and all(exported[n].dtype == torch.float32 for n in frozen)
    assert not (final / ".pipeline-unmerged").exists()


def test_sample_grid_from_the_embedding_cache_needs_its_prompts_cached(sources, images, tmp_path, capsys):
    import shutil

    from l2p.cli import main
    from l2p.data.embed import EmbeddingCache

    data = tmp_path / "data"
    shutil.copytree(images, data)
    prompt = "a red square beside a disc"
    assert main(["data", "embed", "--source", str(sources["pixart"]), "--data", str(data),
                 "--device", "cpu", "--prompt", prompt]) == 0
    assert prompt in EmbeddingCache(data / "embeddings") and "" in EmbeddingCache(data / "embeddings")
    trainer = Trainer(make_config(sources["pixart"], data, tmp_path / "run", data__embeddings="auto",
                                  sample__prompts=f"[{prompt}]", sample__steps=2))
    assert isinstance(trainer.text, EmbeddingCache) and trainer.sample_grid("cached").is_file()

    # A sample prompt the cache lacks: no grid, and the log says how to add it.
    trainer.cfg.sample.prompts = ["a prompt nobody cached"]
    capsys.readouterr()
    assert trainer.sample_grid("missing") is None
    log = capsys.readouterr().out
    assert "no sample grid" in log and "a prompt nobody cached" in log and "--prompt TEXT" in log


def test_gradient_accumulation_equals_the_larger_batch(sources, images, tmp_path):
    big = Trainer(make_config(sources["pixart"], images, tmp_path / "a", train__max_steps=2, train__batch_size=4))
    big.run()
    accum = Trainer(make_config(sources["pixart"], images, tmp_path / "b", train__max_steps=2, train__batch_size=2,
                                train__grad_accum=2))
    accum.run()
    a, b = _params(big), _params(accum)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_caption_dropout_swaps_in_the_empty_caption(sources, images, tmp_path):
    trainer = Trainer(make_config(sources["sd3"], images, tmp_path / "run", data__caption_dropout=1.0))
    cond = trainer._micro_batch(0, [0, 1], trainer._load([0, 1])).cond
    for name, value in cond.items():
        assert torch.equal(value, trainer.empty[name].expand_as(value)), name
    kept = Trainer(make_config(sources["sd3"], images, tmp_path / "run2", data__caption_dropout=0.0))
    cond = kept._micro_batch(0, [0, 1], kept._load([0, 1])).cond
    assert not torch.equal(cond["prompt_embeds"][0], kept.empty["prompt_embeds"][0])


def test_aspect_ratio_buckets_batch_one_shape_and_resume_exactly(sources, tmp_path):
    import _trainkit as kit

    data = kit.make_images(tmp_path / "data", n=12, sizes=[(48, 24), (24, 48), (32, 32)])
    extra = dict(data__bucket_max_aspect=2.0, train__max_steps=4, checkpoint__every=2)
    trainer = Trainer(make_config(sources["sd3"], data, tmp_path / "a", **extra))
    shapes = set()
    for step in range(6):
        indices, trainer.position = trainer.plan.take(trainer.position)
        batch = trainer._load(indices[:2])
        shapes.add(tuple(batch["pixel_values"].shape[-2:]))
    assert len(shapes) > 1 and all(h % 4 == 0 and w % 4 == 0 for h, w in shapes)
    straight = Trainer(make_config(sources["sd3"], data, tmp_path / "b", **extra))
    straight.run()
    Trainer(make_config(sources["sd3"], data, tmp_path / "c", **dict(extra, train__max_steps=2))).run()
    resumed = Trainer(make_config(sources["sd3"], data, tmp_path / "c", train__resume="latest", **extra))
    resumed.run()
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_caption_column_named_for_embed_is_named_for_training_too(sources, images, tmp_path):
    """metadata.csv with two caption columns: `l2p data embed --caption-column long` caches the
    long captions, and data.caption_column=long trains on them from the cache; left at its
    default the trainer reads 'text' and says the cache may hold another column."""
    import csv
    import shutil

    from l2p.cli import main
    from l2p.data.embed import EmbeddingCache

    data = tmp_path / "data"
    shutil.copytree(images, data)
    with open(data / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(data / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text", "long"])
        writer.writeheader()
        writer.writerows({"file_name": r["file_name"], "text": r["text"], "long": f"a longer caption {i}"}
                         for i, r in enumerate(rows))
    assert main(["data", "embed", "--source", str(sources["pixart"]), "--data", str(data), "--device", "cpu",
                 "--caption-column", "long"]) == 0
    trainer = Trainer(make_config(sources["pixart"], data, tmp_path / "run", data__embeddings="auto",
                                  data__caption_column="long", train__max_steps=1))
    assert isinstance(trainer.text, EmbeddingCache)
    assert {f.caption for f in trainer.dataset.files} == {f"a longer caption {i}" for i in range(len(rows))}
    trainer.run()
    with pytest.raises(ConfigError, match="another caption column .*data.caption_column"):
        Trainer(make_config(sources["pixart"], data, tmp_path / "run2", data__embeddings="auto"))
