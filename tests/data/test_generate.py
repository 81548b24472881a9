"""Rendering with a tiny PixArt-Sigma pipeline: files, records, resume, failures, ranks."""

from __future__ import annotations

import csv

import numpy as np
from pathlib import Path

import pytest
from PIL import Image

from l2p.cli import main
from l2p.data import generate as G

PROMPTS = ["a red fox in the snow", "a blue vintage car on a road", "a bowl of ramen", "a lighthouse at dusk"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def pipe(tiny_pixart):
    return G.load_pipeline(tiny_pixart)


def _config(tiny_pixart, prompt_file, out, **kw):
    values = dict(source=str(tiny_pixart), prompts=str(prompt_file), out=str(out), images_per_prompt=2,
                  steps=2, height=32, width=32, seed=11, batch_size=3)
    values.update(kw)
    return G.GenerationConfig(**values)


def _metadata(out):
    with (out / "metadata.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _all_names(n_prompts=len(PROMPTS), k=2):
    return [G.image_name(p, i) for p in range(n_prompts) for i in range(k)]


def test_generate_writes_images_and_metadata(tiny_pixart, prompt_file, tmp_path, pipe):
    out = tmp_path / "out"
    summary = G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    assert (summary.rendered, summary.existing, summary.failed, summary.metadata_rows) == (8, 0, [], 8)
    rows = _metadata(out)
    assert list(rows[0]) == list(G.METADATA_COLUMNS)
    assert [r["file_name"] for r in rows] == _all_names()
    for r in rows:
        p, i = int(r["prompt_index"]), int(r["image_index"])
        assert r["text"] == PROMPTS[p]
        assert int(r["seed"]) == G.derive_seed(11, p, i)
        assert (r["height"], r["width"], r["steps"], r["source"]) == ("32", "32", "2", str(tiny_pixart.resolve()))
        assert float(r["guidance"]) == 4.5  # the pipeline's default, recorded
        with Image.open(out / r["file_name"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
        assert G.read_png_record(out / r["file_name"])["text"] == PROMPTS[p]
    # An image depends only on (seed, prompt, index), not on its batch.
    first = out / G.image_name(1, 1)
    before = np.asarray(Image.open(first))
    first.unlink()
    again = G.generate_images(_config(tiny_pixart, prompt_file, out, batch_size=1), pipe=pipe, progress=False)
    assert (again.rendered, again.existing) == (1, 7)
    np.testing.assert_allclose(np.asarray(Image.open(first)).astype(int), before.astype(int), atol=1)


def test_prompt_indices_add_tries_for_some_prompts_only(tiny_pixart, prompt_file, tmp_path, pipe):
    out = tmp_path / "out"
    G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=1), pipe=pipe, progress=False)
    first = {n: (out / n).read_bytes() for n in _all_names(k=1)}
    more = G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=3), pipe=pipe,
                             prompt_indices=[3, 1], progress=False)
    assert (more.planned, more.existing, more.rendered) == (6, 2, 4)
    names = [r["file_name"] for r in _metadata(out)]
    assert names == [G.image_name(0, 0), G.image_name(1, 0), G.image_name(1, 1), G.image_name(1, 2),
                     G.image_name(2, 0), G.image_name(3, 0), G.image_name(3, 1), G.image_name(3, 2)]
    assert all((out / n).read_bytes() == b for n, b in first.items())  # earlier tries untouched
    with pytest.raises(ValueError, match="prompt_indices must lie in"):
        G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, prompt_indices=[4], progress=False)


def test_captions_are_rendered_as_written(tiny_pixart, prompt_file, tmp_path, pipe):
    """PixArt cleans captions only where bs4 and ftfy are installed; the trainer encodes them
    as written, so the corpus must be rendered from them as written, whatever is installed."""
    kwargs, _ = G._call_kwargs(pipe, _config(tiny_pixart, prompt_file, tmp_path / "out"))
    assert kwargs["clean_caption"] is False and kwargs["use_resolution_binning"] is False


