"""The training dataset: metadata.csv and plain folders, crops, buckets, caption dropout,
corrupt and missing images, file names that escape the folder."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from l2p.data.dataset import AspectRatioBucketSampler, ImageCaptionDataset, list_captioned_files, make_buckets
from l2p.data.generate import MANIFEST, rebuild_metadata


def _image(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _metadata(root, rows, fields=("file_name", "text")):
    with (root / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows(rows)


@pytest.fixture
def generated(tmp_path):
    root = tmp_path / "gen"
    rows = []
    for i in range(6):
        name = f"images/0000/{i:07d}_000.png"
        _image(root / name, 32, 32, seed=i)
        rows.append((name, f"caption {i}"))
    _metadata(root, rows)
    return root


def test_metadata_folder_items(generated):
    ds = ImageCaptionDataset(generated, size=16)
    assert len(ds) == 6 and not ds.skipped
    item = ds[2]
    x = item["pixel_values"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    assert item["text"] == "caption 2" and item["index"] == 2
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["text"] == ["caption 0", "caption 1"]


def test_exact_size_is_untouched_and_crop_is_centered(tmp_path):
    root = tmp_path / "d"
    _image(root / "wide.png", 64, 32)
    _metadata(root, [("wide.png", "a wide image")])
    full = ImageCaptionDataset(root, size=(32, 64))[0]["pixel_values"]
    ref = torch.from_numpy(np.array(Image.open(root / "wide.png"))).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(full, ref)
    crop = ImageCaptionDataset(root, size=32)[0]["pixel_values"]
    torch.testing.assert_close(crop, ref[:, :, 16:48])  # scale 1: the middle square


def test_plain_folder_with_sidecar_captions(tmp_path):
    root = tmp_path / "real"
    _image(root / "a.jpg", 40, 30)
    (root / "a.txt").write_text("a photo of a\n")
    _image(root / "sub" / "b.png", 30, 40)
    (root / "sub" / "b.txt").write_text("b")
    _image(root / "c.webp", 20, 20)
    _image(root / ".hidden.png", 20, 20)
    (root / "notes.md").write_text("not an image")
    with pytest.warns(RuntimeWarning, match="1 of 3 images have no .txt caption"):
        ds = ImageCaptionDataset(root, size=16)
    assert [f.file_name for f in ds.files] == ["a.jpg", "c.webp", "sub/b.png"]
    assert [ds[i]["text"] for i in range(3)] == ["a photo of a", "", "b"]
    assert ds.missing_captions == 1


def test_corrupt_and_missing_images_are_skipped_and_counted(generated):
    (generated / "images/0000/0000001_000.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    data = (generated / "images/0000/0000003_000.png").read_bytes()
    (generated / "images/0000/0000003_000.png").write_bytes(data[: len(data) // 2])  # truncated
    (generated / "images/0000/0000004_000.png").unlink()
    with pytest.warns(RuntimeWarning, match=r"skipped 3 of 6 images .*'corrupt': 2.*'missing': 1"):
        ds = ImageCaptionDataset(generated, size=16)
    assert ds.skipped == {"corrupt": 2, "missing": 1}
    assert [ds[i]["text"] for i in range(len(ds))] == ["caption 0", "caption 2", "caption 5"]


def test_min_side_skips_small_images(tmp_path):
    root = tmp_path / "d"
    _image(root / "big.png", 64, 64)
    _image(root / "small.png", 64, 16)
    _metadata(root, [("big.png", "big"), ("small.png", "small")])
    with pytest.warns(RuntimeWarning, match="too_small"):
        ds = ImageCaptionDataset(root, size=32, min_side=32)
    assert len(ds) == 1 and ds.skipped == {"too_small": 1}


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "images/../../outside.png",
                                  "C:/Windows/x.png", "..\\outside.png"])
def test_file_names_that_escape_are_rejected(tmp_path, name):
    root = tmp_path / "d"
    _image(root / "ok.png", 8, 8)
    _metadata(root, [("ok.png", "fine"), (name, "bad")])
    with pytest.raises(ValueError, match=r"metadata.csv line 3: file_name .* escapes the dataset folder"):
        ImageCaptionDataset(root, size=8)


def test_symlink_escaping_the_folder_is_rejected(tmp_path):
    root = tmp_path / "d"
    _image(tmp_path / "secret.png", 8, 8)
    _image(root / "ok.png", 8, 8)
    os.symlink(tmp_path / "secret.png", root / "link.png")
    _metadata(root, [("ok.png", "fine"), ("link.png", "bad")])
    with pytest.raises(ValueError, match="line 3: file_name 'link.png' resolves outside"):
        list_captioned_files(root)
    os.symlink(root / "ok.png", root / "inner.png")  # a link that stays inside is fine
    _metadata(root, [("inner.png", "fine")])
    assert len(ImageCaptionDataset(root, size=8)) == 1


def test_caption_dropout_is_deterministic_per_seed_and_epoch(generated):
    ds = ImageCaptionDataset(generated, size=8, caption_dropout=0.5, seed=3)
    pattern = [ds.caption(i) == "" for i in range(len(ds))]
    assert pattern == [ImageCaptionDataset(generated, size=8, caption_dropout=0.5, seed=3).caption(i) == ""
                       for i in range(len(ds))]
    patterns = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        patterns.add(tuple(ds[i]["text"] == "" for i in range(len(ds))))
    assert len(patterns) > 1
    assert all(ImageCaptionDataset(generated, size=8, caption_dropout=1.0)[i]["text"] == "" for i in range(6))
    with pytest.raises(ValueError, match="caption_dropout"):
        ImageCaptionDataset(generated, caption_dropout=1.5)


def test_make_buckets():
    buckets = make_buckets(1024, 16)
    assert (1024, 1024) in buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert 0.5 <= w / h <= 2.0
        assert abs(h * w / 1024**2 - 1) < 0.1
    assert make_buckets(64, 16) == [(48, 80), (64, 64), (80, 48)]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        make_buckets(100, 16)


def test_bucket_sampler(tmp_path):
    root = tmp_path / "d"
    rows = []
    for i, (w, h) in enumerate([(64, 32)] * 5 + [(32, 32)] * 4 + [(32, 64)] * 3):
        _image(root / f"{i}.png", w, h, seed=i)
        rows.append((f"{i}.png", f"c{i}"))
    _metadata(root, rows)
    buckets = make_buckets(32, 8, step=8)
    ds = ImageCaptionDataset(root, buckets=buckets)
    assert {ds.target_size(0), ds.target_size(5), ds.target_size(9)} == {(24, 40), (32, 32), (40, 24)}

    sampler = AspectRatioBucketSampler(ds, batch_size=2, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(12)) and len(sampler) == len(batches)
    for b in batches:
        assert len({ds.target_size(i) for i in b}) == 1
        shapes = {ds[i]["pixel_values"].shape for i in b}
        assert len(shapes) == 1 and all(s[1] % 8 == 0 and s[2] % 8 == 0 for s in shapes)
    assert batches == list(AspectRatioBucketSampler(ds, batch_size=2, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != batches

    full = AspectRatioBucketSampler(ds, batch_size=2, seed=1, drop_last=True)
    assert all(len(b) == 2 for b in full)
    r0 = list(AspectRatioBucketSampler(ds, batch_size=2, seed=1, rank=0, world_size=2))
    r1 = list(AspectRatioBucketSampler(ds, batch_size=2, seed=1, rank=1, world_size=2))
    assert len(r0) == len(r1) and not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    assert sum(len(b["text"]) for b in loader) == 12


def test_truncated_jpeg_is_skipped_and_counted(tmp_path):
    """PIL's verify() reads no JPEG data: the probe must decode to see the truncation."""
    import io

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "whole.jpg").write_bytes(buf.getvalue())
    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 2 images \(\{'corrupt': 1\}\), e.g. cut.jpg"):
        ds = ImageCaptionDataset(tmp_path, size=32)
    assert [f.file_name for f in ds.files] == ["whole.jpg"] and ds.skipped == {"corrupt": 1}
    assert ds[0]["pixel_values"].shape == (3, 32, 32)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    with pytest.warns(RuntimeWarning, match="no .txt caption"):
        ds = ImageCaptionDataset(tmp_path, size=16)
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode in ("I;16", "I")
    grey, white = (ds[i]["pixel_values"] for i in range(2))
    assert abs(grey.mean().item() - (128 / 127.5 - 1)) < 1e-6  # 32768 / 257 -> 128: mid grey
    assert white.min().item() == 1.0


