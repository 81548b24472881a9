"""``L2PPipeline``: text-to-image in pixel space with a converted (L2P) model.

A converted pipeline folder (``l2p convert --source PIPELINE``) is the source pipeline's own
folder with the pixel transformer in place of the latent one and no VAE. Loading it gives:

- the source pipeline class (PixArtSigmaPipeline, StableDiffusion3Pipeline, FluxPipeline, ...)
  with its text encoders, tokenizers and scheduler, built without transformer and VAE; its
  own ``encode_prompt`` encodes the prompts, so the text conditioning is the source's;
- the pixel transformer (``PixelTransformer2DModel``).

Sampling is the source pipeline's loop with the VAE gone: Gaussian pixels, the source
scheduler with the timesteps its pipeline sets (incl. FLUX-style dynamic shift ``mu`` from the
token count, which the pixel grid keeps), the transformer called as the source pipeline calls
it (its adapter in l2p/adapters/, shared with the trainer), classifier-free guidance, the
model's output sign, and the final image clipped to [-1, 1].
"""

from __future__ import annotations

import contextlib
import inspect
import json
import numbers
from pathlib import Path

import torch

from l2p.sample.attention import resolve_attention, set_attention
from l2p.sample.offload import BlockOffload, largest_block_list
from l2p.sample.schedule import recipe_for, recommended_sampling_shift, set_timesteps, with_shift
from l2p.train import conditioning as condmod

PIXEL_ENTRY = ["l2p", "PixelTransformer2DModel"]