def test_resume_after_interruption(tiny_pixart, prompt_file, tmp_path, pipe, monkeypatch):
    out = tmp_path / "out"
    write = G._atomic_write_png
    written = []

    def write_then_die(image, path, record, tmp_tag):
        if len(written) == 3:
            # Killed in the middle of a write: a temporary file is left behind.
            image.save(path.with_name(f".{path.stem}.{tmp_tag}.tmp.png"))
            raise KeyboardInterrupt
        write(image, path, record, tmp_tag)
        written.append(path)

    monkeypatch.setattr(G, "_atomic_write_png", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    pngs = list((out / "images").glob("*/*.png"))
    assert sorted(p.name.startswith(".") for p in pngs) == [False, False, False, True]
    assert G.rebuild_metadata(out) == 3  # what an interrupted run has is already usable

    monkeypatch.setattr(G, "_atomic_write_png", write)
    summary = G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    assert (summary.rendered, summary.existing, summary.metadata_rows) == (5, 3, 8)
    assert not list((out / "images").glob("*/.*"))  # the stale temporary file is gone
    names = [r["file_name"] for r in _metadata(out)]
    assert names == _all_names() and len(set(names)) == 8
    # More images per prompt later: only the new ones are rendered.
    more = G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=3), pipe=pipe, progress=False)
    assert (more.rendered, more.existing, more.metadata_rows) == (4, 8, 12)


def test_failures_are_counted_not_fatal(tiny_pixart, prompt_file, tmp_path, pipe, monkeypatch, caplog):
    out = tmp_path / "out"
    render = G._render

    def flaky(pipe_, texts, seeds, kwargs, device):
        if "ramen" in " ".join(texts):
            raise RuntimeError("out of memory (simulated)")
        return render(pipe_, texts, seeds, kwargs, device)

    monkeypatch.setattr(G, "_render", flaky)
    summary = G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    assert summary.failed == [G.image_name(2, 0), G.image_name(2, 1)]
    assert summary.rendered == 6 and summary.metadata_rows == 6
    assert "failed to render images/0000/0000002_000.png" in caplog.text
    assert "2 failed" in str(summary)
    monkeypatch.setattr(G, "_render", render)
    retry = G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    assert (retry.rendered, retry.failed, retry.metadata_rows) == (2, [], 8)


def test_ranks_render_disjoint_slices_and_one_metadata(tiny_pixart, prompt_file, tmp_path, pipe):
    out = tmp_path / "out"
    s0 = G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, rank=0, world_size=3, progress=False)
    s1 = G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, rank=1, world_size=3, progress=False)
    s2 = G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, rank=2, world_size=3, progress=False)
    assert [s.rendered for s in (s0, s1, s2)] == [3, 3, 2]
    assert not (out / "metadata.csv").exists()  # explicit ranks: the caller merges
    assert G.rebuild_metadata(out) == 8
    assert [r["file_name"] for r in _metadata(out)] == _all_names()


def test_source_resolution_and_changed_settings(tiny_pixart, prompt_file, tmp_path, pipe, monkeypatch):
    import l2p.toy.source as toy_source

    monkeypatch.setattr(toy_source, "SHIPPED_SOURCE_DIR", tmp_path / "no-toy")
    with pytest.raises(FileNotFoundError, match="toy source is missing"):
        G.resolve_source("toy")
    monkeypatch.setattr(toy_source, "SHIPPED_SOURCE_DIR", Path(tiny_pixart))
    assert G.resolve_source("toy") == Path(tiny_pixart)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        G.resolve_source(tmp_path / "nope")
    with pytest.raises(ValueError, match="model_index.json"):
        G.resolve_source(tmp_path)
    out = tmp_path / "out"
    G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=1), pipe=pipe, progress=False)
    with pytest.raises(ValueError, match="different height"):
        G.generate_images(_config(tiny_pixart, prompt_file, out, height=64), pipe=pipe, progress=False)


