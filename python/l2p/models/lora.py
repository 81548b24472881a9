"""LoRAs fused into the pixel model's weights: ones trained for the source model, and ones
trained on the pixel model itself.

L2P copies every source layer it keeps bit for bit and under the same name, so a LoRA made for
the source (its transformer, its text encoders) names layers the pixel pipeline still has. A
LoRA trained on the pixel model (PEFT on a ``PixelTransformer2DModel``) names them with the
pixel model's prefix (``transformer.transformer_blocks...``) and may also name the Detailer
Head's convs (``head...``); both namings are found.
Fusing writes ``W + scale * alpha / r * B @ A`` into each such layer, which needs neither PEFT
nor any change to the forward. ``unfuse_lora`` puts the original tensors back exactly (they are
kept on the CPU while a LoRA is fused).

Files are read with safetensors only. Formats other than diffusers' own (kohya, BFL, xlabs,
...) are converted by the source pipeline's ``lora_state_dict`` when its class has one (diffusers'
LoRA loader mixins), so a file that diffusers loads for the source loads here.

Two things differ from the source by construction and are reported, not hidden:
- LoRA layers on the latent input projection or the final projection have nothing to act on:
  the pixel model replaced those layers (pixel embedding, Detailer Head); they are skipped.
- The first and last blocks L2P trained have moved away from the source's weights; a LoRA's
  update there was learned against the old weights and acts on the new ones.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

logger = logging.getLogger(__name__)

# The file name diffusers' save_lora_weights writes, looked for when a folder is given.
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
# The safetensors header entry in which diffusers records the PEFT LoraConfig (r, lora_alpha, ...).
ADAPTER_METADATA_KEY = "lora_adapter_metadata"

_LAYER_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<half>A|B)(?:\.[A-Za-z0-9_]+)?\.(?P<param>weight|bias)$")


@dataclass
class LoraFile:
    """A LoRA in diffusers' naming: ``<component>.<module>.lora_A/B.weight``."""

    path: str
    state_dict: dict[str, torch.Tensor]
    # "<component>.<module>" -> alpha, from ``.alpha`` entries (kohya-style files diffusers kept as is).
    alphas: dict[str, float] = field(default_factory=dict)
    # The PEFT LoraConfig diffusers stored in the header, per component ({} when absent).
    configs: dict[str, dict] = field(default_factory=dict)


@dataclass
class FusedLora:
    """What one ``fuse_lora`` call changed, enough to undo it exactly."""

    path: str
    scale: float
    fused: list[str]                   # "<component>.<module>" names whose weight changed
    skipped: dict[str, str]            # "<component>.<module>" -> why it was not fused
    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)


