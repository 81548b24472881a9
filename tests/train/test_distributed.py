"""Two CPU processes (gloo) with DDP or FSDP2 follow the single-process run with the same
global batch: same samples, noise and times per global slot, averaged gradients."""

from __future__ import annotations

import json
import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from _trainkit import overrides
from _dist_worker import run_rank, run_rank_own_folder
from l2p.train.config import load_config
from l2p.train.loop import train

# run folder -> how it is distributed
STRATEGIES = {"ddp": {"distributed__strategy": "ddp"}, "fsdp": {"distributed__strategy": "fsdp"},
              # Frozen blocks in host memory (FSDP2 CPUOffloadPolicy); on the CPU the copies are
              # no-ops, so this checks the wrapping and the arithmetic, not the memory saved. The
              # tiny source has two blocks: train none of them, so both are frozen.
              "fsdp-offload": {"distributed__strategy": "fsdp", "low_memory__cpu_offload": True,
                               "model__trainable": "first_last:0"}}


def _free_ports(n: int) -> int:
    """A base port with n free ports after it (best effort)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535:
            return base


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(sources, images, tmp_path):
    # The gradient norms here are about 0.3: a clip at 0.05 acts at every step, so DDP and
    # FSDP2 must clip by the whole model's norm (FSDP2: over all shards) to match one process.
    common = dict(train__max_steps=4, checkpoint__every=2, optim__schedule="constant", optim__warmup_steps=0,
                  optim__grad_clip=0.05)
    single = tmp_path / "single"
    train(load_config(None, overrides(sources["pixart"], images, single, train__batch_size=4, **common)))
    single_frozen = tmp_path / "single-frozen"
    train(load_config(None, overrides(sources["pixart"], images, single_frozen, train__batch_size=4,
                                      model__trainable="first_last:0", **common)))

    def two(name, **extra):
        return overrides(sources["pixart"], images, tmp_path / name, train__batch_size=2, **{**common, **extra})

    runs = [two("ddp", **STRATEGIES["ddp"]),
            two("fsdp", **STRATEGIES["fsdp"], sample__every=2, sample__prompts="[a red square]", sample__steps=2),
            two("fsdp-offload", **STRATEGIES["fsdp-offload"])]
    # An FSDP run stopped at step 2 and resumed from its sharded checkpoint.
    runs += [two("fsdp-resumed", distributed__strategy="fsdp", train__max_steps=2),
             two("fsdp-resumed", distributed__strategy="fsdp", train__resume="latest")]
    # The same for DDP (one checkpoint, every rank's RNG state beside it).
    runs += [two("ddp-resumed", distributed__strategy="ddp", train__max_steps=2),
             two("ddp-resumed", distributed__strategy="ddp", train__resume="latest")]
    mp.spawn(run_rank, args=(2, _free_ports(len(runs)), runs), nprocs=2, join=True)
    for strategy in STRATEGIES:
        reference = single_frozen if strategy == "fsdp-offload" else single
        final_a = load_file(str(reference / "final" / "delta-raw.safetensors"))
        multi = tmp_path / strategy
        a, b = _losses(reference), _losses(multi)
        assert len(a) == len(b) == 4
        assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6), (strategy, a, b)
        final_b = load_file(str(multi / "final" / "delta-raw.safetensors"))
        assert final_a.keys() == final_b.keys()
        for k in final_a:
            assert torch.allclose(final_a[k], final_b[k], rtol=1e-3, atol=1e-5), (strategy, k)
    layers = json.loads((sources["pixart"] / "transformer" / "config.json").read_text())["num_layers"]
    assert (tmp_path / "fsdp-offload" / "offloaded-blocks.txt").read_text() == str(layers)
    assert (tmp_path / "fsdp" / "offloaded-blocks.txt").read_text() == "0"
    # FSDP checkpoints hold one shard file per rank, and resuming from them is exact.
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "step-00000004").glob("trainable*"))
    assert shards == ["trainable-rank0.safetensors", "trainable-rank1.safetensors"]
    for strategy in ("fsdp", "ddp"):
        for name in ("delta-raw", "delta"):
            straight = load_file(str(tmp_path / strategy / "final" / f"{name}.safetensors"))
            resumed = load_file(str(tmp_path / f"{strategy}-resumed" / "final" / f"{name}.safetensors"))
            assert straight.keys() == resumed.keys()
            assert all(torch.equal(straight[k], resumed[k]) for k in straight), (strategy, name)
        assert _losses(tmp_path / f"{strategy}-resumed") == _losses(tmp_path / strategy)

    # FSDP exports what a single process exports: the EMA delta and the merged pipeline, and
    # it renders sample grids (every rank samples, rank 0 writes).
    single_ema = load_file(str(single / "final" / "delta.safetensors"))
    fsdp_ema = load_file(str(tmp_path / "fsdp" / "final" / "delta.safetensors"))
    assert single_ema.keys() == fsdp_ema.keys()
    for k in single_ema:
        assert torch.allclose(single_ema[k], fsdp_ema[k], rtol=1e-3, atol=1e-5), k
    from l2p.models import PixelTransformer2DModel
    exported = dict(PixelTransformer2DModel.from_pretrained(
        str(tmp_path / "fsdp" / "final" / "pipeline" / "transformer")).named_parameters())
    assert all(torch.equal(exported[k], fsdp_ema[k]) for k in fsdp_ema)
    for grid in ("step-00000002.png", "final.png"):
        assert (tmp_path / "fsdp" / "samples" / grid).is_file()


def test_one_process_under_torchrun_runs_fsdp_with_offload(sources, images, tmp_path, monkeypatch):
    """torchrun --nproc-per-node 1: a process group of one, FSDP2 with the frozen blocks in
    host memory, the same run as without torchrun."""
    from l2p.torchrun import DistEnv

    common = dict(train__max_steps=3, train__batch_size=2, optim__schedule="constant", optim__warmup_steps=0,
                  checkpoint__every=0, model__trainable="first_last:0")
    plain = train(load_config(None, overrides(sources["pixart"], images, tmp_path / "plain", **common)))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_ports(1)))
    launched = DistEnv(rank=0, world_size=1, local_rank=0, launched=True)
    offloaded = train(load_config(None, overrides(sources["pixart"], images, tmp_path / "offload", **common,
                                                  distributed__strategy="fsdp", low_memory__cpu_offload=True)),
                      launched)
    assert not torch.distributed.is_initialized()  # the run leaves no process group behind
    layers = json.loads((sources["pixart"] / "transformer" / "config.json").read_text())["num_layers"]
    assert (plain.offloaded_blocks, offloaded.offloaded_blocks) == (0, layers)
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(offloaded.losses), rtol=1e-5, atol=1e-7)
    a = load_file(str(tmp_path / "plain" / "final" / "delta-raw.safetensors"))
    b = load_file(str(tmp_path / "offload" / "final" / "delta-raw.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_fsdp_keeps_frozen_blocks_in_the_low_memory_dtype(sources, images, tmp_path, monkeypatch):
    """low_memory under FSDP2 (one process under torchrun, with and without offload): the frozen
    blocks are sharded and offloaded in bf16, as without FSDP, and the run follows the
    single-process low-memory run."""
    import shutil

    from l2p.data.embed import build_embedding_cache
    from l2p.torchrun import DistEnv
    from l2p.train.distributed import shutdown_distributed
    from l2p.train.loop import Trainer

    data = tmp_path / "data"
    shutil.copytree(images, data)
    build_embedding_cache(sources["pixart"], data, progress=False, device="cpu")
    common = dict(train__max_steps=3, train__batch_size=2, optim__schedule="constant", optim__warmup_steps=0,
                  checkpoint__every=0, data__embeddings="auto", low_memory__enabled=True)
    plain = train(load_config(None, overrides(sources["pixart"], data, tmp_path / "plain", **common)))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for offload in (False, True):
        monkeypatch.setenv("MASTER_PORT", str(_free_ports(1)))
        cfg = load_config(None, overrides(sources["pixart"], data, tmp_path / f"fsdp-{offload}", **common,
                                          distributed__strategy="fsdp", low_memory__cpu_offload=offload))
        trainer = Trainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, launched=True))
        try:
            frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
            assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
            assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
            result = trainer.run()
        finally:
            shutdown_distributed()
        assert torch.allclose(torch.tensor(plain.losses), torch.tensor(result.losses), rtol=1e-4, atol=1e-6)


def test_resume_on_another_world_size(sources, images, tmp_path):
    """A checkpoint resumes on another number of processes or another strategy: FSDP2 shards of
    2 ranks on one process and under DDP, and one process's checkpoint under FSDP2 on 2 ranks,
    at the same global batch, follow the uninterrupted one-process run (raw and EMA weights,
    losses)."""
    common = dict(train__max_steps=4, checkpoint__every=2, optim__schedule="constant", optim__warmup_steps=0)
    reference = tmp_path / "reference"
    train(load_config(None, overrides(sources["pixart"], images, reference, train__batch_size=4, **common)))
    two_then_one, one_then_two = tmp_path / "two-then-one", tmp_path / "one-then-two"
    train(load_config(None, overrides(sources["pixart"], images, one_then_two, train__batch_size=4,
                                      **dict(common, train__max_steps=2))))
    fsdp = dict(common, train__batch_size=2, distributed__strategy="fsdp")
    fsdp_then_ddp = tmp_path / "fsdp-then-ddp"
    runs = [overrides(sources["pixart"], images, two_then_one, **dict(fsdp, train__max_steps=2)),
            overrides(sources["pixart"], images, one_then_two, train__resume="latest", **fsdp),
            overrides(sources["pixart"], images, fsdp_then_ddp, **dict(fsdp, train__max_steps=2)),
            overrides(sources["pixart"], images, fsdp_then_ddp, train__resume="latest",
                      **dict(fsdp, distributed__strategy="ddp"))]
    mp.spawn(run_rank, args=(2, _free_ports(len(runs)), runs), nprocs=2, join=True)
    assert sorted(p.name for p in (two_then_one / "checkpoints" / "step-00000002").glob("trainable*")) == \
        ["trainable-rank0.safetensors", "trainable-rank1.safetensors"]
    train(load_config(None, overrides(sources["pixart"], images, two_then_one, train__batch_size=4,
                                      train__resume="latest", **common)))
    for run in (two_then_one, one_then_two, fsdp_then_ddp):
        assert torch.allclose(torch.tensor(_losses(reference)), torch.tensor(_losses(run)), rtol=1e-5, atol=1e-7)
        for name in ("delta-raw", "delta"):
            a = load_file(str(reference / "final" / f"{name}.safetensors"))
            b = load_file(str(run / "final" / f"{name}.safetensors"))
            assert a.keys() == b.keys()
            for k in a:
                assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), (run.name, name, k)


def test_output_folder_not_shared_by_the_ranks_is_refused_at_the_start(sources, images, tmp_path):
    """Ranks that see different train.output_dir folders (node-local disks; here each rank is
    given its own) stop before training, all with the same ConfigError, instead of one failing
    to write into the checkpoint folder rank 0 made (and the other losing its peer) at the first
    checkpoint."""
    outs = [tmp_path / f"node{r}" / "run" for r in range(2)]
    per_rank = [overrides(sources["pixart"], images, out, train__max_steps=2, checkpoint__every=1) for out in outs]
    errors = mp.Manager().dict()
    mp.spawn(run_rank_own_folder, args=(2, _free_ports(1), per_rank, errors), nprocs=2, join=True)
    assert sorted(errors.keys()) == [0, 1]
    for rank in (0, 1):
        message = errors[rank]
        assert message.startswith("ConfigError: train.output_dir") and "rank(s) 1 of 2" in message, message
    assert not any(out.joinpath("checkpoints").exists() for out in outs)
    assert not list(outs[0].glob(".l2p-shared-*"))  # the probe file is removed


def test_fsdp_export_over_a_bf16_source_keeps_the_trained_tensors_as_trained(sources, images, tmp_path, monkeypatch):
    """A source stored in bf16: the trainer trains in float32, and the FSDP2 export (a fresh
    conversion, bf16, + the delta) writes the trained tensors in float32 exactly, as the
    single-process export does, instead of rounding them to the source's bf16."""
    import shutil

    from safetensors.torch import save_file

    from l2p.torchrun import DistEnv

    source = tmp_path / "pixart-bf16"
    shutil.copytree(sources["pixart"], source)
    original = {}
    for weights in (source / "transformer").glob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}
        original.update(tensors)
        save_file(tensors, str(weights), metadata={"format": "pt"})
    common = dict(train__max_steps=2, train__batch_size=2, optim__schedule="constant", optim__warmup_steps=0,
                  checkpoint__every=0, model__trainable="first_last:0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_ports(1)))
    train(load_config(None, overrides(source, images, tmp_path / "fsdp", **common, distributed__strategy="fsdp")),
          DistEnv(rank=0, world_size=1, local_rank=0, launched=True))
    train(load_config(None, overrides(source, images, tmp_path / "single", **common)))
    for run in ("fsdp", "single"):
        delta = load_file(str(tmp_path / run / "final" / "delta.safetensors"))
        stored = {}
        for weights in (tmp_path / run / "final" / "pipeline" / "transformer").glob("*.safetensors"):
            stored.update(load_file(str(weights)))
        assert delta and all(v.dtype == torch.float32 for v in delta.values())
        assert all(torch.equal(stored[k], v) for k, v in delta.items()), run
        # The frozen blocks keep the source's values (the FSDP export in the source's bf16, the
        # single-process one as the float32 copy the run held).
        frozen = [k for k in original if k.startswith("transformer_blocks.")]
        assert frozen and all(torch.equal(stored[f"transformer.{k}"].float(), original[k].float()) for k in frozen)
    assert not (tmp_path / "fsdp" / "final" / ".pipeline-unmerged").exists()
