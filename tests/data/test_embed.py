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
    index["source"] = "/elsewhere"  # the same model, found at another path: its digest decides
    (data / "embeddings" / "index.json").write_text(json.dumps(index))
    assert build_embedding_cache(tiny_pixart, data, device="cpu", progress=False)["encoded"] == 0
    del index["source_digest"]  # an index from before the digest: the path decides
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


def test_cache_refuses_another_dtype_device_type_or_model(tiny_pixart, data, tmp_path, caplog):
    import shutil

    from l2p.testing import build_tiny_pixart_sigma_pipeline

    out = tmp_path / "cache"
    build_embedding_cache(tiny_pixart, data, out=out, device="cpu", progress=False)
    index_file = out / "index.json"
    index = json.loads(index_file.read_text())
    assert (index["dtype"], index["device_type"]) == ("float32", "cpu")
    new = ["a caption never cached"]
    with pytest.raises(ValueError, match="dtype float32, not bfloat16.*--dtype float32"):
        build_embedding_cache(tiny_pixart, data, out=out, device="cpu", dtype="bfloat16", progress=False,
                              extra_captions=new)
    with pytest.raises(ValueError, match="device_type cpu, not cuda.*--device cpu"):  # before any load
        build_embedding_cache(tiny_pixart, data, out=out, device="cuda", dtype="float32", progress=False,
                              extra_captions=new)
    # Another model saved at the same path as the cache's source.
    other = tmp_path / "other"
    shutil.copytree(tiny_pixart, other)
    build_embedding_cache(other, data, out=tmp_path / "cache2", device="cpu", progress=False)
    shutil.rmtree(other)
    build_tiny_pixart_sigma_pipeline(other, seed=1)
    with pytest.raises(ValueError, match="another model"):
        build_embedding_cache(other, data, out=tmp_path / "cache2", device="cpu", progress=False,
                              extra_captions=new)

    # An index from before dtype and device type were recorded: the cached tensors tell the dtype.
    for key in ("dtype", "device_type"):
        del index[key]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="caches 'prompt_[a-z_]+' as torch.float32.*nothing was written"):
        build_embedding_cache(tiny_pixart, data, out=out, device="cpu", dtype="bfloat16", progress=False,
                              extra_captions=new)
    assert json.loads(index_file.read_text()) == index
    summary = build_embedding_cache(tiny_pixart, data, out=out, device="cpu", progress=False, extra_captions=new)
    assert summary["encoded"] == 1 and "predates the recording of the device type" in caplog.text
    assert json.loads(index_file.read_text())["dtype"] == "float32"


def test_a_missing_or_cut_short_shard_is_refused_at_open_and_encoded_again(tiny_pixart, data, caplog):
    build_embedding_cache(tiny_pixart, data, shard_size=2, device="cpu", progress=False)
    cache_dir = data / "embeddings"
    before = EmbeddingCache(cache_dir)
    # Copies: the cache's tensors map its files, and one is about to be cut short.
    expected = {c: (before[c]["prompt_embeds"].clone(), before[c]["prompt_attention_mask"].clone())
                for c in before.captions}
    shards = before.index["shards"]
    del before
    whole = (cache_dir / shards[1]).read_bytes()
    (cache_dir / shards[1]).write_bytes(whole[:len(whole) // 2])  # an interrupted copy
    (cache_dir / shards[2]).unlink()
    with pytest.raises(ValueError, match=r"shard-00001.safetensors is unreadable .*2 damaged shards.*"
                                         r"l2p data embed"):
        EmbeddingCache(cache_dir)
    summary = build_embedding_cache(tiny_pixart, data, shard_size=2, device="cpu", progress=False)
    assert (summary["encoded"], summary["cached_before"]) == (4, 2)
    assert "shard-00002.safetensors is missing; encoding its captions again" in caplog.text
    after = EmbeddingCache(cache_dir)
    assert sorted(after.captions) == sorted(expected)
    for caption, (embeds, mask) in expected.items():
        got = after[caption]
        torch.testing.assert_close(got["prompt_attention_mask"], mask)
        # Encoded in another batch: the same values wherever the mask lets the model look.
        torch.testing.assert_close(got["prompt_embeds"][mask.bool()], embeds[mask.bool()], atol=1e-5, rtol=1e-5)


def test_under_torchrun_only_rank_0_embeds(tiny_pixart, data, tmp_path, capsys, monkeypatch):
    """Every rank encoded every caption into the same files, all on the default GPU."""
    from l2p.cli import main

    out = tmp_path / "cache"
    args = ["data", "embed", "--source", str(tiny_pixart), "--data", str(data), "--out", str(out), "--device", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0
    assert "runs on rank 0 only" in capsys.readouterr().out and not out.exists()
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0
    assert (out / "index.json").is_file()
