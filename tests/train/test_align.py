"""The source-feature alignment term (align.weight > 0): off by default and then the loss as
before; equal to 1 - cosine computed by hand from both models' block inputs; it raises the
cosine; the source copy, its VAE and the frozen blocks stay as they were; runs resume exactly
and agree with gradient accumulation, checkpointing, DDP and FSDP2."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from _dist_worker import run_rank
from _trainkit import make_config, overrides
from l2p.train.align import coupled_source_noise, low_frequency_basis
from l2p.train.config import ConfigError, load_config
from l2p.train.loop import Trainer, train

# Tiny sources: PixArt has 2 blocks, SD3 4, FLUX 2 double-stream then 2 single-stream.
# first_last:1 leaves block 1 frozen in SD3 and FLUX; PixArt's two blocks then both train.
BLOCK = {"pixart": 1, "sd3": None, "flux": 2}


def _fixed_batch(trainer: Trainer, slots=(0, 1, 2, 3)):
    slots = list(slots)
    return trainer._micro_batch(step=0, slots=slots, batch=trainer._load(slots))


def _source(family_dir):
    import diffusers

    index = json.loads((family_dir / "model_index.json").read_text())
    transformer = getattr(diffusers, index["transformer"][1]).from_pretrained(str(family_dir / "transformer"))
    vae = getattr(diffusers, index["vae"][1]).from_pretrained(str(family_dir / "vae"))
    return transformer.eval(), vae.eval()


def test_config_checks_name_the_fix(sources, images, tmp_path):
    with pytest.raises(ConfigError, match=r"align.weight must be a number >= 0 \(0 turns the alignment term off\)"):
        load_config(None, ["align.weight=-0.5"])
    with pytest.raises(ConfigError, match="align.block must be a block index >= 0"):
        load_config(None, ["align.block=-1"])
    with pytest.raises(ConfigError, match="align.noise must be 'independent' or 'coupled', got 'shared'"):
        load_config(None, ["align.noise=shared"])
    with pytest.raises(ConfigError, match="did you mean 'align.weight'"):
        load_config(None, ["align.wieght=1"])
    cfg = load_config(None, ["align.weight=0.5", "align.block=3"])
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert load_config(path).align == cfg.align and "align:\n  weight: 0.5\n  block: 3\n" in cfg.to_yaml()
    # What only the model can tell: the block range, a first frozen block, the token grid.
    with pytest.raises(ConfigError, match=r"align.block=4 is out of range: SD3Transformer2DModel has 4 blocks \(0..3"):
        Trainer(make_config(sources["sd3"], images, tmp_path / "a", align__weight=1, align__block=4))
    with pytest.raises(ConfigError, match=r"trains all 2 blocks: set align.block to a block index \(0..1\)"):
        Trainer(make_config(sources["pixart"], images, tmp_path / "b", align__weight=1))
    with pytest.raises(ConfigError, match=r"set model.patch_size=null \(4 here\), not 8"):
        Trainer(make_config(sources["sd3"], images, tmp_path / "c", align__weight=1, model__patch_size=8,
                            model__head_channels="[8,8,16]"))


def test_weight_zero_is_the_loss_as_before(sources, images, tmp_path):
    """Off (the default): no source copy, no extra draw, the objective's loss alone. On: the
    same samples, times and noise, and the loss is that loss plus weight x the term."""
    off = Trainer(make_config(sources["sd3"], images, tmp_path / "off"))
    on = Trainer(make_config(sources["sd3"], images, tmp_path / "on", align__weight=0.25))
    assert off.align is None and on.align is not None
    batch, aligned = _fixed_batch(off), _fixed_batch(on)
    assert batch.source_noise is None and aligned.source_noise.shape == (4, 16, 16, 16)
    for a, b in zip(batch[:4], aligned[:4]):
        pairs = [(a[k], b[k]) for k in a] if isinstance(a, dict) else [(a, b)]
        assert all(torch.equal(x, y) for x, y in pairs)
    with torch.no_grad():
        x_t, target = off.objective.noisy_and_target(batch.x0, batch.noise, batch.times)
        kwargs = off.family.call(batch.cond, x_t, off.objective.scheduler_timesteps(batch.times), off.model,
                                 off.cfg.objective.guidance)
        by_hand = torch.nn.functional.mse_loss(off.model(**kwargs, return_dict=False)[0], target)
        loss = off._loss(*batch)
        assert torch.equal(loss, by_hand) and off._loss_and_parts(*batch)[1] == {}
        total, parts = on._loss_and_parts(*aligned)
    assert torch.equal(parts["objective_loss"], loss)
    assert torch.equal(total, loss + 0.25 * parts["align"])


def test_coupled_source_noise_is_standard_normal_and_a_function_of_the_pixel_noise(sources, images, tmp_path):
    """align.noise=coupled: the latent noise is the pixel noise's coefficients on orthonormal
    low-frequency block patterns, so it is still standard normal and independent (what the
    source was trained on), and the trainer draws nothing else differently."""
    for channels, factor, count in [(3, 2, 12), (3, 4, 16), (3, 8, 16)]:
        basis = low_frequency_basis(channels, factor, count).reshape(count, -1)
        torch.testing.assert_close(basis @ basis.T, torch.eye(count, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"a \(3, 2, 2\) block has 12 orthonormal patterns, not 13"):
        low_frequency_basis(3, 2, 13)
    with pytest.raises(ValueError, match="pixel noise of 6x8 does not split into 4x4 blocks"):
        coupled_source_noise(torch.randn(3, 6, 8), 4, 4)
    # The first three channels: each colour channel's block mean, times the block's side.
    x = torch.randn(3, 8, 12)
    torch.testing.assert_close(coupled_source_noise(x, 4, 4)[:3], x.reshape(3, 2, 4, 3, 4).mean((2, 4)) * 4)

    z = coupled_source_noise(torch.randn(3, 1024, 1024, generator=torch.Generator().manual_seed(0)), 16, 4)
    flat = z.reshape(16, -1)  # 65536 cells per channel
    assert abs(flat.mean().item()) < 0.01 and abs(flat.std().item() - 1) < 0.01
    assert (torch.corrcoef(flat) - torch.eye(16)).abs().max() < 0.02  # across channels
    neighbours = torch.stack([z[:, :, :-1].flatten(), z[:, :, 1:].flatten()])
    assert torch.corrcoef(neighbours)[0, 1].abs() < 0.01  # across cells

    with pytest.raises(ConfigError, match=r"draws each latent cell's 16 noise channels from the 12 pixel noise "
                                          r"values of its 2x2 block, too few here: use align.noise=independent"):
        Trainer(make_config(sources["sd3"], images, tmp_path / "sd3", align__weight=0.5, align__noise="coupled"))
    extra = dict(align__weight=0.5, align__block=BLOCK["pixart"])
    independent = Trainer(make_config(sources["pixart"], images, tmp_path / "i", **extra))
    coupled = Trainer(make_config(sources["pixart"], images, tmp_path / "c", align__noise="coupled", **extra))
    a, b = _fixed_batch(independent), _fixed_batch(coupled)
    for x, y in zip(a[:4], b[:4]):  # images, conditioning, times and pixel noise as before
        pairs = [(x[k], y[k]) for k in x] if isinstance(x, dict) else [(x, y)]
        assert all(torch.equal(u, v) for u, v in pairs)
    assert b.source_noise.shape == a.source_noise.shape == (4, 4, 16, 16)  # 32x32 pixels, 4 latent channels
    assert not torch.equal(a.source_noise, b.source_noise)
    for noise, source_noise in zip(b.noise, b.source_noise):
        assert torch.equal(source_noise, coupled_source_noise(noise, 4, 2))
    with torch.no_grad():
        total, parts = coupled._loss_and_parts(*b)
    assert torch.isfinite(total) and 0 < parts["align"] < 2


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_term_is_one_minus_cosine_of_both_block_inputs(family, sources, images, tmp_path):
    """By hand: the full source transformer and VAE from the pipeline folder, hooks on the
    compared block of both models, the pipeline's latent normalisation and packing."""
    block = BLOCK[family]
    trainer = Trainer(make_config(sources[family], images, tmp_path / "run", align__weight=1.0,
                                  **({"align__block": block} if block is not None else {})))
    block = 1 if block is None else block
    batch = _fixed_batch(trainer)
    with torch.no_grad():
        _, parts = trainer._loss_and_parts(*batch)

    transformer, vae = _source(sources[family])
    captured = {}

    def hook(key):
        def capture(module, args, kwargs):
            captured[key] = args[0] if args else kwargs["hidden_states"]
        return capture

    pixel_block = trainer.model.blocks()[block][1]
    source_block = transformer.get_submodule(trainer.model.blocks()[block][0].removeprefix("transformer."))
    handles = [pixel_block.register_forward_pre_hook(hook("pixel"), with_kwargs=True),
               source_block.register_forward_pre_hook(hook("source"), with_kwargs=True)]
    with torch.no_grad():
        obj = trainer.objective
        x_t, _ = obj.noisy_and_target(batch.x0, batch.noise, batch.times)
        kwargs = trainer.family.call(batch.cond, x_t, obj.scheduler_timesteps(batch.times), trainer.model,
                                     trainer.cfg.objective.guidance)
        trainer.model(**kwargs)
        z0 = vae.encode(batch.x0).latent_dist.mean
        z0 = (z0 - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        z_t, _ = obj.noisy_and_target(z0, batch.source_noise, batch.times)
        if family == "flux":
            from diffusers import FluxPipeline

            z_t = FluxPipeline._pack_latents(z_t, *z_t.shape)
        transformer(**{**kwargs, "hidden_states": z_t})
    for handle in handles:
        handle.remove()
    pixel, source = captured["pixel"], captured["source"]
    assert pixel.shape == source.shape and pixel.shape[1] == 64  # 8x8 image tokens
    by_hand = 1 - torch.nn.functional.cosine_similarity(pixel, source, dim=-1).mean()
    torch.testing.assert_close(parts["align"], by_hand, rtol=1e-6, atol=1e-7)
    assert 0.01 < by_hand < 1.5


def test_training_raises_the_cosine_and_frozen_weights_stay(sources, images, tmp_path):
    cfg = make_config(sources["sd3"], images, tmp_path / "run", align__weight=1.0, train__max_steps=8,
                      optim__lr=3e-3, optim__schedule="constant", optim__warmup_steps=0,
                      data__caption_dropout=0.0, logging__tensorboard="true", logging__every=4)
    trainer = Trainer(cfg)
    batch = _fixed_batch(trainer)
    with torch.no_grad():
        before = trainer._loss_and_parts(*batch)[1]["align"].item()
    copies = {name: {n: t.detach().clone() for n, t in m.state_dict().items()}
              for name, m in (("transformer", trainer.align.transformer), ("vae", trainer.align.vae))}
    trainer.run()
    with torch.no_grad():
        after = trainer._loss_and_parts(*batch)[1]["align"].item()
    assert after < 0.8 * before, (before, after)

    # The source copy and the VAE encoder: frozen, in eval mode, bit-identical to the folder's.
    transformer, vae = _source(sources["sd3"])
    for name, module, reference in (("transformer", trainer.align.transformer, transformer),
                                    ("vae", trainer.align.vae, vae)):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
        state, ref = module.state_dict(), reference.state_dict()
        assert state and all(torch.equal(state[k], ref[k]) for k in state), name
        assert all(torch.equal(state[k], copies[name][k]) for k in state), name
    kept = {k.split(".")[1] for k in trainer.align.transformer.state_dict() if k.startswith("transformer_blocks.")}
    assert kept == {"0"}  # blocks from the compared one (1) on are not kept
    assert not any(k.startswith("decoder.") for k in trainer.align.vae.state_dict())
    # The pixel model's frozen blocks are the source's.
    src = dict(transformer.named_parameters())
    frozen = [(n, p) for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert any(".transformer_blocks.1." in n for n, _ in frozen)
    assert all(torch.equal(p, src[n.removeprefix("transformer.")]) for n, p in frozen)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["loss"] == pytest.approx(r["objective_loss"] + r["align"], rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/align")] == [4, 8]
    assert "train/objective_loss" in events.Tags()["scalars"]


def _state(trainer):
    named = dict(trainer.model.named_parameters())
    out = {n: named[n].detach().clone() for n in trainer.param_names}
    out.update({f"ema/{k}": v.clone() for k, v in trainer.ema.state_dict().items()})
    return out


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_resume_with_align_is_bit_identical(family, sources, images, tmp_path):
    extra = dict(align__weight=0.5, align__block=BLOCK[family])
    straight = Trainer(make_config(sources[family], images, tmp_path / "a", checkpoint__every=100, **extra))
    straight.run()
    Trainer(make_config(sources[family], images, tmp_path / "b", train__max_steps=3, **extra)).run()
    resumed = Trainer(make_config(sources[family], images, tmp_path / "b", train__resume="latest", **extra))
    assert resumed.step == 3
    resumed.run()
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    straight_records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["align"] for r in records] == [r["align"] for r in straight_records]


def test_accumulation_and_checkpointing_change_nothing(sources, images, tmp_path):
    """Batch 4 in one step = 2 x 2 accumulated with every block checkpointed: the block input
    is read once per forward, not again when the backward recomputes the block."""
    extra = dict(align__weight=1.0, train__max_steps=2)
    big = Trainer(make_config(sources["flux"], images, tmp_path / "a", train__batch_size=4, **extra))
    big.run()
    accum = Trainer(make_config(sources["flux"], images, tmp_path / "b", train__batch_size=2, train__grad_accum=2,
                                model__gradient_checkpointing="all", **extra))
    accum.run()
    assert accum.loss_parts["align"] == pytest.approx(big.loss_parts["align"], rel=1e-5)
    a, b = _state(big), _state(accum)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_low_memory_mode_aligns_from_cached_embeddings(sources, images, tmp_path):
    import shutil

    from l2p.data.embed import build_embedding_cache

    data = tmp_path / "data"
    shutil.copytree(images, data)
    build_embedding_cache(sources["sd3"], data, progress=False, device="cpu")
    trainer = Trainer(make_config(sources["sd3"], data, tmp_path / "run", train__max_steps=2,
                                  data__embeddings="auto", low_memory__enabled="true", align__weight=1.0))
    assert all(p.dtype == torch.bfloat16 for m in (trainer.align.transformer, trainer.align.vae)
               for p in m.parameters())
    result = trainer.run()
    assert all(torch.isfinite(torch.tensor(result.losses))) and 0 < trainer.loss_parts["align"] < 2


def test_two_processes_match_one_with_align(sources, images, tmp_path):
    """DDP and FSDP2 (2 gloo processes) follow the single process: each rank keeps its own
    frozen source copy, and the term is averaged over the global batch like the loss."""
    import socket

    common = dict(train__max_steps=2, checkpoint__every=0, optim__schedule="constant", optim__warmup_steps=0,
                  align__weight=1.0)
    train(load_config(None, overrides(sources["sd3"], images, tmp_path / "single", train__batch_size=4, **common)))
    runs = [overrides(sources["sd3"], images, tmp_path / strategy, train__batch_size=2,
                      distributed__strategy=strategy, **common) for strategy in ("ddp", "fsdp")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(2, port, runs), nprocs=2, join=True)

    def records(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    single = load_file(str(tmp_path / "single" / "final" / "delta-raw.safetensors"))
    for strategy in ("ddp", "fsdp"):
        for a, b in zip(records("single"), records(strategy), strict=True):
            for key in ("loss", "align", "objective_loss"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (strategy, key)
        multi = load_file(str(tmp_path / strategy / "final" / "delta-raw.safetensors"))
        assert all(torch.allclose(single[k], multi[k], rtol=1e-3, atol=1e-5) for k in single), strategy


@pytest.mark.parametrize("family", ["z_image", "lumina2"])
def test_joint_sequences_compare_the_image_tokens(family):
    """Z-Image and Lumina2 put caption tokens into the sequence of their main blocks; what the
    term compares there are the image tokens, which the noise refiner (image tokens alone)
    hands over. Captions of different lengths place Lumina2's image tokens differently."""
    from l2p import testing
    from l2p.adapters import get_adapter

    pipe = getattr(testing, f"build_tiny_{family}_pipeline")()
    transformer = pipe.transformer
    adapter = get_adapter(type(transformer).__name__, dict(transformer.config))
    torch.manual_seed(0)
    rows = cols = 4
    latent = adapter.source_latent(torch.randn(2, adapter.latent_channels, rows * adapter.latent_patch,
                                               cols * adapter.latent_patch))
    t = torch.tensor([0.3, 0.7])
    if family == "z_image":
        kwargs = dict(x=latent, t=t, cap_feats=[torch.randn(5, 24), torch.randn(9, 24)])
    else:
        mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
        kwargs = dict(hidden_states=latent, encoder_hidden_states=torch.randn(2, 9, 24), encoder_attention_mask=mask,
                      timestep=t)
    seen = {}
    handles = [transformer.noise_refiner[-1].register_forward_hook(lambda m, a, out: seen.update(refined=out)),
               transformer.layers[0].register_forward_pre_hook(lambda m, a: seen.update(joint=a[0]))]
    with torch.no_grad():
        transformer(**kwargs)
    for handle in handles:
        handle.remove()
    n = rows * cols
    assert seen["joint"].shape[1] > n  # captions share the sequence
    image = adapter.block_input_tokens("layers", seen["joint"], n, kwargs)
    assert torch.equal(image, adapter.block_input_tokens("noise_refiner", seen["refined"], n, kwargs))


def test_latents_are_normalised_as_the_pipelines_read_them():
    """encode_latents inverts what each pipeline does before decoding: FLUX/SD3/Z-Image
    ``z / scaling_factor + shift_factor``, Sana ``z / scaling_factor``, Qwen-Image
    ``z * latents_std + latents_mean`` (its VAE takes a frame axis)."""
    from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLQwenImage

    from l2p.train.source import encode_latents

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    kl = AutoencoderKL(latent_channels=4, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, scaling_factor=0.5,
                       shift_factor=0.1).eval()
    dc = AutoencoderDC(latent_channels=8, attention_head_dim=8, encoder_block_out_channels=(8, 16),
                       decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                       decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                       decoder_qkv_multiscales=((), ()), encoder_block_types="ResBlock",
                       decoder_block_types="ResBlock", scaling_factor=0.4).eval()
    qwen = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1,
                                  temperal_downsample=[False]).eval()
    with torch.no_grad():
        raw = kl.encode(x).latent_dist.mean
        torch.testing.assert_close(encode_latents(kl, x) / 0.5 + 0.1, raw)
        torch.testing.assert_close(encode_latents(dc, x) / 0.4, dc.encode(x).latent)
        raw = qwen.encode(x.unsqueeze(2)).latent_dist.mean.squeeze(2)
        mean = torch.tensor(qwen.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(qwen.config.latents_std).view(1, -1, 1, 1)
        assert not torch.allclose(mean, torch.zeros_like(mean))
        torch.testing.assert_close(encode_latents(qwen, x) * std + mean, raw)