def test_derive_seed_is_stable_and_distinct():
    seeds = {G.derive_seed(0, p, i) for p in range(100) for i in range(4)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert G.derive_seed(0, 5, 1) == G.derive_seed(0, 5, 1) != G.derive_seed(1, 5, 1)


def test_cli_generate(tiny_pixart, prompt_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = ["data", "generate", "--source", str(tiny_pixart), "--prompts", str(prompt_file), "--out", str(out),
            "--images-per-prompt", "1", "--steps", "2", "--height", "32", "--width", "32", "--batch-size", "4"]
    assert main(args) == 0
    assert "4 rendered" in capsys.readouterr().out
    assert len(_metadata(out)) == 4
    (out / "metadata.csv").unlink()
    assert main(["data", "generate", "--out", str(out), "--merge-only"]) == 0
    assert len(_metadata(out)) == 4
    import l2p.toy.source as toy_source

    monkeypatch.setattr(toy_source, "SHIPPED_SOURCE_DIR", tmp_path / "no-toy")
    assert main(args[:2] + ["--source", "toy", "--prompts", str(prompt_file), "--out", str(out)]) == 2
    assert "toy source is missing" in capsys.readouterr().err


def _torchrun_generate(script: str, source, prompt_file, out, tmp_path, *extra):
    """``l2p data generate`` in two real processes under torchrun (gloo, CPU), started through
    ``script`` (Python that ends by running the CLI); the finished process."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "run.py").write_text(script)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(tmp_path / "run.py"), "data", "generate", "--source", str(source),
         "--prompts", str(prompt_file), "--out", str(out), "--images-per-prompt", "2", "--steps", "2",
         "--height", "32", "--width", "32", "--device", "cpu", *extra],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.slow
def test_torchrun_two_ranks_merge_one_metadata(tiny_pixart, prompt_file, tmp_path):
    """Two real processes under torchrun (gloo, CPU): each renders its slice, rank 0 merges
    after the barrier."""
    out = tmp_path / "out"
    proc = _torchrun_generate("import sys, torch\ntorch.set_num_threads(1)\nfrom l2p.cli import main\n"
                              "sys.exit(main(sys.argv[1:]))\n", tiny_pixart, prompt_file, out, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2: 4 rendered" in proc.stdout and "rank 1/2: 4 rendered" in proc.stdout
    assert [r["file_name"] for r in _metadata(out)] == _all_names()


@pytest.mark.slow
def test_torchrun_ranks_agree_on_the_status_after_metadata_is_written(tiny_pixart, prompt_file, tmp_path):
    """Every image of rank 1 fails: it used to exit 1 at once, which lets torchrun stop rank 0
    while it writes metadata.csv, and rank 0 exited 0. Now both wait for the metadata and
    both exit 1, rank 0 saying which rank failed."""
    out = tmp_path / "out"
    proc = _torchrun_generate(
        "import os, sys, torch\ntorch.set_num_threads(1)\nfrom l2p.cli import main\nfrom l2p.data import generate\n"
        "def broken(*args, **kwargs):\n    raise RuntimeError('simulated')\n"
        "if os.environ['RANK'] == '1':\n    generate._render = broken\n"
        "code = main(sys.argv[1:])\nprint(f\"rank {os.environ['RANK']} exits {code}\", flush=True)\nsys.exit(code)\n",
        tiny_pixart, prompt_file, out, tmp_path, "--batch-size", "4")
    assert proc.returncode != 0
    assert "rank 0 exits 1" in proc.stdout and "rank 1 exits 1" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "rank 0/2: 4 rendered" in proc.stdout and "4 failed on all ranks" in proc.stdout
    assert "every image failed on rank 1: the run failed" in proc.stdout
    assert [r["file_name"] for r in _metadata(out)] == _all_names()[0::2]  # rank 0's slice


def _drop_one_image(out):
    (out / G.image_name(0, 0)).unlink()


def test_rerun_with_another_dtype_or_device_type_is_refused(tiny_pixart, prompt_file, tmp_path, pipe, caplog):
    """auto is bfloat16 on CUDA and float32 on CPU, and the device type picks the noise
    generator: a rerun resolving to other ones would mix two settings in one corpus."""
    import json

    out = tmp_path / "out"
    G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    manifest = json.loads((out / G.MANIFEST).read_text())
    assert (manifest["dtype"], manifest["device_type"]) == ("float32", "cpu")
    record = G.read_png_record(out / G.image_name(1, 1))
    assert (record["dtype"], record["device_type"], record["source_digest"]) == \
        ("float32", "cpu", G.source_digest(tiny_pixart))
    _drop_one_image(out)
    # Refused before any pipeline is loaded (none is passed here).
    with pytest.raises(ValueError, match=r"different dtype \(recorded: 'float32', this run: 'bfloat16'\).*"
                                         r"another --out|--dtype float32"):
        G.generate_images(_config(tiny_pixart, prompt_file, out, dtype="bfloat16"), progress=False)
    with pytest.raises(ValueError, match=r"device_type \(recorded: 'cpu', this run: 'cuda'\).*--device cpu"):
        G.generate_images(_config(tiny_pixart, prompt_file, out, device="cuda"), progress=False)
    # A manifest from before these were recorded: assumed to match (with a warning), then recorded.
    for key in ("dtype", "device_type"):
        del manifest[key]
    (out / G.MANIFEST).write_text(json.dumps(manifest))
    summary = G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    assert summary.rendered == 1 and "predates the recording of dtype" in caplog.text
    assert json.loads((out / G.MANIFEST).read_text())["dtype"] == "float32"


def test_source_is_identified_by_content_not_path(tiny_pixart, prompt_file, tmp_path, pipe):
    import json
    import shutil

    from l2p.testing import build_tiny_pixart_sigma_pipeline

    copy = tmp_path / "copy"
    shutil.copytree(tiny_pixart, copy)
    (copy / "training_record.json").write_text("{}")  # outside the components: no effect
    assert G.source_digest(copy) == G.source_digest(tiny_pixart)
    out = tmp_path / "out"
    G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=1), pipe=pipe, progress=False)
    _drop_one_image(out)
    # The same weights at another path continue the corpus.
    again = G.generate_images(_config(copy, prompt_file, out, images_per_prompt=1), pipe=pipe, progress=False)
    assert (again.rendered, again.existing) == (1, 3)
    # Another model (same architecture, other weights: same safetensors headers) saved into the
    # same folder is refused.
    shutil.rmtree(copy)
    build_tiny_pixart_sigma_pipeline(copy, seed=1)
    assert G.source_digest(copy) != G.source_digest(tiny_pixart)
    _drop_one_image(out)
    with pytest.raises(ValueError, match="different source.*content differs"):
        G.generate_images(_config(copy, prompt_file, out, images_per_prompt=1), progress=False)
    # A manifest from before the digest: the path decides.
    manifest = json.loads((out / G.MANIFEST).read_text())
    assert manifest["source"] == str(copy.resolve())  # the latest path, for people
    del manifest["source_digest"]
    manifest["source"] = str(tiny_pixart.resolve())
    (out / G.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="different source"):
        G.generate_images(_config(copy, prompt_file, out, images_per_prompt=1), progress=False)
    assert G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=1), pipe=pipe,
                             progress=False).rendered == 1


def test_invalid_size_is_refused_up_front(tiny_pixart, prompt_file, tmp_path, pipe):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--height 33 --width 32 do not suit this PixArtSigmaPipeline"):
        G.generate_images(_config(tiny_pixart, prompt_file, out, height=33), pipe=pipe, progress=False)
    assert not (out / G.MANIFEST).exists() and not (out / "images").exists()
    # 36 fits the latent grid (vae factor 2 x patch 2) but not PixArt's own check_inputs.
    with pytest.raises(ValueError, match=r"--height 36 .*divisible by 8 but are 36 and 32; pick a size"):
        G.generate_images(_config(tiny_pixart, prompt_file, out, height=36), pipe=pipe, progress=False)
    # A folder left by such a run before this check (its manifest, no image) takes the fix.
    out.mkdir()
    (out / G.MANIFEST).write_text('{"height": 33}')
    summary = G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=1), pipe=pipe,
                                progress=False)
    assert summary.rendered == 4


def test_cli_exits_non_zero_when_every_image_fails(tiny_pixart, prompt_file, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated")

    monkeypatch.setattr(G, "_render", broken)
    args = ["data", "generate", "--source", str(tiny_pixart), "--prompts", str(prompt_file), "--out",
            str(tmp_path / "out"), "--images-per-prompt", "1", "--steps", "2", "--height", "32", "--width", "32"]
    assert main(args) == 1
    assert "4 failed of 4" in capsys.readouterr().out


def test_fewer_images_per_prompt_keeps_and_reports_the_extra_ones(tiny_pixart, prompt_file, tmp_path, pipe):
    out = tmp_path / "out"
    G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    fewer = G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=1), pipe=pipe,
                              progress=False)
    assert (fewer.existing, fewer.beyond, fewer.metadata_rows) == (4, 4, 8)
    assert "4 images beyond --images-per-prompt 1 from an earlier run were kept" in str(fewer)


def test_cli_merge_only_refuses_a_folder_without_images(tmp_path, capsys):
    out = tmp_path / "typo"
    assert main(["data", "generate", "--out", str(out), "--merge-only"]) == 2
    err = capsys.readouterr().err
    assert "does not exist: nothing to merge" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_size_check_falls_back_to_the_latent_grid():
    """A pipeline without a usable check_inputs: the grid (vae factor x patch) decides."""
    from types import SimpleNamespace

    pipe = SimpleNamespace(vae_scale_factor=8, transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2)))
    G._check_size(pipe, 64, 32)
    with pytest.raises(ValueError, match="multiples of 16 \\(vae scale factor 8 x patch size 2\\)"):
        G._check_size(pipe, 64, 40)


def test_a_folder_with_the_users_own_metadata_is_refused_not_rewritten(tiny_pixart, prompt_file, tmp_path, pipe):
    out = tmp_path / "mine"
    out.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(out / "photo.png")
    own = "file_name,text\nphoto.png,my own caption\n"
    (out / "metadata.csv").write_text(own)
    with pytest.raises(ValueError, match="did not write .*'photo.png'.*another --out"):
        G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    assert not (out / "images").exists()  # refused before rendering anything
    with pytest.raises(ValueError, match="did not write"):
        G.rebuild_metadata(out)
    (out / "metadata.csv").write_text("path,caption\nphoto.png,my own caption\n")
    with pytest.raises(ValueError, match="no 'file_name' column"):
        G.rebuild_metadata(out)
    (out / "metadata.csv").write_text(own)
    assert main(["data", "generate", "--merge-only", "--out", str(out)]) == 2
    assert (out / "metadata.csv").read_text() == own

    # A generated corpus's own metadata.csv (rows of deleted images included) is rebuilt as before.
    corpus = tmp_path / "corpus"
    G.generate_images(_config(tiny_pixart, prompt_file, corpus, images_per_prompt=1), pipe=pipe, progress=False)
    (corpus / G.image_name(0, 0)).unlink()
    assert G.rebuild_metadata(corpus) == len(PROMPTS) - 1


def test_a_png_cut_short_is_rendered_again_and_left_out_of_metadata(tiny_pixart, prompt_file, tmp_path, pipe,
                                                                      caplog):
    out = tmp_path / "out"
    G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    cut, emptied = out / G.image_name(1, 1), out / G.image_name(3, 0)
    whole = cut.read_bytes()
    pixels = np.asarray(Image.open(cut), dtype=np.int16)
    # What a machine crash can leave under the final name: the start of the file, or nothing.
    cut.write_bytes(whole[:len(whole) // 2])
    emptied.write_bytes(b"")
    assert G.rebuild_metadata(out) == 6
    assert "images/0000/0000001_001.png is cut short" in caplog.text
    summary = G.generate_images(_config(tiny_pixart, prompt_file, out), pipe=pipe, progress=False)
    assert (summary.rendered, summary.existing, summary.metadata_rows) == (2, 6, 8)
    assert "2 images in" in caplog.text and "rendering them again" in caplog.text
    # The same image as before (its seed is fixed by (p, i)), up to rounding: another batch.
    assert np.abs(np.asarray(Image.open(cut), dtype=np.int16) - pixels).max() <= 1
    assert [r["file_name"] for r in _metadata(out)] == _all_names()


def test_images_without_a_readable_manifest_are_refused(tiny_pixart, prompt_file, tmp_path, pipe):
    out = tmp_path / "out"
    G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=1), pipe=pipe, progress=False)
    manifest = out / G.MANIFEST
    saved = manifest.read_text()
    manifest.write_text(saved[: len(saved) // 2])
    with pytest.raises(ValueError, match="generation.json is not readable JSON"):
        G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=2), pipe=pipe, progress=False)
    manifest.unlink()
    # Without it, a run at another size would have rendered beside the old images.
    with pytest.raises(ValueError, match="no generation.json, so the prompts and settings .* unknown"):
        G.generate_images(_config(tiny_pixart, prompt_file, out, height=64, width=64, images_per_prompt=2),
                          pipe=pipe, progress=False)
    assert len(list((out / "images").glob("*/*.png"))) == len(PROMPTS)
    manifest.write_text(saved)
    summary = G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=2), pipe=pipe,
                                progress=False)
    assert (summary.rendered, summary.existing) == (len(PROMPTS), len(PROMPTS))


def test_columns_added_to_metadata_survive_the_rebuild(tiny_pixart, prompt_file, tmp_path, pipe):
    out = tmp_path / "out"
    G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=1), pipe=pipe, progress=False)
    rows = _metadata(out)
    with (out / "metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "recaption"])
        writer.writeheader()
        writer.writerows(dict(row, recaption=f"recaptioned {i}") for i, row in enumerate(rows))
    G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=2), pipe=pipe, progress=False)
    rebuilt = _metadata(out)
    assert [r["file_name"] for r in rebuilt] == _all_names()
    assert [r["recaption"] for r in rebuilt] == [f"recaptioned {p}" if i == 0 else ""
                                                 for p in range(len(PROMPTS)) for i in range(2)]


def test_repeated_prompts_are_reported(tiny_pixart, tmp_path, pipe, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue car\na red fox\n")
    summary = G.generate_images(_config(tiny_pixart, prompts, tmp_path / "out", images_per_prompt=1), pipe=pipe,
                                progress=False)
    assert summary.rendered == 3  # the copy is still a prompt of its own: the prompt indices stay as in the file
    assert "1 prompts appear more than once" in caplog.text and "'a red fox'" in caplog.text


@pytest.mark.parametrize("steps", [0, -2])
def test_steps_below_one_are_refused_up_front(tiny_pixart, prompt_file, tmp_path, pipe, steps):
    out = tmp_path / "out"
    # Zero steps would decode the starting noise: every image "renders" and the corpus is noise.
    with pytest.raises(ValueError, match=f"--steps must be at least 1 \\(got {steps}\\)"):
        G.generate_images(_config(tiny_pixart, prompt_file, out, steps=steps), pipe=pipe, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("guidance", [float("nan"), float("inf")])
def test_a_guidance_that_is_not_finite_is_refused_up_front(tiny_pixart, prompt_file, tmp_path, pipe, guidance):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--guidance must be a finite number"):
        G.generate_images(_config(tiny_pixart, prompt_file, out, guidance=guidance), pipe=pipe, progress=False)
    assert not out.exists()


def test_non_finite_pixels_fail_the_image_instead_of_saving_black(tiny_pixart, prompt_file, tmp_path, pipe,
                                                                    monkeypatch, caplog):
    out = tmp_path / "out"
    decode = pipe.vae.decode

    def overflowing_decode(latents, *args, **kwargs):  # what a half-precision VAE overflow gives
        return (decode(latents, *args, **kwargs)[0] * float("nan"),)

    monkeypatch.setattr(pipe.vae, "decode", overflowing_decode)
    summary = G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=1), pipe=pipe,
                                progress=False)
    assert (summary.rendered, len(summary.failed)) == (0, len(PROMPTS))
    assert not list((out / "images").glob("*/*.png"))
    assert "non-finite pixels (NaN or inf)" in caplog.text and "--dtype float32" in caplog.text
    monkeypatch.setattr(pipe.vae, "decode", decode)
    summary = G.generate_images(_config(tiny_pixart, prompt_file, out, images_per_prompt=1), pipe=pipe,
                                progress=False)
    assert summary.rendered == len(PROMPTS)


def test_prompt_lists_that_differ_only_in_where_a_newline_falls_differ_in_the_manifest():
    import hashlib

    assert G.prompts_digest(["a\nb", "c"]) != G.prompts_digest(["a", "b\nc"])
    # Lists without newlines keep the digest every existing manifest recorded.
    assert G.prompts_digest(["a red circle", "b"]) == hashlib.sha256(b"a red circle\nb").hexdigest()
