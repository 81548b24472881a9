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
    assert trainer.optimizer.param_groups[0]["fused"] is True
    assert all(p.is_cuda and p.dtype == torch.float32 for p in trainer.params)
    result = trainer.run()
    assert all(torch.isfinite(torch.tensor(result.losses)))
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
    assert all(torch.isfinite(torch.tensor(trainer.run().losses)))
