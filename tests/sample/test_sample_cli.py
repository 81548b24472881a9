"""``l2p sample`` writes PNGs; user mistakes are one-line errors."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from l2p.cli import main


def test_sample_writes_pngs(converted, tmp_path, capsys):
    out = tmp_path / "imgs"
    rc = main(["sample", "--model", str(converted["pixart"]), "--prompt", "a red circle", "--prompt", "blue",
               "--height", "32", "--width", "24", "--steps", "2", "--seed", "7", "--num-images", "2",
               "--out", str(out)])
    assert rc == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["000.png", "001.png", "002.png", "003.png"]
    assert all(Image.open(f).size == (24, 32) for f in files)
    assert "wrote" in capsys.readouterr().out
    single = tmp_path / "one.png"
    assert main(["sample", "--model", str(converted["pixart"]), "--prompt", "a red circle", "--height", "32",
                 "--width", "24", "--steps", "2", "--seed", "7", "--out", str(single),
                 "--tile-size", "8"]) == 0
    assert np.array_equal(np.asarray(Image.open(single)), np.asarray(Image.open(files[0])))


def test_sample_bad_size_is_a_clear_error(converted, tmp_path, capsys):
    rc = main(["sample", "--model", str(converted["sd3"]), "--prompt", "x", "--height", "30",
               "--steps", "1", "--out", str(tmp_path / "x.png")])
    assert rc == 2
    assert "multiple of the pixel patch size 4" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_guidance_options_are_passed_by_name_and_checked(converted, tmp_path, capsys):
    rc = main(["sample", "--model", str(converted["pixart"]), "--prompt", "x", "--height", "32", "--width", "32",
               "--steps", "1", "--guidance-option", "cfg_trunc_ratio=0.5", "--out", str(tmp_path / "x.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unexpected option(s) cfg_trunc_ratio" in err and "guidance options: none" in err
    assert not (tmp_path / "x.png").exists()


def test_guidance_option_values_are_typed():
    from l2p.cli.sample import _guidance_option

    assert _guidance_option("cfg_normalization=false") == ("cfg_normalization", False)
    assert _guidance_option("cfg_trunc_ratio=0.25") == ("cfg_trunc_ratio", 0.25)
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
        _guidance_option("cfg_trunc_ratio")


def test_guidance_max_sigma_reaches_the_pipeline(converted, tmp_path, capsys):
    """Below every step's noise level: no step is guided, the image of --guidance 1."""
    common = ["sample", "--model", str(converted["pixart"]), "--prompt", "a red circle", "--height", "32",
              "--width", "24", "--steps", "2", "--seed", "7"]
    assert main([*common, "--guidance-max-sigma", "0", "--out", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--guidance", "1", "--out", str(tmp_path / "b.png")]) == 0
    assert main([*common, "--out", str(tmp_path / "c.png")]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert main([*common, "--guidance-max-sigma", "-1", "--out", str(tmp_path / "d.png")]) == 2
    assert "guidance_max_sigma must be a noise level >= 0" in capsys.readouterr().err


def test_data_generate_renders_with_a_converted_pipeline(converted, tmp_path):
    """`l2p data generate --source PIXEL_FOLDER`: the pixel model's images, resumable like the
    source's, each the image L2PPipeline draws from that image's seed."""
    import csv

    from l2p import L2PPipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle\n")
    args = ["data", "generate", "--source", str(converted["sd3"]), "--prompts", str(prompts), "--out",
            str(tmp_path / "out"), "--height", "16", "--width", "24", "--steps", "2", "--images-per-prompt", "1",
            "--batch-size", "2", "--guidance", "3.0", "--device", "cpu"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "metadata.csv")))
    assert [r["text"] for r in rows] == ["a red circle", "two blue squares", "a green triangle"]
    pipe = L2PPipeline.from_pretrained(converted["sd3"])
    pipe.set_progress_bar_config(disable=True)
    for row in rows:
        expected = pipe(row["text"], height=16, width=24, num_inference_steps=2, guidance_scale=3.0,
                        generator=torch.Generator().manual_seed(int(row["seed"])), output_type="pil").images[0]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / row["file_name"])), np.asarray(expected))
    # A size off the pixel patch is refused before any image is tried.
    bad = args[:args.index("--height")] + ["--height", "18", "--width", "24"] + args[args.index("--steps"):]
    bad[bad.index("--out") + 1] = str(tmp_path / "bad")
    assert main(bad) == 2
    assert not list((tmp_path / "bad").glob("images/*/*.png"))


def test_data_generate_records_the_pixel_pipelines_default_settings(converted, tmp_path):
    """Left to its defaults, a converted SD3 pipeline samples 28 steps at 7.0 (its source
    pipeline's) and the records say so."""
    import csv

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["data", "generate", "--source", str(converted["sd3"]), "--prompts", str(prompts), "--out",
                 str(tmp_path / "out"), "--height", "8", "--width", "8", "--images-per-prompt", "1",
                 "--device", "cpu"]) == 0
    row = next(csv.DictReader(open(tmp_path / "out" / "metadata.csv")))
    assert (row["steps"], row["guidance"]) == ("28", "7.0")


def test_save_grid_tiles_images_and_refuses_zero_columns(tmp_path):
    from l2p.sample.basic import save_grid

    images = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, 1.0, 0.0)])
    grid = np.asarray(Image.open(save_grid(images, tmp_path / "g.png", columns=2)))
    assert grid.shape == (4, 4, 3)
    assert (grid[:2, :2] == 0).all() and (grid[:2, 2:] == 255).all() and (grid[2:, :2] == 128).all()
    assert (grid[2:, 2:] == 255).all()  # the empty cell stays white
    with pytest.raises(ValueError, match="columns must be a positive int"):
        save_grid(images, tmp_path / "h.png", columns=0)
