"""The toy source recipe end to end at a tiny size: it must produce a diffusers pipeline
folder that loads, samples and scores, with a truthful training record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2p.toy import source
from l2p.toy.scoring import bootstrap_interval, score_generated
from l2p.toy.prompts import make_records
from l2p.toy.render import render_array
from l2p.toy.world import CATEGORIES

TINY = source.ToySourceConfig().scaled(
    image_size=32, vae_channels=(8, 16), layers=1, heads=2, head_dim=8, text_dim=16,
    text_layers=1, train_scenes=16, vae_steps=2, vae_batch=4, dit_steps=3, dit_batch=4,
    warmup_steps=1, workers=1, vae_eval_scenes=12,
)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "source"
    source.train_toy_source(TINY, out, "cpu", log=lambda _: None, command="test")
    return out


def test_tokenizer_keeps_shapesworld_words_whole():
    tok = source.build_toy_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("two red circles to the left of a blue square").input_ids)
    assert pieces == ["\u2581two", "\u2581red", "\u2581circles", "\u2581to", "\u2581the", "\u2581left",
                      "\u2581of", "\u2581a", "\u2581blue", "\u2581square", "</s>"]
    assert "<unk>" not in tok.convert_ids_to_tokens(tok("a zebra").input_ids)


def test_trained_folder_loads_with_diffusers_and_records_its_run(tiny_source):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_source, local_files_only=True, use_safetensors=True)
    assert type(pipe).__name__ == "PixArtSigmaPipeline"
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    assert pipe.vae_scale_factor == 2 and pipe.transformer.config.sample_size == 16
    record = json.loads((tiny_source / "training_record.json").read_text())
    assert record["steps_run"] == {"vae": 2, "transformer": 3}
    assert record["command"] == "test" and record["config"]["image_size"] == 32
    assert pipe.vae.config.scaling_factor > 0


def test_record_holds_the_autoencoders_round_trip_score(tiny_source):
    record = json.loads((tiny_source / "training_record.json").read_text())
    recon = record["vae_reconstruction"]
    assert 0.0 <= recon["overall"] <= 1.0 and recon["psnr_db"] > 0
    assert set(recon["per_category"]) == set(CATEGORIES)
    assert not source.work_dir_for(tiny_source).exists()   # removed once the folder is written
    assert tiny_source.stat().st_mode & 0o755 == 0o755      # not mkdtemp's owner-only mode


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from l2p.train import checkpoint

    # With the text encoder's pretraining phase, whose result the resumed run must take as saved,
    # and its own learning rate (a second optimizer group, restored from the checkpoint).
    cfg = TINY.scaled(dit_steps=6, checkpoint_every=2, text_pretrain_steps=3, text_pretrain_batch=4,
                      text_pretrain_objective="context", text_lr_scale=0.5)
    whole = source.train_toy_source(cfg, tmp_path / "whole", "cpu", log=lambda _: None)

    saved = checkpoint.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = saved(*args, **kwargs)
        if kwargs["state"]["step"] == 4:
            raise KeyboardInterrupt   # killed right after the step-4 checkpoint
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        source.train_toy_source(cfg, tmp_path / "resumed", "cpu", log=lambda _: None)
    monkeypatch.setattr(checkpoint, "save_checkpoint", saved)
    logs = []
    resumed = source.train_toy_source(cfg, tmp_path / "resumed", "cpu", log=logs.append)
    assert any("autoencoder: resumed" in line for line in logs)
    assert any("text encoder: pretrained one resumed" in line for line in logs)
    assert not any("text encoder step" in line for line in logs)
    records = [json.loads((d / "training_record.json").read_text()) for d in (whole, resumed)]
    assert records[0]["text_pretraining"] == records[1]["text_pretraining"]
    assert records[0]["text_pretraining"]["steps"] == 3
    assert records[0]["text_pretraining"]["objective"] == "context"
    assert any("resumed from" in line and "step 4/6" in line for line in logs)
    for part in ("vae", "transformer", "text_encoder"):
        a = load_file(next((whole / part).glob("*.safetensors")))
        b = load_file(next((resumed / part).glob("*.safetensors")))
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}.{name} differs after resuming"


def test_continuing_a_trained_source_keeps_its_autoencoder_and_chains_its_record(tiny_source, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "continued"
    source.train_toy_source(TINY.scaled(init_from=str(tiny_source), dit_steps=2, seed=1), out, "cpu",
                            log=lambda _: None, command="continue")
    record = json.loads((out / "training_record.json").read_text())
    assert record["steps_run"] == {"vae": 0, "transformer": 2}
    assert not [p for p in out.rglob("*.json") if "_name_or_path" in json.loads(p.read_text())]
    assert record["continued_from"]["command"] == "test"
    assert record["total_transformer_steps"] == 3 + 2
    assert record["vae_reconstruction"] == record["continued_from"]["vae_reconstruction"]
    before, after = (load_file(next((d / "vae").glob("*.safetensors"))) for d in (tiny_source, out))
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = (load_file(next((d / "transformer").glob("*.safetensors"))) for d in (tiny_source, out))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_continuing_needs_the_same_architecture(tiny_source, tmp_path):
    with pytest.raises(ValueError, match="layers: folder 1, config 2"):
        source.train_toy_source(TINY.scaled(init_from=str(tiny_source), layers=2), tmp_path / "x", "cpu",
                                log=lambda _: None)
    with pytest.raises(FileNotFoundError, match="training_record.json"):
        source.train_toy_source(TINY.scaled(init_from=str(tmp_path)), tmp_path / "y", "cpu",
                                log=lambda _: None)
    assert not source.work_dir_for(tmp_path / "x").exists()


def test_a_new_transformer_can_take_a_trained_autoencoder(tiny_source, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "wider"
    cfg = TINY.scaled(vae_from=str(tiny_source), head_dim=16, text_dim=24, dit_steps=2)
    source.train_toy_source(cfg, out, "cpu", log=lambda _: None, command="wider")
    record = json.loads((out / "training_record.json").read_text())
    assert record["steps_run"] == {"vae": 0, "transformer": 2}
    assert record["autoencoder_from"]["command"] == "test"
    assert record["vae_reconstruction"] == json.loads(
        (tiny_source / "training_record.json").read_text())["vae_reconstruction"]
    before, after = (load_file(next((d / "vae").glob("*.safetensors"))) for d in (tiny_source, out))
    assert all(torch.equal(before[k], after[k]) for k in before)
    pipe = source.load_toy_source(out)
    assert pipe.transformer.config.attention_head_dim == 16 and pipe.text_encoder.config.d_model == 24
    assert pipe.vae.config.scaling_factor == source.load_toy_source(tiny_source).vae.config.scaling_factor
    assert source.generate(pipe, ["a red circle"], steps=2).shape == (1, 32, 32, 3)


def test_the_autoencoder_must_fit_and_init_from_excludes_vae_from(tiny_source, tmp_path):
    with pytest.raises(ValueError, match="vae_from=.*vae_channels"):
        source.train_toy_source(TINY.scaled(vae_from=str(tiny_source), vae_channels=(8, 8)),
                                tmp_path / "x", "cpu", log=lambda _: None)
    with pytest.raises(ValueError, match="pass one of them"):
        source.train_toy_source(TINY.scaled(vae_from=str(tiny_source), init_from=str(tiny_source)),
                                tmp_path / "y", "cpu", log=lambda _: None)
    # A refused run leaves no work folder, so the corrected run is not taken for a foreign one.
    assert not source.work_dir_for(tmp_path / "x").exists()
    assert not source.work_dir_for(tmp_path / "y").exists()


def test_a_different_config_does_not_resume_a_foreign_run(tmp_path):
    out = tmp_path / "src"
    source.work_dir_for(out).mkdir(parents=True)
    (source.work_dir_for(out) / "config.json").write_text(json.dumps({"image_size": 128}))
    with pytest.raises(ValueError, match="different config"):
        source.train_toy_source(TINY, out, "cpu", log=lambda _: None)


def test_generate_is_seeded(tiny_source):
    pipe = source.load_toy_source(tiny_source)
    a = source.generate(pipe, ["a red circle", "two squares"], seed=3, steps=2)
    b = source.generate(pipe, ["a red circle", "two squares"], seed=3, steps=2)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_missing_source_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="l2p toy train-source"):
        source.load_toy_source(tmp_path)


def test_time_budget_fits_the_schedule_to_the_measured_speed(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(source.time, "time", lambda: clock["now"])

    def run(planned, budget_s, seconds_per_step, warmup_seconds=5.0, slower_from=None):
        clock["now"] = 0.0
        budget = source._Budget(planned, budget_s)
        step = total = 0
        while step < (total := budget.update(step)):
            speed = seconds_per_step * (3 if slower_from is not None and step >= slower_from else 1)
            clock["now"] += warmup_seconds if step < source._WARMUP_STEPS else speed
            step += 1
        return total

    # A slow warm-up (10 x 5 s) must not be taken for the running speed (0.5 s/step): after
    # it and the 40 timed steps (70 s), the 30 s left of a 100 s budget hold 60 more steps.
    assert run(1000, 100.0, 0.5) == 110
    assert run(1000, 0.0, 0.5) == 1000          # no budget: the plan
    assert run(80, 1e6, 0.5) == 80               # never more than planned
    assert run(1000, 10.0, 0.5) == 51            # never fewer than already run
    # The machine gets 3x slower at step 100: at step 150 the re-fit sees 0.86 s/step on
    # average and 30 s left, and ends the run at 185 steps instead of the 310 first planned.
    assert run(1000, 200.0, 0.5, slower_from=100) == 185


def test_scoring_ground_truth_gives_full_marks_with_an_interval():
    records = make_records(36, seed=5, split="heldout")
    images = [render_array(r.scene, 64) for r in records]
    summary = score_generated(images, records)
    assert summary["overall"] == 1.0 and summary["ci95"] == (1.0, 1.0)
    assert summary["failures"] == []
    blank = [np.zeros((64, 64, 3), np.uint8) for _ in records]
    assert score_generated(blank, records)["overall"] == 0.0


def test_bootstrap_interval_brackets_the_estimate():
    class R:
        def __init__(self, category, correct):
            self.category, self.correct = category, correct

    results = [R("counting", i % 2 == 0) for i in range(200)] + [R("colors", True)] * 200
    low, high = bootstrap_interval(results, rounds=300)
    assert low < 0.75 < high and high - low < 0.15


def test_a_frozen_text_encoder_stays_as_it_started(tmp_path):
    from safetensors.torch import load_file

    cfg = TINY.scaled(text_lr_scale=0.0, dit_steps=2)
    out = source.train_toy_source(cfg, tmp_path / "frozen", "cpu", log=lambda _: None)
    start = source.build_toy_pipeline(cfg, seed=cfg.seed).text_encoder.state_dict()
    trained = load_file(next((out / "text_encoder").glob("*.safetensors")))
    assert all(torch.equal(start[k], trained[k]) for k in trained)
    # A scale between 0 and 1 trains it, more slowly: a second optimizer group.
    slow = source.train_toy_source(TINY.scaled(text_lr_scale=0.1, dit_steps=2), tmp_path / "slow", "cpu",
                                   log=lambda _: None)
    trained = load_file(next((slow / "text_encoder").glob("*.safetensors")))
    assert any(not torch.equal(start[k], trained[k]) for k in trained)
    with pytest.raises(ValueError, match="must be >= 0"):
        source.train_toy_source(TINY.scaled(text_lr_scale=-1.0), tmp_path / "bad", "cpu", log=lambda _: None)
    with pytest.raises(ValueError, match="choose one of denoise, context, preceding"):
        source.train_toy_source(TINY.scaled(text_pretrain_objective="mlm"), tmp_path / "bad", "cpu",
                                log=lambda _: None)
    with pytest.raises(ValueError, match="text_context_window must be >= 1"):
        source.train_toy_source(TINY.scaled(text_context_window=0), tmp_path / "bad", "cpu",
                                log=lambda _: None)
    assert not source.work_dir_for(tmp_path / "bad").exists()


def test_train_source_flags_reach_the_config(capsys):
    from l2p.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["toy", "train-source", "--text-pretrain-objective", "context",
                              "--text-context-window", "2", "--text-lr-scale", "0"])
    assert (args.text_pretrain_objective, args.text_context_window, args.text_lr_scale) == ("context", 2, 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["toy", "train-source", "--text-pretrain-objective", "mlm"])
    assert "invalid choice: 'mlm'" in capsys.readouterr().err


def test_config_ranges_are_refused_before_any_work(tmp_path, capsys):
    from l2p.cli import main

    out = tmp_path / "source"
    for flag, value, message in [("--image-size", "0", "image_size must be >= 1"),
                                 ("--image-size", "60", "image_size must be a multiple of 8"),
                                 ("--dit-batch", "0", "dit_batch must be >= 1"),
                                 ("--dit-lr", "0", "dit_lr must be > 0"),
                                 ("--caption-dropout", "2", r"caption_dropout must be in [0, 1]"),
                                 ("--ema-decay", "1", "ema_decay must be in [0, 1)"),
                                 ("--eval-prompts", "-1", "--eval-prompts and --threads must be >= 0")]:
        assert main(["toy", "train-source", "--out", str(out), flag, value]) == 2, flag
        assert message in capsys.readouterr().err, flag
    assert not out.exists() and not source.work_dir_for(out).exists()


def test_source_toy_names_the_shipped_source_for_convert_and_the_trainer(tmp_path, monkeypatch):
    """`--source toy` resolves to the shipped source wherever a source folder is accepted."""
    from safetensors.torch import load_file

    from l2p.cli import main
    from l2p.toy.source import SHIPPED_SOURCE_DIR
    from l2p.train.source import resolve_source_path

    assert main(["convert", "--source", "toy", "--out", str(tmp_path / "a")]) == 0
    assert main(["convert", "--source", str(SHIPPED_SOURCE_DIR), "--out", str(tmp_path / "b")]) == 0
    a, b = (load_file(str(tmp_path / x / "transformer" / "diffusion_pytorch_model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resolve_source_path("toy") == SHIPPED_SOURCE_DIR
    # ... and for l2p toy train-source's --init-from / --vae-from.
    seen = []
    monkeypatch.setattr("l2p.toy.source.train_toy_source", lambda cfg, *a, **k: seen.append(cfg))
    assert main(["toy", "train-source", "--init-from", "toy", "--out", str(tmp_path / "c")]) == 0
    assert main(["toy", "train-source", "--vae-from", "toy", "--out", str(tmp_path / "d")]) == 0
    assert (seen[0].init_from, seen[1].vae_from) == (str(SHIPPED_SOURCE_DIR),) * 2

    # Without the shipped weights: the trainer's error says what to do instead.
    import l2p.toy.source as toy_source

    monkeypatch.setattr(toy_source, "SHIPPED_SOURCE_DIR", tmp_path / "absent")
    with pytest.raises(ValueError, match="l2p toy train-source.*model.source"):
        resolve_source_path("toy")


def test_heldout_scores_are_split_by_whether_the_prompt_names_a_heldout_combination():
    """Held-out prompts that name no held-out combination are ones training gives too; the
    summary scores the two kinds apart, by image, in the same layout as the whole."""
    from l2p.toy.world import names_heldout

    records = make_records(60, seed=5, split="heldout")
    named = [names_heldout(r.scene) for r in records]
    assert any(named) and not all(named)
    # Right images for the prompts that name one, blank ones for the rest.
    images = [render_array(r.scene, 64) if n else np.zeros((64, 64, 3), np.uint8) for r, n in zip(records, named)]
    parts = score_generated(images, records)["heldout_named"]
    assert parts["novel"]["overall"] == 1.0 and parts["novel"]["n"] == sum(named)
    assert parts["also_in_training"]["overall"] == 0.0 and parts["also_in_training"]["n"] == len(named) - sum(named)
    assert "single_object" not in parts["novel"]["per_category"]
    assert "heldout_named" not in score_generated(images[:6], make_records(6, seed=5, split="train"))