def read_lora(path: str | Path, pipeline_class: type | None = None) -> LoraFile:
    """Read a LoRA ``.safetensors`` file (or a folder holding diffusers' pytorch_lora_weights
    file), converted to diffusers' naming by ``pipeline_class.lora_state_dict`` when given."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_LORA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} holds no {DIFFUSERS_LORA_FILE}; pass the LoRA's "
                                    f".safetensors file itself")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRAs are read from .safetensors files only (no pickle); convert "
                         f"it with safetensors.torch.save_file first")
    try:
        state_dict = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    configs = _adapter_configs(header.get(ADAPTER_METADATA_KEY), path)

    loader = getattr(pipeline_class, "lora_state_dict", None)
    if loader is not None:
        # diffusers converts the other trainers' formats; the dict is passed in, so nothing
        # is read by it (no pickle, no hub).
        kwargs = {"return_alphas": True} if "return_alphas" in inspect.signature(loader).parameters else {}
        try:
            converted = loader(dict(state_dict), **kwargs)
        except (ValueError, KeyError) as err:
            raise ValueError(f"{path}: {pipeline_class.__name__}.lora_state_dict cannot read this "
                             f"file as a LoRA of its model ({err})") from None
        state_dict, alphas = converted if kwargs else (converted, None)
        state_dict = {**state_dict, **{k: torch.as_tensor(v) for k, v in (alphas or {}).items()}}
    return _split_alphas(str(path), state_dict, configs)


def _adapter_configs(raw: str | None, path: Path) -> dict[str, dict]:
    """The header's LoraConfig, by component. diffusers writes "transformer.r", ... for a pipeline's
    LoRA and plain "r", ... for one model's (taken as the transformer's)."""
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: its {ADAPTER_METADATA_KEY} header entry is not JSON") from None
    if "r" in flat or "lora_alpha" in flat:
        return {"transformer": flat}
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _split_alphas(path: str, state_dict: dict, configs: dict) -> LoraFile:
    layers, alphas = {}, {}
    for key, value in state_dict.items():
        if key.endswith(".alpha"):
            module = re.sub(r"\.(lora_A|lora_down)$", "", key[: -len(".alpha")])
            alphas[_qualified(module)] = float(value)
        elif "lora_magnitude_vector" in key or "dora_scale" in key:
            raise ValueError(f"{path} is a DoRA ({key}); only plain LoRA (lora_A/lora_B) can be fused")
        elif _LAYER_KEY.match(key):
            layers[key] = value
        else:
            raise ValueError(f"{path}: {key!r} is not a LoRA layer key in diffusers' naming (<module>.lora_A.weight / "
                             f"lora_B.weight): other trainers' names (lora_down/lora_up) are converted only for "
                             f"families whose diffusers pipeline loads LoRAs, and LoKr, LoHa and other adapters "
                             f"are not supported")
    if not layers:
        raise ValueError(f"{path} holds no LoRA layers (no lora_A/lora_B weights)")
    return LoraFile(path, layers, alphas, configs)


def _qualified(name: str) -> str:
    """'<component>.<module>': diffusers prefixes each key with its component; a key without a
    known component prefix is the transformer's (what ``save_lora_adapter`` writes)."""
    component, _, rest = name.partition(".")
    if rest and (component == "transformer" or component.startswith("text_encoder")):
        return name
    return f"transformer.{name}"


def _pattern_value(patterns: dict, module: str):
    """PEFT's rank/alpha_pattern lookup: a pattern names a module by its trailing dotted parts."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{pattern})$", module):
            return value
    return None


def _scale_of(lora: LoraFile, component: str, module: str, rank: int) -> float:
    """alpha / r as PEFT applies it (alpha / sqrt(r) with rsLoRA); alpha = r when the file
    records none, diffusers' convention for such files."""
    config = lora.configs.get(component, {})
    alpha = lora.alphas.get(f"{component}.{module}")
    if alpha is None and config:
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
        if alpha is None:
            alpha = config.get("lora_alpha")
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _layers(lora: LoraFile) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(component, module) -> {"A": ..., "B": ..., optionally "bias"}."""
    layers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in lora.state_dict.items():
        match = _LAYER_KEY.match(key)
        component, _, module = _qualified(match["module"]).partition(".")
        slot = "bias" if match["param"] == "bias" else match["half"]
        if slot == "bias" and match["half"] == "A":
            raise ValueError(f"{lora.path}: {key} is a bias on lora_A, which LoRA does not have")
        layers.setdefault((component, module), {})[slot] = value
    for (component, module), parts in layers.items():
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"{lora.path}: {component}.{module} has lora_"
                             f"{'B' if 'A' in parts else 'A'}.weight missing; the file is incomplete")
    return layers


def _delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A shaped like the layer's weight (Linear, or Conv2d whose LoRA is a conv then a 1x1)."""
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"rank mismatch: lora_A has {a.shape[0]} rows, lora_B {b.shape[1]} columns")
    return (b.flatten(1).float() @ a.flatten(1).float()).reshape(b.shape[0], *a.shape[1:])


def _find_layer(root: nn.Module, module: str, source_prefix: str) -> tuple[str, bool]:
    """Where ``module`` is in ``root``: (its name in ``root``, whether it names a source layer).
    A name of ``root``'s own (a LoRA trained on the pixel model) is taken first; else the
    source's layer of that name under ``source_prefix`` (a LoRA made for the source). Without
    a prefix ``root`` is the source itself."""
    for path, as_source in ((module, not source_prefix), (source_prefix + module, True)):
        try:
            root.get_submodule(path)
        except AttributeError:
            continue
        return path, as_source
    raise AttributeError(module)


