"""The GPU paths: bf16 autocast, fused AdamW, CUDA RNG in checkpoints, low-memory mode."""

from __future__ import annotations

import pytest
import torch

from _trainkit import FAMILIES, make_config
from l2p.train.loop import Trainer

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_fused_training_and_resume_on_gpu(family, sources, images, tmp_path):
    extra = dict(train__device="cuda", model__gradient_checkpointing="trainable", train__max_steps=3)
    trainer = Trainer(make_config(sources[family], images, tmp_path / "run", **extra))
    assert trainer.autocast_dtype == torch.bfloat16
    with trainer._attention_backends():  # train.cudnn_attention is off by default
        assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert trainer.optimizer.param_groups[0]["fused"] is True
    assert all(p.is_cuda and p.dtype == torch.float32 for p in trainer.params)
    result = trainer.run()
    # A finite loss is not enough: a step whose gradient is not finite is skipped, not failed.
    assert all(torch.isfinite(torch.tensor(result.losses))) and trainer.skipped_steps == 0
    rng = (tmp_path / "run" / "checkpoints" / "step-00000003" / "rng-rank0.safetensors")
    from safetensors.torch import load_file
    assert "torch_cuda_0" in load_file(str(rng))
    resumed = Trainer(make_config(sources[family], images, tmp_path / "run", train__resume="latest",
                                  **dict(extra, train__max_steps=5)))
    assert resumed.step == 3
    assert resumed.run().step == 5


def test_low_memory_on_gpu(sources, images, tmp_path):
    import shutil

    from l2p.data.embed import build_embedding_cache

    data = tmp_path / "data"
    shutil.copytree(images, data)
    build_embedding_cache(sources["flux"], data, progress=False, device="cuda")
    trainer = Trainer(make_config(sources["flux"], data, tmp_path / "run", train__device="cuda",
                                  data__embeddings="auto", low_memory__enabled="true",
                                  model__gradient_checkpointing="all"))
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters() if not p.requires_grad)
    assert all(torch.isfinite(torch.tensor(trainer.run().losses))) and trainer.skipped_steps == 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_align_under_bf16_autocast_on_gpu(family, sources, images, tmp_path):
    """The alignment term with bf16 autocast and checkpointed trainable blocks: the source copy
    sits on the GPU, the term is taken in fp32 and the run resumes."""
    extra = dict(train__device="cuda", model__gradient_checkpointing="trainable", train__max_steps=2,
                 align__weight=1.0, align__block=1)
    trainer = Trainer(make_config(sources[family], images, tmp_path / "run", **extra))
    assert all(p.is_cuda for p in trainer.align.transformer.parameters())
    batch = trainer._micro_batch(step=0, slots=[0, 1], batch=trainer._load([0, 1]))
    with torch.no_grad():
        _, parts = trainer._loss_and_parts(*batch)
    assert parts["align"].dtype == torch.float32 and 0 < parts["align"].item() < 2
    result = trainer.run()
    assert all(torch.isfinite(torch.tensor(result.losses))) and 0 < trainer.loss_parts["align"] < 2
    assert trainer.skipped_steps == 0
    resumed = Trainer(make_config(sources[family], images, tmp_path / "run", train__resume="latest",
                                  **dict(extra, train__max_steps=3)))
    assert resumed.run().step == 3
