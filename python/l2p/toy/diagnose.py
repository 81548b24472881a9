"""Where along the denoising path a toy pixel model falls behind its source.

Three measurements on the same held-out prompts, each against the latent source:

- Handoff: the source's finished images, noised in pixel space to sigma, then denoised by the
  pixel model (classifier-free guidance, Euler steps from sigma to 0) and scored. At small
  sigma this asks whether the pixel model can finish a picture whose layout is given; at
  sigma = 1 it samples from pure noise. The sigma where the score falls away is where the
  pixel model stops producing what the source would.
- Feature alignment: at each sigma, the cosine similarity between the hidden states entering
  each block in the pixel model (image noised in pixels) and in the source (its latent
  noised in latent space), beside the source's similarity between two different images. L2P
  counts on the trainable first blocks carrying pixels into the source's feature space so the
  frozen middle blocks work as they did; where the pixel model's features at the first frozen
  block are further from the source's than another image's are, the middle sees inputs it
  was not trained on.
- Prompt use: at each sigma, the error of each model's one-step clean-image estimate
  (x_s - sigma * v for flow models) with the prompt and with the empty prompt, on the same
  images and noise; for the source, noised in its latent space and decoded. A model that
  draws on the prompt gains from it; the gain at high sigma is what composes a scene from
  noise.

The toy source is a flow-matching model (its scheduler in flow mode), so both models'
outputs are velocities; the pixel model keeps that convention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from l2p.toy.prompts import make_records
from l2p.toy.scoring import score_generated
from l2p.toy.source import to_model_range
from l2p.train import conditioning as condmod


@dataclass
class DiagnosePlan:
    model: str
    source: str = "toy"
    prompts: int = 120
    handoff_sigmas: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9, 1.0])
    probe_sigmas: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9, 0.99])
    steps: int = 10
    guidance: float = 4.5
    seed: int = 0
    batch_size: int = 32

    def validate(self) -> "DiagnosePlan":
        for name in ("handoff_sigmas", "probe_sigmas"):
            values = getattr(self, name)
            if not values or any(not 0.0 <= s <= 1.0 for s in values):
                raise ValueError(f"{name} must be a non-empty list of noise levels in [0, 1], got {values}")
        if self.prompts < 6:
            raise ValueError(f"prompts must be at least 6 (one per category), got {self.prompts}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        return self


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _velocity(model, family, cond, x, sigma: float) -> torch.Tensor:
    """The flow velocity (eps - x0) of ``model`` at ``sigma``, for the scheduler (sign undone)."""
    times = torch.full((x.shape[0],), sigma * 1000.0, device=x.device)
    out = model(**family.call(cond, x, times, model, 1.0), return_dict=False)[0].float()
    return out * getattr(model, "output_sign", 1)


@torch.no_grad()
def handoff(pipe, images: np.ndarray, prompts: list[str], sigma: float, *, steps: int, guidance: float,
            seed: int, batch_size: int) -> np.ndarray:
    """``images`` (n, H, W, 3) noised to ``sigma`` (generator seed ``seed + i`` for image i)
    and denoised by the pixel pipeline's model with ``steps`` Euler steps to 0."""
    model, family = pipe.transformer, pipe.family
    sigmas = torch.linspace(sigma, 0.0, steps + 1).tolist() if sigma > 0 else [0.0]
    out = []
    for start in range(0, len(prompts), batch_size):
        x0 = to_model_range(images[start:start + batch_size])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(seed + start + i))
                             for i in range(len(x0))])
        x = (1.0 - sigma) * x0 + sigma * noise
        cond, uncond = pipe.encode_prompt(prompts[start:start + batch_size])
        both = condmod.stack([uncond, cond])
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v_uncond, v_cond = _velocity(model, family, both, torch.cat([x, x]), s).chunk(2)
            x = x + (s_next - s) * family.guide(v_uncond, v_cond, guidance, model.config.patch_size, {})
        out.append(_to_uint8(x))
    return np.concatenate(out)


def _source_conditioning(source_pipe, prompts: list[str]):
    """(family, prompt conditioning, empty-prompt conditioning) of the latent source."""
    family = condmod.family_for(type(source_pipe.transformer).__name__)
    device = source_pipe.transformer.device
    return (family, family.encode(source_pipe, prompts, device),
            family.encode_negative(source_pipe, [""] * len(prompts), device))