def fuse_lora(components: dict[str, nn.Module], lora: LoraFile, scale: float = 1.0, *,
              replaced: dict[str, set[str]] | None = None,
              source_prefix: dict[str, str] | None = None) -> FusedLora:
    """Add ``scale * alpha / r * B @ A`` to every layer the LoRA names.

    ``components`` maps diffusers' component names ("transformer", "text_encoder", ...) to the
    modules whose submodule names the LoRA uses. ``source_prefix`` says, per component, where
    the source model's layers are inside that module ("transformer." in the pixel model): a
    LoRA may then name either the module's own layers (one trained on the pixel model, its
    Detailer Head included) or the source's (one made for the source). ``replaced`` names, per
    component, the source layers the pixel model put its own modules in place of: a source
    LoRA's layers there are skipped (a pixel-model LoRA's names for those modules are fused).
    Nothing is changed unless every layer that is to be fused fits (checked first).
    """
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"lora scale must be a finite number, got {scale!r}")
    plan, skipped = [], {}
    for (component, module), parts in sorted(_layers(lora).items()):
        name = f"{component}.{module}"
        root = components.get(component)
        if root is None:
            skipped[name] = f"this pipeline has no {component}"
            continue
        try:
            path, as_source = _find_layer(root, module, (source_prefix or {}).get(component, ""))
        except AttributeError:
            skipped[name] = f"no such layer in the {component}"
            continue
        if as_source and any(module == r or module.startswith(r + ".")
                             for r in (replaced or {}).get(component, ())):
            skipped[name] = "the pixel model replaced this layer (pixel embedding or output head)"
            continue
        layer = root.get_submodule(path)
        if hasattr(layer, "weight_int8"):
            raise ValueError(f"{name} is quantized (int8): fuse LoRAs before quantize_int8")
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{lora.path}: {name} is a {type(layer).__name__}; LoRA layers can be fused "
                             f"into Linear and Conv2d layers only")
        delta = _delta(parts["A"], parts["B"])
        if delta.shape != layer.weight.shape:
            raise ValueError(f"{lora.path}: {name} has weight {tuple(layer.weight.shape)} but the LoRA's "
                             f"B @ A is {tuple(delta.shape)}: the LoRA was made for another model")
        bias = parts.get("bias")
        if bias is not None and (layer.bias is None or bias.shape != layer.bias.shape):
            raise ValueError(f"{lora.path}: {name} has a LoRA bias but the layer's bias is "
                             f"{None if layer.bias is None else tuple(layer.bias.shape)}")
        plan.append((component, path, name, layer, delta, bias,
                     scale * _scale_of(lora, component, module, parts["A"].shape[0])))
    if not plan:
        reasons = sorted(set(skipped.values()))
        raise ValueError(f"none of the {len(skipped)} layers of {lora.path} is in this pipeline "
                         f"({'; '.join(reasons)}): is it a LoRA of another model family?")

    fused = FusedLora(lora.path, float(scale), [], skipped)
    with torch.no_grad():
        for component, module, name, layer, delta, bias, factor in plan:
            fused.originals[(component, f"{module}.weight")] = layer.weight.detach().to("cpu", copy=True)
            # Added in float32 and rounded once to the stored dtype.
            layer.weight.copy_(layer.weight.float() + factor * delta.to(layer.weight.device))
            if bias is not None:
                fused.originals[(component, f"{module}.bias")] = layer.bias.detach().to("cpu", copy=True)
                layer.bias.copy_(layer.bias.float() + factor * bias.float().to(layer.bias.device))
            fused.fused.append(name)
    for name, why in skipped.items():
        logger.warning("LoRA layer %s not fused: %s", name, why)
    return fused


def unfuse_lora(components: dict[str, nn.Module], fused: FusedLora) -> None:
    """Put back, bit for bit, the tensors ``fuse_lora`` changed."""
    with torch.no_grad():
        for (component, param_name), original in fused.originals.items():
            param = components[component].get_parameter(param_name)
            param.copy_(original.to(param.device))
