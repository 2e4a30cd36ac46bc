"""Noise schedules: which sigmas a sampler visits, in k-diffusion's sigma space.

Everything here is plain numpy float64 over the model's *training table*: the sigma of each of the
(usually 1000) training timesteps, ascending with t. A schedule maps a step count to `steps + 1`
descending sigmas ending in 0 (`ays` takes the model's published levels in place of the table); samplers
(`samplers.py`) walk that list. The names and maths follow
stable-diffusion.cpp; where diffusers has the same schedule the values agree (see tests/test_schedules.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Schedule = Callable[[int, np.ndarray], np.ndarray]


def training_sigmas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
) -> np.ndarray:
    """sigma_t = sqrt((1 - alphabar_t) / alphabar_t) for t = 0 .. num_train_timesteps - 1 (ascending)."""
    if beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r} (expected scaled_linear or linear)")
    alphas_cumprod = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def sigma_to_t(sigma, table: np.ndarray):
    """The fractional training timestep whose sigma is `sigma` (log-sigma interpolation, clamped to the table)."""
    return np.interp(np.log(np.maximum(sigma, 1e-10)), np.log(table), np.arange(len(table), dtype=np.float64))


def t_to_sigma(t, table: np.ndarray):
    """The sigma at a fractional training timestep (log-linear between neighbouring table entries)."""
    return np.exp(np.interp(t, np.arange(len(table), dtype=np.float64), np.log(table)))


def _append_zero(sigmas) -> np.ndarray:
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0)


def discrete(steps: int, table: np.ndarray) -> np.ndarray:
    """`steps` timesteps evenly from the last training timestep down to 0 (diffusers' "linspace" spacing)."""
    return _append_zero(t_to_sigma(np.linspace(len(table) - 1, 0, steps), table))


def karras(steps: int, table: np.ndarray, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5: evenly spaced in sigma^(1/rho) between the table's extremes."""
    max_inv_rho, min_inv_rho = table[-1] ** (1 / rho), table[0] ** (1 / rho)
    ramp = np.linspace(0, 1, steps)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(steps: int, table: np.ndarray) -> np.ndarray:
    """Evenly spaced in log sigma between the table's extremes."""
    return _append_zero(np.exp(np.linspace(np.log(table[-1]), np.log(table[0]), steps)))


def ays(steps: int, levels: np.ndarray) -> np.ndarray:
    """Align Your Steps (Sabour et al., 2024): a model's published levels (in either order; AYS tunes them
    per model, so the family gives them in place of a table), log-linearly stretched to `steps`; the last
    level is replaced by 0."""
    log_levels = np.log(np.sort(levels)[::-1])
    positions = np.linspace(0, 1, len(log_levels))
    sigmas = np.exp(np.interp(np.linspace(0, 1, steps + 1), positions, log_levels))
    sigmas[-1] = 0.0
    return sigmas


def sgm_uniform(steps: int, table: np.ndarray) -> np.ndarray:
    """`steps + 1` timesteps evenly from the last training timestep to 0, dropping the final one (SGM's)."""
    return _append_zero(t_to_sigma(np.linspace(len(table) - 1, 0, steps + 1)[:-1], table))


def simple(steps: int, table: np.ndarray) -> np.ndarray:
    """Every (len(table)/steps)-th table entry from the top (ComfyUI's "simple")."""
    offsets = np.arange(steps) * len(table) // steps
    return _append_zero(table[len(table) - 1 - offsets])


def trailing(steps: int, table: np.ndarray) -> np.ndarray:
    """diffusers' timestep_spacing="trailing": integer timesteps ending at the very top (turbo models)."""
    timesteps = np.round(len(table) - np.arange(steps) * (len(table) / steps)).astype(np.int64) - 1
    return _append_zero(table[timesteps])


LCM_ORIGINAL_STEPS = 50


def lcm(steps: int, table: np.ndarray) -> np.ndarray:
    """LCMScheduler's timesteps: evenly skipping through the 50-step grid LCM models were distilled on."""
    if steps > LCM_ORIGINAL_STEPS:
        raise ValueError(f"the lcm schedule has at most {LCM_ORIGINAL_STEPS} steps; got {steps}")
    stride = len(table) // LCM_ORIGINAL_STEPS
    grid_index = np.arange(steps) * LCM_ORIGINAL_STEPS // steps  # floor, as diffusers and sd.cpp
    timesteps = (LCM_ORIGINAL_STEPS - grid_index) * stride - 1
    return _append_zero(table[timesteps])


SCHEDULES: dict[str, Schedule] = {
    "discrete": discrete,
    "karras": karras,
    "exponential": exponential,
    "ays": ays,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "trailing": trailing,
    "lcm": lcm,
}
SCHEDULERS = tuple(SCHEDULES)  # the `scheduler` names (stable-diffusion.cpp's)


def make_sigmas(scheduler: str, steps: int, table: np.ndarray, ays_levels: np.ndarray) -> np.ndarray:
    """The named schedule over a model's training table; `ays` stretches the model's AYS levels instead."""
    return SCHEDULES[scheduler](steps, ays_levels if scheduler == "ays" else table)


# --- flow models (FLUX, SD3) ----------------------------------------------------------------------------

# The schedules a flow model can use: its training covers sigma in (0, 1] continuously, so the
# table-bound schedules (ays, lcm, simple, sgm_uniform, trailing) have no meaning there.
FLOW_SCHEDULES = ("discrete", "karras", "exponential")
# The flow-schedule settings a manifest keeps, with diffusers' FlowMatchEulerDiscreteScheduler defaults.
FLOW_SCHEDULER_SETTINGS = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# A family whose dynamic shift finds mu otherwise than FLUX.1's linear rule adds `mu_rule` (a MU_RULES name) to
# its spec's scheduler settings: diffusers' pipelines compute mu and hand it to the scheduler, so no
# scheduler_config.json says it. (Absent: "linear"; left out of the shared settings, since the torch engine
# builds diffusers' scheduler from them, which takes no such argument.)


def linear_mu(config: dict, image_seq_len: int, steps: int) -> float:
    """FLUX.1's (FluxPipeline's calculate_shift): linear in the image's token count, from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len; the step count plays no part."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


def empirical_mu(config: dict, image_seq_len: int, steps: int) -> float:
    """FLUX.2's (diffusers' pipeline_flux2 compute_empirical_mu, its constants): a fit in the token count and
    the step count, interpolating between lines fitted at 10 and 200 steps; above 4300 tokens the 200-step
    line alone. The scheduler's base/max shift settings play no part."""
    a1, b1 = 8.73809524e-05, 1.89833333  # the 10-step line
    a2, b2 = 0.00016927, 0.45666666  # the 200-step line
    if image_seq_len > 4300:
        return a2 * image_seq_len + b2
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return a * steps + m_200 - 200.0 * a


MU_RULES = {"linear": linear_mu, "empirical": empirical_mu}


def flow_shift(config: dict, image_seq_len: int, steps: int) -> tuple[str, float]:
    """How a flow model shifts its sigmas: ("exponential", mu), mu by the config's `mu_rule` (FLUX.1-dev's
    linear rule, FLUX.2's empirical one), when it shifts dynamically; else ("fixed", shift), as schnell (1.0)
    and SD3 (3.0)."""
    if config.get("use_dynamic_shifting"):
        rule = config.get("mu_rule", "linear")
        if rule not in MU_RULES:
            raise ValueError(f"unknown mu_rule {rule!r} (expected one of {', '.join(MU_RULES)})")
        return "exponential", MU_RULES[rule](config, image_seq_len, steps)
    return "fixed", float(config.get("shift", 1.0))


def flow_sigmas(
    scheduler: str, steps: int, config: dict, image_seq_len: int, scheduler_spacing: bool = False
) -> np.ndarray:
    """`steps + 1` sigmas in (0, 1] then 0, as diffusers' FlowMatchEulerDiscreteScheduler: evenly spaced, then
    shifted; karras and exponential respace between the shifted schedule's ends, as that scheduler's
    use_karras_sigmas/use_exponential_sigmas. Evenly from 1 to 1/steps, as the FLUX pipelines pass them; with
    `scheduler_spacing`, as the scheduler spaces them when given none (the SD3 pipelines): from 1 to its
    smallest training sigma, 1/num_train_timesteps (shifted, for a fixed shift). A config's `shift_terminal`
    stretches the shifted sigmas to end at it, as the scheduler does."""
    if scheduler not in FLOW_SCHEDULES:
        raise ValueError(f"flow models support the {', '.join(FLOW_SCHEDULES)} schedules; got {scheduler!r}")
    kind, amount = flow_shift(config, image_seq_len, steps)

    def shifted(sigmas):
        if kind == "exponential":
            return math.exp(amount) / (math.exp(amount) + (1 / sigmas - 1))
        return amount * sigmas / (1 + (amount - 1) * sigmas)

    last = 1.0 / steps
    if scheduler_spacing:
        smallest = 1.0 / config.get("num_train_timesteps", 1000)
        last = shifted(smallest) if kind == "fixed" else smallest
    sigmas = shifted(np.linspace(1.0, last, steps))
    terminal = config.get("shift_terminal")
    if terminal and sigmas[-1] < 1:  # stretched to end at it (Qwen-Image's 0.02); one step is [1] (diffusers: NaN)
        sigmas = 1 - (1 - sigmas) * (1 - terminal) / (1 - sigmas[-1])
    if scheduler == "discrete":
        return _append_zero(sigmas)
    ends = np.array([sigmas[-1], sigmas[0]])  # as an ascending "table" of the extremes
    return SCHEDULES[scheduler](steps, ends)


def img2img_sigmas(sigmas: np.ndarray, steps: int, strength: float, flow: bool = False) -> np.ndarray:
    """The tail of a schedule that img2img runs, by diffusers' rules, so results match it: its Stable
    Diffusion pipelines keep floor(steps * strength) steps; its flow pipelines (SD3, FLUX, Z-Image, FLUX.2)
    skip floor(steps - steps * strength) and keep the rest, one more where steps * strength has a fraction
    (4 steps at 0.6: 3, not 2). Strength 1 runs the whole schedule from the noised image, strength 0 runs no
    step (the image comes back re-encoded). stable-diffusion.cpp runs one step more (t_enc + 1); we follow
    the documented meaning of strength.
    """
    kept = steps - int(max(steps - steps * strength, 0)) if flow else min(int(steps * strength), steps)
    return np.asarray(sigmas)[steps - kept :]


def step_limit(scheduler: str) -> int | None:
    """The most steps the named schedule can make (lcm: its models' 50-step distillation grid), None for no
    limit; job validation refuses more before a job is queued."""
    return LCM_ORIGINAL_STEPS if scheduler == "lcm" else None
