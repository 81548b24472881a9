"""``fit_pixel_embedding`` (``model.embed_init=vae``): with an encoder that is exactly linear
per patch, the fitted pixel embedding gives, for every family, the tokens the source's own
input projection gives for the encoded latent, in the source's own forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from l2p.conversion.embedding_init import fit_pixel_embedding

from _families import FAMILIES, PATCH
from test_families import inputs, make

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class _Stop(Exception):
    pass


def _input_projection_output(model_or_source, module_name: str, call) -> torch.Tensor:
    """What the module at ``module_name`` returns in the forward ``call`` runs (stopped there)."""
    seen = {}

    def hook(module, args, out):
        seen["out"] = out
        raise _Stop

    handle = model_or_source.get_submodule(module_name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            call()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["out"]


def _linear_encoder(name: str, channels: int, factor: int):
    """A stand-in VAE encoder that is exactly linear per factor x factor pixel block."""
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(channels, 3, factor, factor, generator=g) / factor
    bias = torch.randn(channels, generator=g)
    return lambda images: F.conv2d(images, weight, bias, stride=factor)


@pytest.mark.parametrize("name", FAMILIES)
def test_fitted_embedding_reproduces_the_source_tokens(name):
    source, model = make(name)
    adapter = model.adapter
    p_pixel, p_latent = PATCH[name], adapter.latent_patch
    encode = _linear_encoder(name, adapter.latent_channels, p_pixel // p_latent)
    # Enough random patches to pin down every pixel direction (3 P^2 of them), unregularised.
    dims = 3 * p_pixel * p_pixel
    g = torch.Generator().manual_seed(3)
    side = 4 * p_pixel
    count = dims // 16 + 16
    batches = [torch.rand(8, 3, side, side, generator=g) * 2 - 1 for _ in range(count // 8 + 1)]
    fit = fit_pixel_embedding(model, source, encode, batches, ridge=0.0)
    assert fit.patches == len(batches) * 8 * 16
    assert fit.explained == pytest.approx(1.0, abs=1e-6)

    x, kwargs = inputs(name)
    latent = adapter.source_latent(encode(x))
    expected = _input_projection_output(
        source, adapter.input_module, lambda: source(**{adapter.pixel_argument: latent}, **kwargs))
    got = _input_projection_output(model.transformer, adapter.input_module, lambda: model(x, **kwargs))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_ridge_shrinks_and_bad_input_is_refused():
    name = "PixArtTransformer2DModel"
    source, model = make(name)
    encode = _linear_encoder(name, model.adapter.latent_channels, 8)
    g = torch.Generator().manual_seed(3)
    batches = [torch.rand(8, 3, 64, 64, generator=g) * 2 - 1 for _ in range(8)]
    exact = fit_pixel_embedding(model, source, encode, batches, ridge=0.0)
    exact_weight = model.pixel_embed.weight.detach().clone()
    shrunk = fit_pixel_embedding(model, source, encode, batches, ridge=10.0)
    assert shrunk.explained < exact.explained
    assert model.pixel_embed.weight.norm() < exact_weight.norm()
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        fit_pixel_embedding(model, source, encode, batches, ridge=-1.0)
    with pytest.raises(TypeError, match="what l2p.convert_to_pixel returns"):
        fit_pixel_embedding(source, source, encode, batches)
    with pytest.raises(ValueError, match="at least one batch"):
        fit_pixel_embedding(model, source, encode, [], ridge=0.1)
    with pytest.raises(ValueError, match="token grid"):
        fit_pixel_embedding(model, source, lambda images: encode(images)[..., :-1], batches)

    # An image off the pixel patch grid was blamed on the patch size ("must keep the source's
    # token grid (model.patch_size=null)").
    with pytest.raises(ValueError, match="image size 72x64 is not a multiple of patch_size 16"):
        fit_pixel_embedding(model, source, encode, [torch.rand(1, 3, 72, 64, generator=g) * 2 - 1])
