"""``l2p sample`` writes PNGs; user mistakes are one-line errors."""

from __future__ import annotations

import numpy as np
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