@torch.no_grad()
def prompt_use(pipe, source_pipe, images: np.ndarray, prompts: list[str], sigma: float, *,
               seed: int) -> dict:
    """Mean squared error of the clean-image estimate with the prompt and with "" (pixels in
    [-1, 1]), for the pixel model (noised in pixels) and the source (noised in its latent
    space, estimate decoded)."""
    x0 = to_model_range(images)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    cond, uncond = pipe.encode_prompt(prompts)
    x = (1.0 - sigma) * x0 + sigma * noise
    pixel = {}
    for name, c in (("prompt", cond), ("empty", uncond)):
        estimate = x - sigma * _velocity(pipe.transformer, pipe.family, c, x, sigma)
        pixel[name] = float(((estimate.clamp(-1, 1) - x0) ** 2).mean())

    vae = source_pipe.vae
    scale = vae.config.scaling_factor
    z0 = vae.encode(x0).latent_dist.mean * scale
    z_noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + 1))
    z = (1.0 - sigma) * z0 + sigma * z_noise
    source_family, source_cond, source_uncond = _source_conditioning(source_pipe, prompts)
    latent = {}
    for name, c in (("prompt", source_cond), ("empty", source_uncond)):
        z_estimate = z - sigma * _velocity(source_pipe.transformer, source_family, c, z, sigma)
        decoded = vae.decode(z_estimate / scale).sample
        latent[name] = float(((decoded.clamp(-1, 1) - x0) ** 2).mean())
    gain = lambda e: 1.0 - e["prompt"] / e["empty"] if e["empty"] > 0 else 0.0  # noqa: E731
    return {"sigma": sigma, "pixel": {**pixel, "gain": gain(pixel)}, "source": {**latent, "gain": gain(latent)}}


@torch.no_grad()
def feature_alignment(pipe, source_pipe, images: np.ndarray, prompts: list[str], sigma: float, *,
                      seed: int) -> dict:
    """Per block (in ``pipe.transformer.blocks()`` order): mean cosine similarity over tokens
    and images between the pixel model's and the source's block inputs for the same image
    (``same``), the source's for two different images (``other``: each image against the
    next), and the ratio of their mean norms (pixel / source)."""
    x0 = to_model_range(images)
    vae, scale = source_pipe.vae, source_pipe.vae.config.scaling_factor
    z0 = vae.encode(x0).latent_dist.mean * scale
    x = (1.0 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    z = (1.0 - sigma) * z0 + sigma * torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + 1))
    names = [name for name, _ in pipe.transformer.blocks()]
    captured: dict[tuple[str, str], torch.Tensor] = {}

    def capture(key):
        def hook(module, args, kwargs):
            captured[key] = (args[0] if args else kwargs["hidden_states"]).float()
        return hook

    handles = []
    for name, block in pipe.transformer.blocks():
        handles.append(block.register_forward_pre_hook(capture(("pixel", name)), with_kwargs=True))
        source_block = source_pipe.transformer.get_submodule(name.removeprefix("transformer."))
        handles.append(source_block.register_forward_pre_hook(capture(("source", name)), with_kwargs=True))
    try:
        source_family, source_cond, _ = _source_conditioning(source_pipe, prompts)
        _velocity(pipe.transformer, pipe.family, pipe.encode_prompt(prompts, do_classifier_free_guidance=False)[0],
                  x, sigma)
        _velocity(source_pipe.transformer, source_family, source_cond, z, sigma)
    finally:
        for handle in handles:
            handle.remove()
    cosine = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())  # noqa: E731
    rows = []
    for name in names:
        pixel, src = captured[("pixel", name)], captured[("source", name)]
        other = torch.roll(src, 1, dims=0)
        rows.append({"block": name, "same": cosine(pixel, src), "other": cosine(src, other),
                     "norm_ratio": float(pixel.norm(dim=-1).mean() / src.norm(dim=-1).mean())})
    return {"sigma": sigma, "blocks": rows}


