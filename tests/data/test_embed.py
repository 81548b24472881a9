"""The prompt-embedding cache: the round trip against encode_prompt, shards, incremental
updates, the dataset and trainer views, the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from l2p.cli import main
from l2p.data.dataset import ImageCaptionDataset
from l2p.data.embed import EmbeddingCache, build_embedding_cache
from l2p.data.generate import load_pipeline

CAPTIONS = ["a red fox in the snow", "a blue car", "a red fox in the snow", "a bowl of ramen, steaming",
            "ünïcödé caption ✓", "a lighthouse"]


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    with (root / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for i, caption in enumerate(CAPTIONS):
            Image.fromarray(np.full((16, 16, 3), i * 40, np.uint8)).save(root / f"images/{i}.png")
            writer.writerow([f"images/{i}.png", caption])
    return root


def test_cache_round_trip(tiny_pixart, data):
    summary = build_embedding_cache(tiny_pixart, data, batch_size=2, shard_size=2, device="cpu", progress=False)
    unique = ["", *dict.fromkeys(CAPTIONS)]
    assert summary == {"captions": len(unique), "cached_before": 0, "encoded": len(unique),
                       "out": str(data / "embeddings")}
    cache = EmbeddingCache(data / "embeddings")
    assert sorted(cache.captions) == sorted(unique) and len(cache) == 6
    assert cache.names == ["prompt_attention_mask", "prompt_embeds"]
    assert len(cache.index["shards"]) == 3
    assert cache.index["pipeline"] == "PixArtSigmaPipeline"

    pipe = load_pipeline(tiny_pixart)
    for caption in unique:
        embeds, mask, _, _ = pipe.encode_prompt([caption], do_classifier_free_guidance=False, device="cpu")
        got = cache[caption]
        assert set(got) == {"prompt_embeds", "prompt_attention_mask"}
        torch.testing.assert_close(got["prompt_embeds"], embeds[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["prompt_attention_mask"], mask[0])
    batch = cache(["a blue car", ""])
    assert batch["prompt_embeds"].shape == (2, 300, 32) and batch["prompt_attention_mask"].shape == (2, 300)
    with pytest.raises(KeyError, match="re-run `l2p data embed`"):
        cache["never seen"]

    # The dataset hands out the cached tensors of the caption it returns (after dropout).
    ds = ImageCaptionDataset(data, size=16, caption_dropout=1.0, embeddings=cache)
    item = ds[0]
    assert item["text"] == ""
    torch.testing.assert_close(item["embeddings"]["prompt_embeds"], cache[""]["prompt_embeds"])


def test_cache_is_incremental(tiny_pixart, data, monkeypatch):
    build_embedding_cache(tiny_pixart, data, shard_size=4, device="cpu", progress=False)
    with (data / "metadata.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["images/0.png", "a new caption"])
    summary = build_embedding_cache(tiny_pixart, data, shard_size=4, device="cpu", progress=False)
    assert (summary["encoded"], summary["cached_before"]) == (1, 6)
    cache = EmbeddingCache(data / "embeddings")
    assert "a new caption" in cache and len(cache.index["shards"]) == 3
    again = build_embedding_cache(tiny_pixart, data, device="cpu", progress=False)
    assert again["encoded"] == 0  # nothing to do: the pipeline is not even loaded
    index = json.loads((data / "embeddings" / "index.json").read_text())
    index["source"] = "/elsewhere"
    (data / "embeddings" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="caches embeddings of '/elsewhere'"):
        build_embedding_cache(tiny_pixart, data, device="cpu", progress=False)


def test_cli_embed(tiny_pixart, data, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["data", "embed", "--source", str(tiny_pixart), "--data", str(data), "--out", str(out),
                 "--batch-size", "8", "--device", "cpu"]) == 0
    assert "6 captions encoded" in capsys.readouterr().out
    assert len(EmbeddingCache(out)) == 6
    with pytest.raises(FileNotFoundError, match="l2p data embed"):
        EmbeddingCache(tmp_path)


def test_a_cache_of_another_format_is_refused(tiny_pixart, data):
    build_embedding_cache(tiny_pixart, data, device="cpu", progress=False)
    index_file = data / "embeddings" / "index.json"
    index = json.loads(index_file.read_text())
    index["format"] = 1
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="format 1.*run `l2p data embed` again"):
        EmbeddingCache(data / "embeddings")
    with pytest.raises(ValueError, match="format 1"):
        build_embedding_cache(tiny_pixart, data, device="cpu", progress=False)


def test_non_finite_embeddings_are_refused(tiny_pixart, data, monkeypatch):
    import l2p.data.embed as embed

    real = embed.encode_captions

    def broken(pipe, source_class, captions, device):
        rows, list_names = real(pipe, source_class, captions, device)
        rows[-1]["prompt_embeds"][0, 0] = float("nan")
        return rows, list_names

    monkeypatch.setattr(embed, "encode_captions", broken)
    with pytest.raises(ValueError, match="non-finite 'prompt_embeds'.*--dtype float32"):
        build_embedding_cache(tiny_pixart, data, device="cpu", progress=False)
    assert not list((data / "embeddings").glob("shard-*"))
