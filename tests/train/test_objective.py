"""The source objectives on pixels: flow matching with static / dynamic shift, DDPM eps / v."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from l2p.train.config import ObjectiveConfig
from l2p.train.objective import Objective


def _conf(sched) -> dict:
    """The config as scheduler_config.json holds it (with its class name)."""
    return dict(sched.config, _class_name=type(sched).__name__)


def _cfg(**kw) -> ObjectiveConfig:
    return ObjectiveConfig(**kw)


def test_flow_noising_target_and_sign():
    obj = Objective.from_scheduler_config(_conf(FlowMatchEulerDiscreteScheduler(shift=3.0)), _cfg())
    assert obj.kind == "flow" and obj.shift == 3.0
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s = torch.tensor([0.25, 0.75], dtype=torch.float64)
    x_t, target = obj.noisy_and_target(x0, eps, s)
    assert torch.allclose(x_t[1], 0.25 * x0[1] + 0.75 * eps[1])
    assert torch.equal(target, eps - x0)
    neg = Objective.from_scheduler_config(_conf(FlowMatchEulerDiscreteScheduler()), _cfg(), sign=-1.0)
    assert torch.equal(neg.noisy_and_target(x0, eps, s)[1], x0 - eps)


def test_static_shift_formula_and_zimage_k3():
    obj = Objective.from_scheduler_config(_conf(FlowMatchEulerDiscreteScheduler()),
                                          _cfg(shift=3.0, timestep_density="uniform"))
    g = torch.Generator().manual_seed(0)
    u = torch.rand((), generator=torch.Generator().manual_seed(0), dtype=torch.float64).item()
    assert obj.sample_time(g, 64) == pytest.approx(3 * u / (1 + 2 * u))


def test_dynamic_shift_matches_the_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    obj = Objective.from_scheduler_config(_conf(sched), _cfg())
    seq = 1024
    k = obj.shift_for(seq)
    mu = math.log(k)
    # the scheduler's own time shift at this mu
    s = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    ref = sched.time_shift(mu, 1.0, s)
    assert torch.allclose(k * s / (1 + (k - 1) * s), ref)
    assert obj.shift_for(256) == pytest.approx(math.exp(0.5))
    assert obj.shift_for(4096) == pytest.approx(math.exp(1.15))


def test_dpm_solver_in_flow_mode_is_flow():
    from diffusers import DPMSolverMultistepScheduler

    cfg = dict(DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=4.0).config)
    cfg["_class_name"] = "DPMSolverMultistepScheduler"
    obj = Objective.from_scheduler_config(cfg, _cfg())
    assert obj.kind == "flow" and obj.shift == 4.0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_objectives_use_the_scheduler(prediction):
    cfg = dict(DDPMScheduler(prediction_type=prediction).config)
    cfg["_class_name"] = "DPMSolverMultistepScheduler"
    obj = Objective.from_scheduler_config(cfg, _cfg())
    assert obj.kind == prediction
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([10, 900])
    ref = DDPMScheduler(prediction_type=prediction)
    x_t, target = obj.noisy_and_target(x0, eps, t)
    assert torch.equal(x_t, ref.add_noise(x0, eps, t))
    assert torch.equal(target, eps if prediction == "epsilon" else ref.get_velocity(x0, eps, t))
    g = torch.Generator().manual_seed(1)
    times = [obj.sample_time(g, 64) for _ in range(200)]
    assert all(isinstance(v, int) and 0 <= v < 1000 for v in times)


def test_densities_stay_in_the_open_interval():
    for density in ("uniform", "logit_normal"):
        obj = Objective.from_scheduler_config(_conf(FlowMatchEulerDiscreteScheduler()),
                                              _cfg(timestep_density=density))
        g = torch.Generator().manual_seed(0)
        s = torch.tensor([obj.sample_time(g, 64) for _ in range(2000)])
        assert 0 < s.min() and s.max() < 1
        assert abs(s.mean().item() - 0.5) < 0.05