def run_diagnose(plan: DiagnosePlan, log=print) -> dict:
    from l2p.data.generate import resolve_source
    from l2p.sample.pipeline import L2PPipeline
    from l2p.toy.source import generate, load_toy_source

    plan.validate()
    source_dir = resolve_source(plan.source)
    pipe = L2PPipeline.from_pretrained(plan.model)
    pipe.set_progress_bar_config(disable=True)
    source_pipe = load_toy_source(source_dir)
    source_pipe.set_progress_bar_config(disable=True)
    records = make_records(plan.prompts, plan.seed + 1000, split="heldout")
    prompts = [r.prompt for r in records]
    source_images = generate(source_pipe, prompts, seed=plan.seed, steps=plan.steps, guidance=plan.guidance,
                             batch_size=plan.batch_size)
    source_score = score_generated(source_images, records)
    log(f"source: {source_score['overall']:.3f} on {plan.prompts} held-out prompts")
    report = {"plan": asdict(plan), "source_dir": str(source_dir), "source": _brief(source_score),
              "handoff": [], "prompt_use": [], "alignment": []}
    for sigma in plan.handoff_sigmas:
        images = handoff(pipe, source_images, prompts, sigma, steps=plan.steps, guidance=plan.guidance,
                         seed=plan.seed, batch_size=plan.batch_size)
        score = score_generated(images, records)
        # Per-image verdicts, so two models' handoffs on the same prompts can be compared
        # pairwise (l2p.toy.scoring.paired_difference).
        report["handoff"].append({"sigma": sigma, **_brief(score), "correct": score["correct"]})
        log(f"handoff from sigma {sigma:g}: {score['overall']:.3f} "
            f"({score['ci95'][0]:.3f}-{score['ci95'][1]:.3f})")
    probe = min(plan.prompts, 64)
    for sigma in plan.probe_sigmas:
        row = prompt_use(pipe, source_pipe, source_images[:probe], prompts[:probe], sigma, seed=plan.seed)
        report["prompt_use"].append(row)
        log(f"sigma {sigma:g}: estimate error with/without prompt: pixel {row['pixel']['prompt']:.4f}/"
            f"{row['pixel']['empty']:.4f} (gain {row['pixel']['gain']:.1%}), source "
            f"{row['source']['prompt']:.4f}/{row['source']['empty']:.4f} (gain {row['source']['gain']:.1%})")
    for sigma in plan.probe_sigmas:
        row = feature_alignment(pipe, source_pipe, source_images[:probe], prompts[:probe], sigma, seed=plan.seed)
        report["alignment"].append(row)
        log(f"sigma {sigma:g}: block inputs, cosine pixel vs source (same image) / source vs source "
            f"(another image): " + ", ".join(f"{i}: {b['same']:.2f}/{b['other']:.2f}"
                                            for i, b in enumerate(row["blocks"])))
    return report


def _brief(score: dict) -> dict:
    return {"overall": score["overall"], "ci95": list(score["ci95"]), "per_category": score["per_category"]}


def report_markdown(report: dict) -> str:
    plan = report["plan"]
    lines = [
        f"# Where `{plan['model']}` falls behind its source",
        "",
        f"{plan['prompts']} held-out prompts, {plan['steps']} steps, guidance {plan['guidance']}; "
        f"source score {report['source']['overall']:.3f} "
        f"({report['source']['ci95'][0]:.3f}-{report['source']['ci95'][1]:.3f}).",
        "",
        "## Handoff: the source's images noised to sigma, finished by the pixel model",
        "",
        "| sigma | score | 95% CI |",
        "|---|---|---|",
    ]
    lines += [f"| {r['sigma']:g} | {r['overall']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} |"
              for r in report["handoff"]]
    lines += [
        "",
        "## Prompt use: clean-image estimate error (MSE, pixels in [-1, 1]) with the prompt / with \"\"",
        "",
        "| sigma | pixel model | gain | source | gain |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['sigma']:g} | {r['pixel']['prompt']:.4f} / {r['pixel']['empty']:.4f} | "
              f"{r['pixel']['gain']:.1%} | {r['source']['prompt']:.4f} / {r['source']['empty']:.4f} | "
              f"{r['source']['gain']:.1%} |" for r in report["prompt_use"]]
    if report.get("alignment"):
        blocks = report["alignment"][0]["blocks"]
        lines += [
            "",
            "## Feature alignment: cosine of the block inputs, pixel vs source for the same image "
            "(source vs source for another image), pixel/source norm",
            "",
            "| block | " + " | ".join(f"sigma {r['sigma']:g}" for r in report["alignment"]) + " |",
            "|---|" + "---|" * len(report["alignment"]),
        ]
        for i, name in enumerate(b["block"] for b in blocks):
            cells = [f"{r['blocks'][i]['same']:.2f} ({r['blocks'][i]['other']:.2f}), "
                     f"{r['blocks'][i]['norm_ratio']:.2f}x" for r in report["alignment"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str | Path) -> Path:
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(report, indent=2))
    (out / "diagnose.md").write_text(report_markdown(report))
    return out / "diagnose.md"


__all__ = ["DiagnosePlan", "feature_alignment", "handoff", "prompt_use", "report_markdown", "run_diagnose", "write_report"]
