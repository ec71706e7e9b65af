"""Diffusion schedulers: a frozen, hashable scheduler object plus a small state pytree.

Each scheduler is built from a diffusers `scheduler_config.json` dict (`make_scheduler(name, config)`) and mirrors the
diffusers class of the same name, with its defaults:
  ddim      DDIMScheduler (eta = 0, the deterministic sampler)
  pndm      PNDMScheduler with skip_prk_steps=True, i.e. PLMS (the Stable Diffusion v1.x default)
  dpmpp_2m  DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2
  euler     EulerDiscreteScheduler (no churn)

Everything that depends only on the number of steps is computed once in numpy (`init_state`) and carried as per-step
tables inside the state, so `scale_model_input` and `step` are pure array code indexed by a traced step index and run
inside `jax.jit` / `lax.scan`. Scalars are computed in float32 with the same operations as diffusers' torch code, so
the step results match it to float32 rounding. History (PLMS's last four model outputs, DPM-Solver's previous x0) lives
in fixed-size buffers in the state.

Usage (one model evaluation per entry of `timesteps`; PNDM evaluates N + 1 times for N steps, as diffusers does):
    sched = make_scheduler(None, config)                 # the folder's own scheduler class
    ts = sched.timesteps(n); state = sched.init_state(latents.shape, n)
    x = latents * sched.init_noise_sigma(n)
    for i, t in enumerate(ts):
        eps = unet(sched.scale_model_input(state, x, i), t, ...)
        x, state = sched.step(state, eps, i, x)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from posi_jax.errors import PosiError

# diffusers' per-class names in scheduler_config.json["_class_name"] -> our names
CLASS_NAMES = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "DPMSolverMultistepScheduler": "dpmpp_2m",
               "EulerDiscreteScheduler": "euler"}
NAMES = ("ddim", "pndm", "dpmpp_2m", "euler")

# Options these schedulers do not implement: accepted only at the value listed (diffusers' default).
_ONLY_DEFAULT = {"trained_betas": None, "thresholding": False, "rescale_betas_zero_snr": False,
                 "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "use_lu_lambdas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False,
                 "variance_type": None, "lambda_min_clipped": -math.inf, "sigma_min": None, "sigma_max": None,
                 "interpolation_type": "linear", "timestep_type": "discrete", "algorithm_type": "dpmsolver++"}
# Keys without effect once the options above are at their defaults (thresholding / flow-shift parameters).
_INERT = {"dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type"}
# The keys each scheduler reads, with diffusers' defaults for that class. Keys of another class are ignored, as
# diffusers' `from_config` does when a folder's PNDM config is used to build a DDIM scheduler.
_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", steps_offset=0,
               prediction_type="epsilon")
_OPTIONS = {
    "ddim": dict(_COMMON, timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True, clip_sample_range=1.0),
    "pndm": dict(_COMMON, timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=False),
    "dpmpp_2m": dict(_COMMON, timestep_spacing="linspace", solver_order=2, solver_type="midpoint",
                     lower_order_final=True, euler_at_final=False, final_sigmas_type="zero"),
    "euler": dict(_COMMON, timestep_spacing="linspace", final_sigmas_type="zero"),
}
_KNOWN = set(_ONLY_DEFAULT) | _INERT | {k for opts in _OPTIONS.values() for k in opts}


def _options(name: str, config: dict) -> dict:
    """The options `name` reads from a diffusers scheduler config, with class defaults; unsupported -> PosiError."""
    if not isinstance(config, dict):
        raise PosiError(f"scheduler config: expected a mapping, got {type(config).__name__}")
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in _KNOWN:
            raise PosiError(f"scheduler config: unknown option {key!r} = {value!r}")
        if key in _ONLY_DEFAULT and value != _ONLY_DEFAULT[key] and not (value is None and key == "lambda_min_clipped"):
            raise PosiError(f"scheduler config: {key}={value!r} is not supported (only {_ONLY_DEFAULT[key]!r})")
    opts = {k: config.get(k, default) for k, default in _OPTIONS[name].items()}
    for k, default in _OPTIONS[name].items():
        if opts[k] is None:  # a null in the JSON means "the default"
            opts[k] = default
    return opts


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace bit-identical to torch's CPU kernel (float32 step; start + step*i from the front half and
    end - step*(n-1-i) from the back half, each with one rounding as its fused multiply-add does)."""
    i = np.arange(n)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(max(n - 1, 1)))
    front = np.float64(start32) + step * i
    back = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, front, back).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule and the inference timestep spacing shared by every scheduler."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise PosiError(f"scheduler config: beta_schedule={self.beta_schedule!r} is not supported "
                            "(linear, scaled_linear, squaredcos_cap_v2)")
        if self.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise PosiError(f"scheduler config: timestep_spacing={self.timestep_spacing!r} is not supported "
                            "(leading, trailing, linspace)")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise PosiError(f"scheduler config: prediction_type={self.prediction_type!r} is not supported "
                            "(epsilon, v_prediction)")
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 2):
            raise PosiError(f"scheduler config: num_train_timesteps={self.num_train_timesteps!r} must be an int >= 2")

    @classmethod
    def from_options(cls, opts: dict) -> "NoiseSchedule":
        return cls(**{f.name: opts[f.name] for f in dataclasses.fields(cls)})

    def alphas_cumprod(self) -> np.ndarray:
        """float32 [T]: ᾱ_t, computed as diffusers does (float32 betas, cumulative product accumulated in float64)."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = _linspace_f32(self.beta_start, self.beta_end, n)
        elif self.beta_schedule == "scaled_linear":
            betas = _linspace_f32(self.beta_start ** 0.5, self.beta_end ** 0.5, n) ** 2
        else:  # squaredcos_cap_v2: Nichol & Dhariwal's cosine ᾱ(t), betas capped at 0.999
            def alpha_bar(t):
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                             np.float32)
        alphas = np.float32(1.0) - betas
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)

    def check_steps(self, num_steps: int) -> None:
        if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or not (
                1 <= num_steps <= self.num_train_timesteps):
            raise PosiError(f"num_steps={num_steps!r}: must be an integer in [1, {self.num_train_timesteps}]")

    def spaced_timesteps(self, num_steps: int) -> np.ndarray:
        """int64 [N], descending: diffusers' `leading` / `trailing` / `linspace` spacing (DDIM, PNDM, Euler)."""
        self.check_steps(num_steps)
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        if self.timestep_spacing == "leading":
            return (np.arange(num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + self.steps_offset
        return np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1

    def sigmas_at(self, timesteps: np.ndarray) -> np.ndarray:
        """float32 σ(t) = sqrt((1 - ᾱ)/ᾱ), linearly interpolated at (possibly fractional) timesteps."""
        ac = self.alphas_cumprod()
        sigmas = ((np.float32(1) - ac) / ac) ** np.float32(0.5)
        return np.interp(timesteps, np.arange(len(sigmas)), sigmas).astype(np.float32)


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _at(table: jax.Array, i) -> jax.Array:
    """Row i of a per-step table (a scalar, or a small vector)."""
    return jnp.take(table, i, axis=0)


# ---------------------------------------------------------------------------------------------------------------- DDIM
class DDIMState(NamedTuple):
    sqrt_alpha: jax.Array             # [S] sqrt(ᾱ_t)
    sqrt_one_minus_alpha: jax.Array   # [S] sqrt(1 - ᾱ_t)
    sqrt_alpha_prev: jax.Array        # [S] sqrt(ᾱ_prev)
    sqrt_one_minus_alpha_prev: jax.Array


@dataclasses.dataclass(frozen=True)
class DDIM:
    schedule: NoiseSchedule
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    name = "ddim"

    def timesteps(self, num_steps: int) -> np.ndarray:
        return self.schedule.spaced_timesteps(num_steps)

    def init_noise_sigma(self, num_steps: int) -> float:
        return 1.0

    def init_state(self, latent_shape, num_steps: int) -> DDIMState:
        ts = self.timesteps(num_steps)
        ac = self.schedule.alphas_cumprod()
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        prev = ts - self.schedule.num_train_timesteps // num_steps  # diffusers uses T // N for every spacing
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
        one = np.float32(1)
        return DDIMState(*(jnp.asarray(_f32(x)) for x in (
            np.sqrt(a_t), np.sqrt(one - a_t), np.sqrt(a_prev), np.sqrt(one - a_prev))))

    def scale_model_input(self, state, sample, step_index):
        return sample

    def step(self, state: DDIMState, model_output, step_index, sample):
        sa, sb = _at(state.sqrt_alpha, step_index), _at(state.sqrt_one_minus_alpha, step_index)
        if self.schedule.prediction_type == "epsilon":
            x0 = (sample - sb * model_output) / sa
            eps = model_output
        else:  # v_prediction
            x0 = sa * sample - sb * model_output
            eps = sa * model_output + sb * sample
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        prev = _at(state.sqrt_alpha_prev, step_index) * x0 + _at(state.sqrt_one_minus_alpha_prev, step_index) * eps
        return prev.astype(sample.dtype), state


# ----------------------------------------------------------------------------------------------------------- PNDM/PLMS
class PLMSState(NamedTuple):
    sample_coeff: jax.Array    # [S] sqrt(ᾱ_prev / ᾱ_t)
    output_coeff: jax.Array    # [S] ᾱ_prev - ᾱ_t
    output_denom: jax.Array    # [S] ᾱ_t sqrt(1 - ᾱ_prev) + sqrt(ᾱ_t (1 - ᾱ_t) ᾱ_prev)
    sqrt_alpha: jax.Array      # [S] for v_prediction -> epsilon
    sqrt_one_minus_alpha: jax.Array
    ets: jax.Array             # [4, *latent] the last four model outputs, newest last
    cur_sample: jax.Array      # [*latent] the sample before the first step (the second step restarts from it)


@dataclasses.dataclass(frozen=True)
class PNDM:
    """PLMS (PNDM with skip_prk_steps=True). N steps take N + 1 model evaluations: the second evaluation, at the
    second timestep, corrects the first step (a Heun-like restart from the initial sample), as in diffusers."""
    schedule: NoiseSchedule
    set_alpha_to_one: bool = False
    name = "pndm"

    def timesteps(self, num_steps: int) -> np.ndarray:
        ts = self.schedule.spaced_timesteps(num_steps)[::-1]  # ascending, as diffusers' `_timesteps`
        return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].astype(np.int64)

    def init_noise_sigma(self, num_steps: int) -> float:
        return 1.0

    def init_state(self, latent_shape, num_steps: int) -> PLMSState:
        ts = self.timesteps(num_steps)
        ratio = self.schedule.num_train_timesteps // num_steps
        t_cur, t_prev = ts.copy(), ts - ratio
        if len(ts) > 1:  # the correction step goes from the first timestep to the second one
            t_cur[1], t_prev[1] = ts[1] + ratio, ts[1]
        ac = self.schedule.alphas_cumprod()
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        a_t = ac[t_cur]
        a_p = np.where(t_prev >= 0, ac[np.maximum(t_prev, 0)], final).astype(np.float32)
        one = np.float32(1)
        b_t, b_p = one - a_t, one - a_p
        tables = (np.sqrt(a_p / a_t), a_p - a_t, a_t * np.sqrt(b_p) + np.sqrt(a_t * b_t * a_p), np.sqrt(a_t),
                  np.sqrt(b_t))
        return PLMSState(*(jnp.asarray(_f32(x)) for x in tables), ets=jnp.zeros((4, *latent_shape), jnp.float32),
                         cur_sample=jnp.zeros(latent_shape, jnp.float32))

    def scale_model_input(self, state, sample, step_index):
        return sample

    def step(self, state: PLMSState, model_output, step_index, sample):
        model_output = model_output.astype(jnp.float32)
        pushed = jnp.concatenate([state.ets[1:], model_output[None]])
        # step 1 (the correction) does not record its output; every other step appends it
        ets = jnp.where(step_index == 1, state.ets, pushed)
        e1, e2, e3, e4 = ets[3], ets[2], ets[1], ets[0]  # newest first
        branches = (
            lambda: model_output,
            lambda: (model_output + e1) / 2,
            lambda: (3 * e1 - e2) / 2,
            lambda: (23 * e1 - 16 * e2 + 5 * e3) / 12,
            lambda: (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
        )
        combined = jax.lax.switch(jnp.minimum(step_index, 4), branches)
        sample = sample.astype(jnp.float32)
        x = jnp.where(step_index == 1, state.cur_sample, sample)
        cur_sample = jnp.where(step_index == 0, sample, state.cur_sample)
        if self.schedule.prediction_type == "v_prediction":
            combined = _at(state.sqrt_alpha, step_index) * combined + _at(state.sqrt_one_minus_alpha, step_index) * x
        prev = (_at(state.sample_coeff, step_index) * x
                - _at(state.output_coeff, step_index) * combined / _at(state.output_denom, step_index))
        return prev, state._replace(ets=ets, cur_sample=cur_sample)


# --------------------------------------------------------------------------------------------------- DPM-Solver++ (2M)
class DPMState(NamedTuple):
    x0_alpha: jax.Array        # [S] α_s (model output -> x0 at the current sigma)
    x0_sigma: jax.Array        # [S] σ_s
    sample_coeff: jax.Array    # [S] σ_t / σ_s
    d0_coeff: jax.Array        # [S] α_t (exp(-h) - 1)
    d1_coeff: jax.Array        # [S] second-order coefficient of D1 (0 where a first-order step is taken)
    inv_r0: jax.Array          # [S] 1 / r0 = h / h_prev (0 on first-order steps)
    second_order: jax.Array    # [S] bool
    prev_x0: jax.Array         # [*latent] the previous step's x0 prediction


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M:
    """Multistep DPM-Solver++ of order 2 (data prediction), first order on the first step and, as diffusers does with
    final_sigmas_type="zero" (or lower_order_final with fewer than 15 steps, or euler_at_final), on the last one."""
    schedule: NoiseSchedule
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    name = "dpmpp_2m"

    def timesteps(self, num_steps: int) -> np.ndarray:
        s = self.schedule
        s.check_steps(num_steps)
        T = s.num_train_timesteps
        if s.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        if s.timestep_spacing == "leading":
            ratio = T // (num_steps + 1)
            return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + s.steps_offset
        return np.arange(T, 0, -T / num_steps).round().astype(np.int64) - 1

    def init_noise_sigma(self, num_steps: int) -> float:
        return 1.0

    def _sigmas(self, num_steps: int) -> np.ndarray:
        sigmas = self.schedule.sigmas_at(self.timesteps(num_steps))
        ac = self.schedule.alphas_cumprod()
        last = np.float32(0) if self.final_sigmas_type == "zero" else ((np.float32(1) - ac[0]) / ac[0]) ** 0.5
        return np.concatenate([sigmas, [last]]).astype(np.float32)

    def init_state(self, latent_shape, num_steps: int) -> DPMState:
        sig = self._sigmas(num_steps)
        n = len(sig) - 1
        one = np.float32(1)
        alpha = one / np.sqrt(sig * sig + one)
        sigma = sig * alpha
        with np.errstate(divide="ignore"):  # σ = 0 at the end: λ = +inf, exp(-h) = 0, the step returns x0
            lam = np.log(alpha) - np.log(sigma)
        idx = np.arange(n)
        h = lam[idx + 1] - lam[idx]
        last = idx == n - 1
        first_order = (idx == 0) | (last & (self.euler_at_final or (self.lower_order_final and n < 15)
                                            or self.final_sigmas_type == "zero"))
        with np.errstate(over="ignore"):
            em1 = np.exp(-h) - one
        d0 = alpha[idx + 1] * em1
        h_prev = np.where(idx > 0, h[np.maximum(idx - 1, 0)], one)
        inv_r0 = np.where(first_order, 0, one / (h_prev / np.where(first_order, one, h)))
        if self.solver_type == "midpoint":
            d1 = np.float32(-0.5) * d0
        else:  # heun
            with np.errstate(invalid="ignore", divide="ignore"):
                d1 = alpha[idx + 1] * (em1 / h + one)
        d1 = np.where(first_order, 0, d1)
        return DPMState(*(jnp.asarray(_f32(x)) for x in (alpha[:n], sigma[:n], sigma[idx + 1] / sigma[idx], d0, d1,
                                                         inv_r0)),
                        second_order=jnp.asarray(~first_order), prev_x0=jnp.zeros(latent_shape, jnp.float32))

    def scale_model_input(self, state, sample, step_index):
        return sample

    def step(self, state: DPMState, model_output, step_index, sample):
        model_output = model_output.astype(jnp.float32)
        sample = sample.astype(jnp.float32)
        a_s, s_s = _at(state.x0_alpha, step_index), _at(state.x0_sigma, step_index)
        if self.schedule.prediction_type == "epsilon":
            x0 = (sample - s_s * model_output) / a_s
        else:  # v_prediction
            x0 = a_s * sample - s_s * model_output
        c_x, c_d0 = _at(state.sample_coeff, step_index), _at(state.d0_coeff, step_index)
        first = c_x * sample - c_d0 * x0
        d1 = _at(state.inv_r0, step_index) * (x0 - state.prev_x0)
        second = first + _at(state.d1_coeff, step_index) * d1
        prev = jnp.where(_at(state.second_order, step_index), second, first)
        return prev, state._replace(prev_x0=x0)


# --------------------------------------------------------------------------------------------------------------- Euler
class EulerState(NamedTuple):
    input_scale: jax.Array     # [S] sqrt(σ² + 1): the UNet sees sample / input_scale
    sigma: jax.Array           # [S] σ_i
    dt: jax.Array              # [S] σ_{i+1} - σ_i
    sigma_sq_plus_one: jax.Array  # [S] for v_prediction


@dataclasses.dataclass(frozen=True)
class EulerDiscrete:
    schedule: NoiseSchedule
    final_sigmas_type: str = "zero"
    name = "euler"

    def timesteps(self, num_steps: int) -> np.ndarray:
        """float32 timesteps (fractional with linspace spacing), as diffusers."""
        s = self.schedule
        s.check_steps(num_steps)
        T = s.num_train_timesteps
        if s.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
        if s.timestep_spacing == "leading":
            ts = (np.arange(num_steps) * (T // num_steps)).round()[::-1].astype(np.float32)
            return ts + np.float32(s.steps_offset)
        return np.arange(T, 0, -T / num_steps).round().astype(np.float32) - np.float32(1)

    def _sigmas(self, num_steps: int) -> np.ndarray:
        sigmas = self.schedule.sigmas_at(self.timesteps(num_steps))
        ac = self.schedule.alphas_cumprod()
        last = np.float32(0) if self.final_sigmas_type == "zero" else ((np.float32(1) - ac[0]) / ac[0]) ** 0.5
        return np.concatenate([sigmas, [last]]).astype(np.float32)

    def init_noise_sigma(self, num_steps: int) -> float:
        top = self._sigmas(num_steps).max()
        if self.schedule.timestep_spacing in ("linspace", "trailing"):
            return float(top)
        return float((top * top + np.float32(1)) ** np.float32(0.5))

    def init_state(self, latent_shape, num_steps: int) -> EulerState:
        sig = self._sigmas(num_steps)
        sq1 = sig[:-1] * sig[:-1] + np.float32(1)
        return EulerState(*(jnp.asarray(_f32(x)) for x in (np.sqrt(sq1), sig[:-1], sig[1:] - sig[:-1], sq1)))

    def scale_model_input(self, state: EulerState, sample, step_index):
        return sample / _at(state.input_scale, step_index)

    def step(self, state: EulerState, model_output, step_index, sample):
        sample = sample.astype(jnp.float32)
        model_output = model_output.astype(jnp.float32)
        sigma = _at(state.sigma, step_index)
        if self.schedule.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / _at(state.input_scale, step_index)) + (
                sample / _at(state.sigma_sq_plus_one, step_index))
        derivative = (sample - x0) / sigma
        return sample + derivative * _at(state.dt, step_index), state


Scheduler = DDIM | PNDM | DPMSolverPP2M | EulerDiscrete


def make_scheduler(name: str | None, config: dict[str, Any]) -> Scheduler:
    """A scheduler from a diffusers scheduler config. `name` None: the config's own `_class_name`."""
    if name is None:
        cls = config.get("_class_name") if isinstance(config, dict) else None
        if cls not in CLASS_NAMES:
            raise PosiError(f"scheduler config: _class_name {cls!r} is not supported ({', '.join(CLASS_NAMES)}); "
                            f"choose one of {', '.join(NAMES)}")
        name = CLASS_NAMES[cls]
    name = {"dpm++2m": "dpmpp_2m", "dpmsolver++": "dpmpp_2m", "plms": "pndm"}.get(name, name)
    if name not in NAMES:
        raise PosiError(f"unknown scheduler {name!r} (choose one of {', '.join(NAMES)})")
    opts = _options(name, config)
    schedule = NoiseSchedule.from_options(opts)
    if name == "ddim":
        return DDIM(schedule, set_alpha_to_one=bool(opts["set_alpha_to_one"]), clip_sample=bool(opts["clip_sample"]),
                    clip_sample_range=float(opts["clip_sample_range"]))
    if name == "pndm":
        if not opts["skip_prk_steps"]:
            raise PosiError("scheduler config: PNDM with skip_prk_steps=false (Runge-Kutta warm-up steps) is not "
                            "supported; Stable Diffusion folders set skip_prk_steps=true")
        return PNDM(schedule, set_alpha_to_one=bool(opts["set_alpha_to_one"]))
    if name in ("dpmpp_2m", "euler") and opts["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise PosiError(f"scheduler config: final_sigmas_type={opts['final_sigmas_type']!r} is not supported "
                        "(zero, sigma_min)")
    if name == "dpmpp_2m":
        if opts["solver_order"] != 2:
            raise PosiError(f"scheduler config: solver_order={opts['solver_order']!r} is not supported (2)")
        if opts["solver_type"] not in ("midpoint", "heun"):
            raise PosiError(f"scheduler config: solver_type={opts['solver_type']!r} is not supported "
                            "(midpoint, heun)")
        return DPMSolverPP2M(schedule, solver_type=opts["solver_type"],
                             lower_order_final=bool(opts["lower_order_final"]), euler_at_final=bool(opts["euler_at_final"]), final_sigmas_type=opts["final_sigmas_type"])
    return EulerDiscrete(schedule, final_sigmas_type=opts["final_sigmas_type"])