def test_exif_orientation_is_applied_to_size_bucket_and_pixels(tmp_path):
    """A photo stored 64 wide x 32 high with EXIF orientation 6 (rotate 90 clockwise) is shown
    32 wide x 64 high: its bucket and crop must follow what is shown."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = 255  # left half white -> top half white once rotated
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=95)
    (tmp_path / "turned.txt").write_text("a turned photo")
    ds = ImageCaptionDataset(tmp_path, buckets=[(32, 64), (64, 32)])
    assert ds.image_sizes == [(32, 64)] and ds.target_size(0) == (64, 32)
    pixels = ds[0]["pixel_values"]
    assert pixels.shape == (3, 64, 32)
    assert pixels[:, :24].mean() > 0.9 and pixels[:, 40:].mean() < -0.9


def test_metadata_csv_with_a_bom(tmp_path):
    _image(tmp_path / "a.png", 16, 16)
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,a caption\n".encode("utf-8-sig"))
    assert [f.caption for f in list_captioned_files(tmp_path)] == ["a caption"]


def test_a_generated_folder_without_metadata_or_with_unlisted_images_says_to_merge(generated):
    (generated / MANIFEST).write_text("{}")  # what `l2p data generate` writes before its first image
    # An interrupted generate run: images rendered after metadata.csv was last written.
    _image(generated / "images/0000/0000006_000.png", 32, 32)
    _image(generated / "images/0000/.0000007_000.rank0.tmp.png", 32, 32)  # unfinished: not an image yet
    with pytest.warns(RuntimeWarning, match=r"1 generated images are not in metadata.csv "
                                             r"\(e.g. images/0000/0000006_000.png\).*--merge-only"):
        assert len(ImageCaptionDataset(generated, size=16)) == 6
    # Interrupted before metadata.csv was first written: read as a plain folder, every image
    # would train with the empty caption.
    (generated / "metadata.csv").unlink()
    with pytest.raises(ValueError, match="no metadata.csv yet.*l2p data generate --merge-only --out"):
        ImageCaptionDataset(generated, size=16)


def test_captions_not_in_utf8_are_named_and_a_bom_is_dropped(tmp_path, generated):
    latin1 = "file_name,text\nimages/0000/0000000_000.png,caf\xe9\n".encode("latin-1")
    (generated / "metadata.csv").write_bytes(latin1)
    with pytest.raises(ValueError, match=r"metadata.csv is not UTF-8 text .*save it with the UTF-8 encoding"):
        ImageCaptionDataset(generated, size=16)
    with pytest.raises(ValueError, match=r"metadata.csv is not UTF-8 text"):
        rebuild_metadata(generated)
    root = tmp_path / "real"
    _image(root / "a.png", 16, 16)
    _image(root / "b.png", 16, 16)
    (root / "a.txt").write_bytes("a caption written by Notepad".encode("utf-8-sig"))
    (root / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"b.txt is not UTF-8 text"):
        ImageCaptionDataset(root, size=16)
    (root / "b.txt").write_text("café")
    assert [f.caption for f in list_captioned_files(root)] == ["a caption written by Notepad", "café"]


def test_empty_captions_in_metadata_are_counted_and_warned(tmp_path):
    root = tmp_path / "d"
    for name in ("a.png", "b.png", "c.png"):
        _image(root / name, 16, 16)
    # 'text' comes first among the caption columns, and is empty where 'caption' is filled.
    _metadata(root, [("a.png", "", "a cat"), ("b.png", "", "a dog"), ("c.png", "a bird", "a bird")],
              fields=("file_name", "text", "caption"))
    with pytest.warns(RuntimeWarning, match="2 of 3 images have an empty caption in metadata.csv"):
        ds = ImageCaptionDataset(root, size=16)
    assert ds.missing_captions == 2 and [f.caption for f in ds.files] == ["", "", "a bird"]


def test_transparent_pixels_are_white_not_their_hidden_colours(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[:, :4, 3] = 0  # left half transparent, over arbitrary stored colours
    rgba[:, 4:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    grey_alpha = np.stack([np.full((8, 8), 40, np.uint8), np.full((8, 8), 128, np.uint8)], axis=-1)
    Image.fromarray(grey_alpha, "LA").save(root / "la.png")
    palette = Image.fromarray(np.zeros((8, 8), np.uint8), "P")
    palette.putpalette([10, 20, 30] * 256)
    palette.save(root / "palette.png", transparency=0)  # palette entry 0 is transparent
    _metadata(root, [("rgba.png", "rgba"), ("la.png", "la"), ("palette.png", "palette")])
    ds = ImageCaptionDataset(root, size=8)
    pixels = [((ds[i]["pixel_values"] + 1) * 127.5).round().to(torch.uint8) for i in range(3)]
    assert (pixels[0][:, :, :4] == 255).all()
    assert torch.equal(pixels[0][:, :, 4:], torch.from_numpy(rgba[:, 4:, :3]).permute(2, 0, 1))
    # Half transparent grey 40 over white: (40 * 128 + 255 * 127) / 255.
    assert (pixels[1] - round((40 * 128 + 255 * 127) / 255)).abs().max() <= 1
    assert (pixels[2] == 255).all()


def test_a_quote_left_open_in_metadata_is_an_error_not_merged_rows(tmp_path):
    root = tmp_path / "d"
    for name in ("a.png", "b.png", "c.png"):
        _image(root / name, 8, 8)
    # Read leniently, a.png's caption would swallow the rows of b.png and c.png.
    (root / "metadata.csv").write_text('file_name,text\na.png,"a cat\nb.png,a dog\nc.png,a bird\n')
    with pytest.raises(ValueError, match=r"metadata.csv line 2: unexpected end of data; a field that starts "
                                         r"with a double quote must end with one"):
        ImageCaptionDataset(root, size=8)
    (root / "metadata.csv").write_text('file_name,text\na.png,"Hello" she said\n')  # the quotes would vanish
    with pytest.raises(ValueError, match=r"metadata.csv line 2: ',' expected after '\"'"):
        list_captioned_files(root)
    (root / "metadata.csv").write_text('file_name,text\na.png,"a cat, ""quoted""\nand on two lines"\n'
                                       'b.png,a 12" record\n')
    assert [f.caption for f in list_captioned_files(root)] == ['a cat, "quoted"\nand on two lines', 'a 12" record']


def test_images_smaller_than_their_crop_are_counted_and_warned(tmp_path):
    root = tmp_path / "d"
    _image(root / "big.png", 64, 48)
    _image(root / "narrow.png", 24, 64)
    _metadata(root, [("big.png", "big"), ("narrow.png", "narrow")])
    with pytest.warns(RuntimeWarning, match=r"1 of 2 images are smaller than the size they are cropped to and "
                                             r"are upscaled \(e.g. narrow.png: 24x64 for 32x32\)"):
        ds = ImageCaptionDataset(root, size=32)
    assert ds.upscaled == 1
    assert ImageCaptionDataset(root, size=24).upscaled == 0


@pytest.mark.parametrize("rows", ["text,file_name\na cat,ok.png\nonly a caption\n",
                                  "file_name,text\nok.png,a cat\n,no file\n"])
def test_a_row_without_a_file_name_is_named(tmp_path, rows):
    root = tmp_path / "d"
    _image(root / "ok.png", 8, 8)
    (root / "metadata.csv").write_text(rows)
    with pytest.raises(ValueError, match="metadata.csv line 3: the row has no file_name"):
        list_captioned_files(root)


@pytest.mark.parametrize("name", ["metadata.jsonl", "metadata.parquet"])
def test_metadata_in_another_format_is_refused_not_read_as_uncaptioned(tmp_path, name):
    root = tmp_path / "d"
    _image(root / "a.png", 8, 8)
    (root / name).write_text('{"file_name": "a.png", "text": "a cat"}\n')
    with pytest.raises(ValueError, match=f"has {name} but no metadata.csv.*convert it"):
        ImageCaptionDataset(root, size=8)


def test_floating_point_images_are_skipped_not_read_as_black(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 0.8, np.float32), "F").save(root / "float.tif")  # light grey in [0, 1]
    _image(root / "ok.png", 8, 8)
    _metadata(root, [("float.tif", "float"), ("ok.png", "ok")])
    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 2 images \({'float_pixels': 1}\)"):
        ds = ImageCaptionDataset(root, size=8)
    assert [f.file_name for f in ds.files] == ["ok.png"]
