"""Pipeline folders whose components are stored only as a variant (save_pretrained(...,
variant="fp16") writes model.fp16.safetensors and diffusion_pytorch_model.fp16.safetensors,
nothing else): every loader of l2p reads them, not only the transformer's."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from l2p.conversion import convert_folder
from l2p.conversion.folders import pipeline_variant
from l2p.data.generate import load_pipeline
from l2p.sample.pipeline import L2PPipeline
from l2p.testing import build_tiny_pixart_sigma_pipeline
from l2p.train.source import open_source

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    pipe = build_tiny_pixart_sigma_pipeline()
    pipe.save_pretrained(root / "fp16", safe_serialization=True, variant="fp16")
    pipe.save_pretrained(root / "plain", safe_serialization=True)
    return root


def test_the_folder_holds_only_variant_weights(folders):
    weights = sorted(p.relative_to(folders / "fp16").as_posix() for p in (folders / "fp16").rglob("*.safetensors"))
    assert weights == ["text_encoder/model.fp16.safetensors", "transformer/diffusion_pytorch_model.fp16.safetensors",
                       "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert pipeline_variant(folders / "fp16") == "fp16"
    assert pipeline_variant(folders / "plain") is None


def test_every_loader_reads_variant_only_components(folders, tmp_path):
    src = folders / "fp16"
    stored = load_file(str(src / "text_encoder" / "model.fp16.safetensors"))[KEY]

    # l2p data generate / embed
    pipe = load_pipeline(src)
    assert torch.equal(pipe.text_encoder.state_dict()[KEY], stored)
    assert pipe.vae is not None

    # the trainer's source: VAE encoder and text encoders
    source = open_source(str(src))
    assert source.load_vae_encoder() is not None
    text = source.load_text_pipeline(torch.device("cpu"))
    assert torch.equal(text.text_encoder.state_dict()[KEY], stored)

    # l2p convert copies the text encoder as stored; the sampler reads it back
    convert_folder(src, tmp_path / "px")
    sampler = L2PPipeline.from_pretrained(tmp_path / "px")
    assert torch.equal(sampler.text_pipeline.text_encoder.state_dict()[KEY], stored)


def test_components_of_different_variants_are_one_clear_error(folders, tmp_path):
    src = tmp_path / "mixed"
    shutil.copytree(folders / "fp16", src)
    vae = src / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    vae.rename(vae.with_name("diffusion_pytorch_model.bf16.safetensors"))
    with pytest.raises(ValueError, match=r"only as different variants \(text_encoder: fp16, transformer: fp16, "
                                         r"vae: bf16\); diffusers loads one variant per pipeline"):
        load_pipeline(src)
    # A component the caller skips does not count.
    assert pipeline_variant(src, skip={"vae"}) == "fp16"