def is_pixel_pipeline_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a converted L2P pipeline (what ``l2p convert`` / ``l2p-train``
    write: its model_index.json names l2p's transformer), as opposed to a latent source."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return list(index.get("transformer") or []) == PIXEL_ENTRY


def _repeat(cond: dict, n: int) -> dict:
    """Each sample's conditioning repeated n times in place (num_images_per_prompt)."""
    if n == 1:
        return cond
    return {k: v.repeat_interleave(n, dim=0) if isinstance(v, torch.Tensor) else [x for x in v for _ in range(n)]
            for k, v in cond.items()}


def _prompt_list(prompt: str | list[str], what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")


def _negative_prompts(negative_prompt, count: int) -> list[str]:
    """The negative prompt of each of ``count`` prompts ("" by default; one is repeated)."""
    negatives = _prompt_list(negative_prompt if negative_prompt is not None else "", "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * count
    if len(negatives) != count:
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {count} prompts")
    return negatives


def _check_images_per_prompt(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_images_per_prompt must be a positive int, got {n!r}")


# The diffusers pipelines' arguments for conditioning encoded beforehand, which L2PPipeline
# takes by the source pipeline's names in place of the prompt (SourceAdapter.embedding_arguments).
_PRECOMPUTED_CONDITIONING = frozenset(
    f"{side}{name}" for side in ("", "negative_") for name in (
        "prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask", "prompt_embeds_mask"))


# The diffusers pipelines' arguments for a schedule given step by step; L2PPipeline sets the
# source pipeline's own (num_inference_steps, and shift for the flow time shift).
_CUSTOM_SCHEDULE = frozenset({"timesteps", "sigmas"})


def _is_component_entry(value) -> bool:
    """A model_index.json component entry: [library, class name], [null, null] for none."""
    return isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, str) for v in value)


def guidance_options_for(family, given: dict) -> dict:
    """The family pipeline's guidance options: its defaults updated by ``given``; a name the
    family's pipeline does not take is an error that lists those it does."""
    unknown = sorted(set(given) - set(family.guidance_options))
    if unknown:
        known = ", ".join(f"{k} (default {v!r})" for k, v in family.guidance_options.items()) or "none"
        raise TypeError(f"unexpected option(s) {', '.join(unknown)}; this family's pipeline "
                        f"takes these guidance options: {known}")
    return {**family.guidance_options, **given}


def denoise(model, family, recipe, scheduler, x: torch.Tensor, cond: dict, uncond: dict | None, *,
            steps: int, cfg_scale: float = 1.0, embedded_guidance: float = 1.0, mu: float | None = None,
            guidance_options: dict | None = None, guidance_max_sigma: float | None = None, progress=None,
            on_step_end=None, generator: torch.Generator | list[torch.Generator] | None = None,
            eta: float = 0.0) -> torch.Tensor:
    """The source pipeline's denoising loop in pixel space; returns the final image (B, 3, H, W)
    in float32, not clipped.

    Args:
        model: the pixel transformer; family: its ``l2p.train.conditioning`` entry (how the
            source pipeline calls its transformer); recipe: its ``Recipe`` (timesteps).
        scheduler: the source scheduler (its timesteps are set here for the token grid).
        x: the initial noise (B, 3, H, W), before ``init_noise_sigma``.
        cond / uncond: the conditioning of the B images and, for classifier-free guidance
            (``uncond`` not None), of their negative prompts.
        cfg_scale: the guidance weight w: uncond + w (cond - uncond), combined as the family's
            pipeline does (``family.guide``; Qwen-Image rescales it to the conditional's norm).
        embedded_guidance: the guidance embedding of guidance-distilled FLUX.
        mu: the dynamic time shift (default: the source pipeline's, from the token count).
        guidance_options: the family pipeline's own guidance options (``family.guidance_options``
            names them; e.g. Lumina2's cfg_trunc_ratio), its defaults where not given.
        guidance_max_sigma: guide only the steps whose noise level ``scheduler.sigmas[i]`` is
            at most this; the steps above it run the conditional branch alone.
        on_step_end: called as ``on_step_end(i, t, x)`` after step i; a tensor it returns
            replaces x (diffusers' callback_on_step_end contract).
        generator: handed to ``scheduler.step`` where it takes one, as the diffusers pipelines
            do (``prepare_extra_step_kwargs``): the noise a stochastic scheduler adds at each
            step (DDPM, Euler ancestral, SDE DPM-Solver, flow Euler with stochastic_sampling)
            then comes from it, so a seeded call gives the same image every time.
        eta: DDIM's eta, handed to ``scheduler.step`` where it takes one (as the diffusers
            pipelines do); a nonzero eta for a scheduler without one is an error.
    """
    p = model.config.patch_size
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    timesteps = set_timesteps(scheduler, recipe, steps, (x.shape[2] // p) * (x.shape[3] // p), device, mu=mu)
    x = x.to(device, torch.float32) * getattr(scheduler, "init_noise_sigma", 1.0)
    options = guidance_options_for(family, guidance_options or {})
    cond = condmod.to_device(cond, device, dtype)
    both = None
    if uncond is not None:
        both = condmod.stack([condmod.to_device(uncond, device, dtype), cond])
    step_takes = inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if "generator" in step_takes else {}
    if "eta" in step_takes:
        step_kwargs["eta"] = eta
    elif eta:
        raise ValueError(f"eta={eta} is DDIM's; {type(scheduler).__name__} takes none: leave eta at 0 or set "
                         f"pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
    sigmas = None
    if guidance_max_sigma is not None:
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is None or len(sigmas) < len(timesteps):
            raise ValueError(f"guidance_max_sigma needs a scheduler that lists its noise levels (sigmas); "
                             f"{type(scheduler).__name__} does not: leave guidance_max_sigma unset")
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        guided = both is not None and family.guides_step(i, len(timesteps), t, options) and (
            sigmas is None or float(sigmas[i]) <= guidance_max_sigma)
        x_in = torch.cat([x_in, x_in]) if guided else x_in
        ts = t.to(device).expand(x_in.shape[0])
        call = family.call(both if guided else cond, x_in.to(dtype), ts, model, embedded_guidance)
        out = model(**call, return_dict=False)[0].float()
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = family.guide(out_uncond, out_cond, cfg_scale, p, options)
        # The pixel model keeps the source transformer's sign; its pipeline undoes it here.
        x = scheduler.step(out * model.output_sign, t, x, return_dict=False, **step_kwargs)[0]
        if on_step_end is not None:
            replaced = on_step_end(i, t, x)
            x = x if replaced is None else replaced
        if progress is not None:
            progress.update()
    if not torch.isfinite(x).all():
        raise FloatingPointError("sampling produced non-finite pixels")
    return x


class L2PPipeline:
    """Pixel-space text-to-image with an L2P model and its source's text side and scheduler.

    Args:
        transformer: the ``PixelTransformer2DModel``.
        text_pipeline: the source pipeline (its class, text encoders, tokenizers and
            scheduler; transformer and VAE may be None).
        attention: "auto" (fastest: l2p's compiled kernel on the CPU in fp32, torch SDPA on
            CUDA), "l2p" or "native"; applied to the transformer at each call.
    """

    def __init__(self, transformer, text_pipeline, attention: str = "auto"):
        from l2p.models import PixelTransformer2DModel

        if not isinstance(transformer, PixelTransformer2DModel):
            raise TypeError(f"L2PPipeline takes the pixel transformer (PixelTransformer2DModel), got "
                            f"{type(transformer).__name__}; convert a latent one with l2p.convert_to_pixel")
        self.transformer = transformer
        self.text_pipeline = text_pipeline
        source_class = transformer.config.source_class
        self.family = condmod.family_for(source_class)
        self.recipe = recipe_for(source_class)
        resolve_attention(attention, torch.device("cpu"), torch.float32)  # validates the name
        self.attention = attention
        # model_index.json's "_l2p" block of the folder this came from (None if built here).
        self.conversion_record = None
        # The other model_index.json entries of that folder that are not components, which
        # the source pipeline class may not write back itself (DiTPipeline's id2label).
        self.folder_settings: dict = {}
        # The LoRAs fused into the weights, in order (see fuse_lora).
        self.fused_loras = []
        # Where the models run under enable_model_cpu_offload or enable_block_offload (None:
        # where they are), and the latter's per-model BlockOffload (empty under the former).
        self._offload_device: torch.device | None = None
        self._block_offloads: dict[int, BlockOffload] = {}

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, torch_dtype: torch.dtype | None = None,
                        attention: str = "auto", **kwargs) -> "L2PPipeline":
        """Load a converted pipeline folder (local files, safetensors only)."""
        import l2p  # noqa: F401  (diffusers resolves the "l2p" library of the transformer entry)
        from diffusers import DiffusionPipeline

        from l2p.conversion.folders import pipeline_variant
        from l2p.models import PixelTransformer2DModel

        path = Path(path)
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{path} is not a pipeline folder (no model_index.json); pass the "
                                    f"folder `l2p convert --source PIPELINE --out DIR` wrote")
        index = json.loads(index_file.read_text())
        if list(index.get("transformer") or []) != PIXEL_ENTRY:
            raise ValueError(f"{path} is not a converted L2P pipeline (its transformer is "
                             f"{index.get('transformer')}); convert it with `l2p convert --source {path}`")
        dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        skip = {name: None for name in ("transformer", "vae") if name in index}
        # l2p convert copies the text encoders as the source stored them, fp16-only ones included.
        kwargs.setdefault("variant", pipeline_variant(path, skip))
        text_pipeline = DiffusionPipeline.from_pretrained(
            str(path), use_safetensors=True, local_files_only=True, **skip, **dtype, **kwargs)
        transformer = PixelTransformer2DModel.from_pretrained(
            str(path / "transformer"), use_safetensors=True, local_files_only=True, **dtype)
        pipe = cls(transformer.eval(), text_pipeline, attention=attention)
        pipe.conversion_record = index.get("_l2p")
        pipe.folder_settings = {key: value for key, value in index.items()
                                if not key.startswith("_") and not _is_component_entry(value)}
        return pipe

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True) -> None:
        """Write the pipeline as the folder ``from_pretrained`` reads (what ``l2p convert``
        writes: no VAE, safetensors only). The folder must not exist or be empty; it appears
        complete or not at all. ``safe_serialization`` is taken as diffusers' pipelines take
        it, and must stay True."""
        from l2p.conversion.folders import finish_folder, prepare_folder
        from l2p.models.quantize import is_quantized

        if safe_serialization is not True:
            raise ValueError("L2P pipeline folders are written as safetensors only (no pickle): leave "
                             "safe_serialization=True")
        if is_quantized(self.transformer):
            raise ValueError("this pipeline's transformer is quantized (quantize_int8) for sampling only; "
                             "save the pipeline before quantizing it, and quantize again after loading")
        out = Path(save_directory)
        tmp = prepare_folder(out)
        try:
            self.text_pipeline.save_pretrained(str(tmp), safe_serialization=True)
            self.transformer.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
            index = json.loads((tmp / "model_index.json").read_text())
            index["transformer"] = PIXEL_ENTRY
            if "vae" in index:
                index["vae"] = [None, None]
            for key, value in self.folder_settings.items():
                index.setdefault(key, value)
            record = dict(self.conversion_record or self._describe_conversion())
            if self.fused_loras:  # the saved weights have them baked in: say which
                record["fused_loras"] = list(record.get("fused_loras", [])) + [
                    {"file": Path(f.path).name, "scale": f.scale, "layers": len(f.fused)}
                    for f in self.fused_loras]
            index["_l2p"] = record
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            finish_folder(tmp, out)
        finally:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    def _describe_conversion(self) -> dict:
        """The model_index.json "_l2p" block of a pipeline assembled in memory."""
        model = self.transformer
        return {"source_pipeline": type(self.text_pipeline).__name__,
                "source_transformer": model.config.source_class, "pixel_transformer": PIXEL_ENTRY[1],
                "patch_size": model.config.patch_size,
                # The source VAE's factor (the family's), not patch / latent patch: a model
                # converted at a larger patch keeps the source's factor and 1K token grid.
                "vae_scale_factor": model.adapter.vae_scale_factor,
                "prediction": model.prediction, "output_sign": model.output_sign}

    def _source_patch(self) -> int:
        """The source's own pixel patch (latent patch x VAE factor), whatever patch the pixel
        model was converted with: the token grid the source's schedule was made for."""
        adapter = self.transformer.adapter
        factor = (self.conversion_record or {}).get("vae_scale_factor") or adapter.vae_scale_factor
        return adapter.latent_patch * int(factor)

    # -- diffusers-style conveniences ------------------------------------------------------
    @property
    def scheduler(self):
        return self.text_pipeline.scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        # diffusers' way to change the sampler: pipe.scheduler = X.from_config(pipe.scheduler.config)
        self.text_pipeline.scheduler = scheduler

    @property
    def device(self) -> torch.device:
        """Where sampling runs: the offload device under ``enable_model_cpu_offload`` or
        ``enable_block_offload``, else the transformer's."""
        if self._offload_device is not None:
            return self._offload_device
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, *args, **kwargs) -> "L2PPipeline":
        if self._offload_device is not None:
            raise ValueError(f"{self._offload_kind()} offload is on (it moves the weights to "
                             f"{self._offload_device} while they run); call "
                             "pipe.disable_model_cpu_offload() before pipe.to(...)")
        self.transformer.to(*args, **kwargs)
        self.text_pipeline.to(*args, **kwargs)
        return self

    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> None:
        """Keep the text encoders and the transformer in host memory and move each to
        ``device`` (default: the accelerator) only while it runs, the encoders for the prompts
        and the transformer for the denoising loop, so the device holds the larger of the two
        instead of both. diffusers' enable_model_cpu_offload, without accelerate. The images
        are those of the pipeline moved to ``device``."""
        from l2p.devices import pick_device

        target = pick_device(None if device is None else str(device), "device")
        self.disable_model_cpu_offload()
        self.to("cpu")
        self._offload_device = target

    def enable_block_offload(self, device: str | torch.device | None = None) -> None:
        """Keep every weight in host memory and copy it to ``device`` (default: the
        accelerator) only while it runs: each transformer block for its own forward, the rest
        of the transformer for the denoising loop, and likewise each text encoder's layers
        (its largest list of blocks) and rest for the prompts. The device then holds one block
        and the small non-block layers instead of the whole transformer, for GPUs that cannot
        hold it even in int8, at the price of copying the blocks over at every model call.
        diffusers' enable_group_offload(offload_type="block_level", num_blocks_per_group=1),
        without accelerate (l2p/sample/offload.py). Fuse LoRAs and quantize before enabling
        it. The images are those of the pipeline moved to ``device``."""
        from l2p.devices import pick_device

        target = pick_device(None if device is None else str(device), "device")
        self.disable_model_cpu_offload()
        self.to("cpu")
        source = self.transformer.transformer
        blocks = [block for group in self.transformer.adapter.block_groups
                  for block in source.get_submodule(group)]
        offloads = [BlockOffload(self.transformer, blocks, target)]
        offloads += [BlockOffload(encoder, largest_block_list(encoder), target)
                     for encoder in self._text_encoders().values()]
        self._block_offloads = {id(offload.model): offload for offload in offloads}
        self._offload_device = target

    def disable_model_cpu_offload(self) -> None:
        """Stop offloading (model or block offload); the models stay in host memory until
        ``pipe.to(...)``."""
        for offload in self._block_offloads.values():
            offload.remove()
        self._block_offloads = {}
        self._offload_device = None

    disable_block_offload = disable_model_cpu_offload

    def _offload_kind(self) -> str:
        return "block" if self._block_offloads else "model CPU"

    def _refuse_under_block_offload(self, action: str) -> None:
        if self._block_offloads:
            raise ValueError(f"{action} is not possible under block offload (it keeps each weight's "
                             f"host copy); call pipe.disable_block_offload(), {action}, then "
                             f"pipe.enable_block_offload(...) again")

    @contextlib.contextmanager
    def _loaded(self, modules):
        """The ``modules`` on the offload device for the block (nothing to do without offload);
        under block offload, their non-block layers (each block comes and goes by itself)."""
        if self._offload_device is None:
            yield
            return
        by_blocks = bool(self._block_offloads)
        try:
            for module in modules:
                if by_blocks:
                    self._block_offloads[id(module)].onload_rest()
                else:
                    module.to(self._offload_device)
            yield
        finally:
            for module in modules:
                if by_blocks:
                    self._block_offloads[id(module)].offload()
                else:
                    module.to("cpu")

    def _text_encoders(self) -> dict[str, torch.nn.Module]:
        """The source pipeline's text encoders by component name (text_encoder, text_encoder_2, ...)."""
        return {name: m for name, m in self.text_pipeline.components.items()
                if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)}

    def set_progress_bar_config(self, **kwargs) -> None:
        self.text_pipeline.set_progress_bar_config(**kwargs)

    def set_attention(self, mode: str) -> str:
        """"l2p", "native" or "auto" for the transformer's attention; returns the mode applied."""
        applied = set_attention(self.transformer, mode)  # a name it refuses leaves the mode as it was
        self.attention = mode
        return applied

    def enable_head_tiling(self, tile_size: int | None = None) -> None:
        self.transformer.enable_head_tiling(tile_size)

    def disable_head_tiling(self) -> None:
        self.transformer.disable_head_tiling()

    # -- LoRAs -----------------------------------------------------------------------------
    def _lora_components(self) -> dict:
        """The modules a LoRA names, by diffusers' component names: the pixel model (whose
        source transformer is its ``transformer.``) and the source pipeline's text encoders."""
        return {"transformer": self.transformer, **self._text_encoders()}

    def fuse_lora(self, path: str | Path, lora_scale: float = 1.0):
        """Fuse a LoRA into the weights, scaled by ``lora_scale``: one made for the source model
        (a .safetensors file in diffusers', kohya's or another format the source pipeline's
        ``lora_state_dict`` converts) or one trained on the pixel model (PEFT names of the
        ``PixelTransformer2DModel``, the Detailer Head's convs included). Returns the
        ``FusedLora`` record (``.fused``, ``.skipped``); ``unfuse_lora`` undoes every fused LoRA
        exactly. See l2p/models/lora.py for what differs from the source (layers the pixel
        model replaced, blocks L2P trained)."""
        from l2p.models.lora import fuse_lora, read_lora

        self._refuse_under_block_offload("fusing a LoRA")
        adapter = self.transformer.adapter
        lora = read_lora(path, type(self.text_pipeline))
        fused = fuse_lora(self._lora_components(), lora, lora_scale,
                          replaced={"transformer": {adapter.input_module, self.transformer._tap_module}},
                          source_prefix={"transformer": "transformer."})
        self.fused_loras.append(fused)
        return fused

    def quantize_int8(self):
        """Store the transformer blocks' Linear weights as int8 with a scale per output row
        (weight-only; l2p/models/quantize.py), about half their bf16 bytes; the pixel
        embedding, the head and the text encoders keep their dtype. For sampling: fuse LoRAs
        first; a quantized pipeline is not saved. Returns the ``QuantizationReport``."""
        from l2p.models.quantize import quantize_blocks_int8

        self._refuse_under_block_offload("quantizing")
        return quantize_blocks_int8(self.transformer)

    def unfuse_lora(self) -> None:
        """Restore the weights from before the first ``fuse_lora``, bit for bit."""
        from l2p.models.lora import unfuse_lora

        if self.fused_loras:
            self._refuse_under_block_offload("unfusing LoRAs")
        components = self._lora_components()
        while self.fused_loras:
            unfuse_lora(components, self.fused_loras.pop())

    def source_default(self, name: str, fallback=None):
        """The source pipeline's default for its ``__call__`` argument ``name`` (``fallback``
        where it has none), so that an argument left out samples as the source would."""
        parameter = inspect.signature(type(self.text_pipeline).__call__).parameters.get(name)
        if parameter is None or parameter.default is inspect.Parameter.empty or parameter.default is None:
            return fallback
        return parameter.default

    @property
    def default_size(self) -> int:
        """The image side of the source pipeline's default token grid: the source's default
        side (sample_size x VAE factor, else 1024 as in FluxPipeline, QwenImagePipeline and
        ZImagePipeline) times pixel patch / source patch, so a model converted at a larger
        patch samples by default at the larger size its grid was made for."""
        config = self.transformer.config
        sample_size = config.source_config.get("sample_size")
        if isinstance(sample_size, int):
            return sample_size * config.patch_size // self.transformer.adapter.latent_patch
        return 1024 * config.patch_size // self._source_patch()

    # -- prompts ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                      num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True):
        """(cond, uncond): the source pipeline's conditioning of each prompt (and negative
        prompt, "" by default, when guiding), each repeated num_images_per_prompt times."""
        prompts = _prompt_list(prompt, "prompt")
        _check_images_per_prompt(num_images_per_prompt)
        negatives = None
        if do_classifier_free_guidance:
            negatives = _negative_prompts(negative_prompt, len(prompts))
        device = self.device
        with self._loaded(self._text_encoders().values()):
            cond = _repeat(self.family.encode(self.text_pipeline, prompts, device), num_images_per_prompt)
            if negatives is None:
                return cond, None
            uncond = _repeat(self.family.encode_negative(self.text_pipeline, negatives, device),
                             num_images_per_prompt)
        return cond, uncond

    def _conditioning_given(self, given: dict, negative_prompt, num_images_per_prompt: int, guided: bool):
        """(cond, uncond) from the source pipeline's precomputed arguments (prompt_embeds, ...,
        negative_prompt_embeds, ...), as ``encode_prompt`` gives them from text. Without
        negative ones, guidance encodes ``negative_prompt`` ("" by default), as the source
        pipelines do."""
        adapter = self.transformer.adapter
        if not adapter.embedding_arguments:
            raise ValueError(f"{type(self.text_pipeline).__name__} takes no precomputed text conditioning "
                             f"({', '.join(given)}); pass the prompt")
        positive = {k: v for k, v in given.items() if not k.startswith("negative_")}
        negative = {k[len("negative_"):]: v for k, v in given.items() if k.startswith("negative_")}
        device = self.device
        cond = condmod.to_device(adapter.conditioning_from_embeddings(positive), device)
        batch = len(cond["prompt_embeds"])
        uncond = None
        if guided and negative:
            if negative_prompt is not None:
                raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
            uncond = condmod.to_device(adapter.conditioning_from_embeddings(negative), device)
            if len(uncond["prompt_embeds"]) != batch:
                raise ValueError(f"negative_prompt_embeds hold {len(uncond['prompt_embeds'])} rows for {batch} "
                                 "prompts; give one per prompt")
        elif guided:
            negatives = _negative_prompts(negative_prompt, batch)
            with self._loaded(self._text_encoders().values()):
                uncond = self.family.encode_negative(self.text_pipeline, negatives, device)
        return (_repeat(cond, num_images_per_prompt),
                None if uncond is None else _repeat(uncond, num_images_per_prompt))

    # -- sampling ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        shift: float | str | None = None,
        guidance_max_sigma: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **guidance_options,
    ):
        """Generate images.

        Args:
            prompt / negative_prompt: a string or a list (one image set per prompt); for DiT a
                class: a name its pipeline knows (``DiTPipeline.labels``) or an id ("207"),
                and "" (the default negative) is the null class.
            height, width: multiples of the pixel patch size (default: ``default_size``, the side of the
                source's default token grid at this model's patch).
            num_inference_steps, guidance_scale, true_cfg_scale: None (default) takes the source
                pipeline's own default (PixArt and Sana 20 steps at 4.5, SD3 28 at 7.0, FLUX 28
                at 3.5, Z-Image 50 at 5.0, Lumina2 30 at 4.0, DiT 50 at 4.0, Qwen-Image 50);
                true_cfg_scale takes the source's only with a negative prompt (Qwen-Image 4.0),
                as its pipeline guides only then, and is 1.0 (off) otherwise.
            guidance_scale: classifier-free guidance as the source pipeline reads it: the
                weight w of uncond + w (cond - uncond), off when <= 1; for Z-Image g of
                cond + g (cond - uncond), off when <= 0. For FLUX and Qwen-Image it feeds the
                guidance embedding (where the transformer has one), as in FluxPipeline and
                QwenImagePipeline, and ``true_cfg_scale`` (> 1) turns on classifier-free
                guidance; unlike those pipelines, the negative prompt then defaults to "".
            generator: a torch.Generator (or a list, one per image) for the initial noise and
                for the noise a stochastic scheduler adds at each step.
            eta: DDIM's eta (with a scheduler whose step takes one; 0 by default, as in diffusers).
            latents: the initial noise (B, 3, H, W) instead of drawing it.
            shift: flow time shift k overriding the source's; for dynamically shifted
                schedulers mu = log(k). "recommended": up to 1024 x 1024 the source's own
                schedule, unchanged; above, ``recommended_shift`` from the source's own shift
                at 1K (its static shift, or exp(mu) at its 1K token count): 1.5x that at 4K,
                the paper's advice for ultra-high resolution (3 -> 4.5 for Z-Image and SD3).
            guidance_max_sigma: classifier-free guidance only at the steps whose noise level
                (the scheduler's sigma: in [0, 1] for flow-matching sources) is at most this;
                the noisier steps follow the conditional prediction alone. Guidance in a limited
                interval (Kynkäänniemi et al., 2024): at the highest noise, guidance can push a
                sample away from what the prompt allows (on the ShapesWorld toy, a guided pixel
                model drew no object for "a circle" in 29 of 32 images, 9 of 32 with guidance
                from sigma 0.7 down; python/l2p/toy/RESULTS.md). None (default): every step.
            output_type: "pil" (default), "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W) in
                [0, 1].
            callback_on_step_end: as in diffusers, ``callback(pipe, i, t, callback_kwargs)``
                after each step; ``callback_kwargs["latents"]`` is the current pixel-space
                sample x_t (B, 3, H, W), and a "latents" entry in the returned dict replaces it.
            prompt_embeds, prompt_attention_mask / pooled_prompt_embeds / prompt_embeds_mask and
                their negative_ forms: the source pipeline's text conditioning encoded
                beforehand, by its names and in its layout (``embedding_arguments`` of the
                family's adapter; Z-Image a list of (L, D) tensors), in place of prompt and
                negative_prompt. Without negative ones, guidance encodes negative_prompt ("").
            **guidance_options: the source pipeline's own guidance options, by its names and
                with its defaults: Lumina2 ``cfg_trunc_ratio`` (1.0) and ``cfg_normalization``
                (True), Z-Image ``cfg_truncation`` (1.0) and ``cfg_normalization`` (False).
                Norms that the pipeline takes over latent rows or latents are taken over
                the same axes of the pixel-space output.
        Returns ``ImagePipelineOutput(images=...)``, or a 1-tuple when not return_dict.
        """
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        given = {name: guidance_options.pop(name) for name in sorted(set(guidance_options) & _PRECOMPUTED_CONDITIONING)}
        schedule = sorted(set(guidance_options) & _CUSTOM_SCHEDULE)
        if schedule:
            raise TypeError(f"L2PPipeline sets the source pipeline's own schedule and takes no {', '.join(schedule)}; "
                            f"choose it with num_inference_steps, shift (the flow time shift) and "
                            f"pipe.scheduler = SchedulerClass.from_config(pipe.scheduler.config)")
        unknown = set(callback_on_step_end_tensor_inputs) - {"latents"}
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only hold 'latents' (the pixel-space "
                             f"sample), got {sorted(unknown)}")
        guidance_options = guidance_options_for(self.family, guidance_options)
        if guidance_max_sigma is not None and (isinstance(guidance_max_sigma, bool) or not isinstance(
                guidance_max_sigma, (int, float)) or not guidance_max_sigma >= 0):
            raise ValueError(f"guidance_max_sigma must be a noise level >= 0 (or None: guide every step), "
                             f"got {guidance_max_sigma!r}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        _check_images_per_prompt(num_images_per_prompt)
        model = self.transformer
        if num_inference_steps is None:
            num_inference_steps = self.source_default("num_inference_steps", 20)
        if true_cfg_scale is None:
            true_cfg_scale = self.source_default("true_cfg_scale", 1.0) if negative_prompt is not None else 1.0
        if guidance_scale is None:
            guidance_scale = self.source_default("guidance_scale", None)
            # Qwen-Image's pipeline has none: its guidance is true_cfg_scale, and guidance_scale
            # only feeds a guidance embedding, which its transformer has not.
            if guidance_scale is None and not (self.recipe.distilled_guidance and not
                                               model.config.source_config.get("guidance_embeds", False)):
                raise ValueError(f"{type(self.text_pipeline).__name__} has no default guidance_scale for this "
                                 f"transformer (it has a guidance embedding): pass guidance_scale")
        checked = [("true_cfg_scale", true_cfg_scale)] + ([] if guidance_scale is None else
                                                         [("guidance_scale", guidance_scale)])
        for name, value in checked:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        p = model.config.patch_size
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        for name, value in (("height", height), ("width", width)):
            # numbers.Integral: numpy's integers too, as arrays and config files hand them over.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < p or value % p:
                raise ValueError(
                    f"{name} must be a positive multiple of the pixel patch size {p}, got {value!r} "
                    f"(e.g. {max(p, round(value / p) * p) if isinstance(value, numbers.Real) else p})"
                )
        height, width = int(height), int(width)
        generators = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
            raise ValueError(f"generator must be a torch.Generator or a list of them (for a seed s: "
                             f"torch.Generator().manual_seed(s)), got {generator!r}")
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise ValueError(f"latents must be a tensor (B, 3, H, W) of initial noise, got {type(latents).__name__}")
        if given:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds (the conditioning encoded beforehand), not both")
            if given.get("prompt_embeds") is None:
                raise ValueError(f"{', '.join(given)} given without prompt_embeds: pass prompt_embeds (and the rest "
                                 f"of {', '.join(self.transformer.adapter.embedding_arguments) or 'it'}), or the prompt")
            num_prompts = len(given["prompt_embeds"])
        else:
            num_prompts = len(_prompt_list(prompt, "prompt"))
        batch = num_prompts * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            # randn_tensor would reuse a 1-list's generator for every image and ignore extras.
            raise ValueError(f"generator is a list of {len(generator)} generators for {batch} images "
                             f"({num_prompts} prompts x num_images_per_prompt="
                             f"{num_images_per_prompt}); pass one per image, or a single generator")
        if self.recipe.distilled_guidance:
            cfg_scale = true_cfg_scale
        else:
            cfg_scale = guidance_scale + self.recipe.guidance_scale_offset
        do_cfg = cfg_scale > 1
        if given:
            cond, uncond = self._conditioning_given(given, negative_prompt, num_images_per_prompt, do_cfg)
        else:
            cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt=num_images_per_prompt,
                                              do_classifier_free_guidance=do_cfg)
        device = self.device
        set_attention(model, self.attention)

        scheduler, mu = self.scheduler, None
        if shift == "recommended":
            shift = recommended_sampling_shift(scheduler, self.recipe, height, width, p, self._source_patch())
        if shift is not None:
            scheduler, mu = with_shift(scheduler, shift)
        shape = (batch, 3, height, width)
        if latents is None:
            x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            x = latents.to(device, torch.float32)
        on_step_end = None
        if callback_on_step_end is not None:
            def on_step_end(i, t, sample):
                kwargs = {name: sample for name in callback_on_step_end_tensor_inputs}
                returned = callback_on_step_end(self, i, t, kwargs)
                if returned is not None and not isinstance(returned, dict):
                    raise ValueError(f"callback_on_step_end must return a dict (or None), e.g. "
                                     f"{{'latents': sample}} to replace the sample; got {type(returned).__name__}")
                replaced = (returned or {}).get("latents")
                if replaced is not None and (not isinstance(replaced, torch.Tensor)
                                             or replaced.shape != sample.shape):
                    got = tuple(replaced.shape) if isinstance(replaced, torch.Tensor) else type(replaced).__name__
                    raise ValueError(f"callback_on_step_end returned latents {got}; the pixel-space sample it "
                                     f"replaces is {tuple(sample.shape)}")
                return replaced
        with self.text_pipeline.progress_bar(total=num_inference_steps) as progress, self._loaded([model]):
            x = denoise(model, self.family, self.recipe, scheduler, x, cond, uncond, steps=num_inference_steps,
                        cfg_scale=cfg_scale, embedded_guidance=guidance_scale if self.recipe.distilled_guidance
                        else 1.0, mu=mu, guidance_options=guidance_options,
                        guidance_max_sigma=guidance_max_sigma, progress=progress, on_step_end=on_step_end,
                        generator=generator, eta=eta)
        images = VaeImageProcessor(do_resize=False).postprocess(x.clamp(-1, 1), output_type=output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def __repr__(self) -> str:
        config = self.transformer.config
        return (f"L2PPipeline(source={type(self.text_pipeline).__name__}, transformer={config.source_class} "
                f"P={config.patch_size}, attention={self.attention!r})")

