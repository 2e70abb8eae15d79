"""Sensor modality: multichannel time series ``[C, T]`` → patch embeddings.

CPU side (:class:`SensorTokenizer`, runs in DataLoader workers): pick the configured channels by
name, resample onto a uniform grid at the configured rate (input at another rate, or irregular
timestamps), normalise per channel with statistics fitted on training data, and mask non-finite
values (they are zeroed after normalisation and flagged in a validity mask, never propagated).

Model side (:class:`SensorEmbedder`): unfold over time into patches (``patch_len`` samples every
``patch_stride``), concatenate each patch's values, validity flags and per-channel statistics (mean,
std, mean absolute difference), project to ``d_model`` and add a learned time position. A patch without a single valid value (padding, or a
run of NaNs) is masked out of attention.

The :class:`SensorConfig` (channel names, rate, patching, fitted mean/std) lives in the model's
``ModelConfig.modalities["sensor"]`` and is therefore saved with the model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from modalities.base import ModalityConfig, is_pos, register_modality

#: Channel names of a 6-axis IMU (accelerometer in m/s², gyroscope in rad/s).
IMU_CHANNELS: tuple[str, ...] = ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")


class SensorDataError(ValueError):
    """A recording that cannot be tokenised; the message names the record."""


@dataclass
class SensorConfig(ModalityConfig):
    """Config of the sensor tokenizer; saved with the model (``ModelConfig.modalities["sensor"]``)."""

    channels: list[str] = field(default_factory=lambda: list(IMU_CHANNELS))
    sample_rate: float = 50.0  # Hz; every recording is resampled to this rate
    patch_len: int = 25  # samples per patch
    patch_stride: int = 25  # samples between patch starts
    max_len: int = 640  # longest recording in samples (at sample_rate); sets the number of time positions
    mean: list[float] | None = None  # fitted per-channel statistics (None: not fitted yet)
    std: list[float] | None = None
    min_std: float = 1e-3  # floor for a (near-)constant channel
    antialias: bool = True  # box-filter before downsampling by >= 1.5x

    def __post_init__(self) -> None:
        self.channels = [str(c) for c in self.channels]
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"SensorConfig.channels must be non-empty and unique, got {self.channels}")
        if self.sample_rate <= 0:
            raise ValueError(f"SensorConfig.sample_rate must be > 0, got {self.sample_rate}")
        if not 1 <= self.patch_stride <= self.patch_len <= self.max_len:
            raise ValueError(f"need 1 <= patch_stride ({self.patch_stride}) <= patch_len ({self.patch_len}) "
                             f"<= max_len ({self.max_len})")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                v = [float(x) for x in v]
                if len(v) != len(self.channels):
                    raise ValueError(f"SensorConfig.{name} has {len(v)} values for {len(self.channels)} channels")
                setattr(self, name, v)
        if (self.mean is None) != (self.std is None):
            raise ValueError("SensorConfig.mean and .std must be given together")

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def num_patches(self, length: int) -> int:
        """Patches covering ``length`` samples (the last one zero-padded)."""
        if length <= self.patch_len:
            return 1
        return math.ceil((length - self.patch_len) / self.patch_stride) + 1

    @property
    def max_patches(self) -> int:
        return self.num_patches(self.max_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SensorRecording:
    """One raw recording: ``values [C, T]`` plus how it was sampled.

    ``channels`` names the rows (None: rows are already in the configured order); ``timestamps`` (seconds,
    ``[T]``) or ``rate`` (Hz) give the sampling (neither: the configured rate is assumed); ``source``
    names the record in error messages (a file path, a manifest line).
    """

    values: np.ndarray
    channels: Sequence[str] | None = None
    rate: float | None = None
    timestamps: np.ndarray | None = None
    source: str = "<recording>"


# ------------------------------------------------------------------------------------------------
# Resampling (numpy, vectorised over time and channels)
# ------------------------------------------------------------------------------------------------
def _box_filter(x: np.ndarray, valid: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred moving average of odd ``width`` over valid values only; ``[C, T]`` in and out."""
    half = width // 2
    xv = np.pad(np.where(valid, x, 0.0), ((0, 0), (half + 1, half)))
    cv = np.pad(valid.astype(np.float64), ((0, 0), (half + 1, half)))
    sx, sc = np.cumsum(xv, axis=1), np.cumsum(cv, axis=1)
    total = sx[:, width:] - sx[:, :-width]
    count = sc[:, width:] - sc[:, :-width]
    ok = count > 0.5
    return np.where(ok, total / np.maximum(count, 1.0), 0.0), ok


def resample(x: np.ndarray, valid: np.ndarray, timestamps: np.ndarray, rate: float,
             antialias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of ``x [C, T]`` at ``timestamps`` onto ``t0 + k / rate``.

    An output sample is valid only when the input samples it is interpolated from are valid, so an
    isolated NaN invalidates its neighbourhood instead of spreading. When the input is sampled at
    1.5x the target rate or faster (and ``antialias``), a centred box filter of the rate ratio's odd
    width is applied first.
    """
    t = timestamps.astype(np.float64)
    if len(t) == 1:
        return x.copy(), valid.copy()
    if antialias:
        ratio = 1.0 / (float(np.median(np.diff(t))) * rate)  # input rate / output rate
        if ratio >= 1.5:
            x, valid = _box_filter(x, valid, 2 * int(ratio // 2) + 1)
    n_out = int(math.floor((t[-1] - t[0]) * rate + 1e-6)) + 1
    grid = t[0] + np.arange(n_out) / rate
    left = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(t) - 2)
    w = np.clip((grid - t[left]) / (t[left + 1] - t[left]), 0.0, 1.0)
    x0 = np.where(valid, x, 0.0)
    out = x0[:, left] * (1.0 - w) + x0[:, left + 1] * w
    eps = 1e-9
    ok = (valid[:, left] | (w > 1 - eps)) & (valid[:, left + 1] | (w < eps))
    return out, ok


# ------------------------------------------------------------------------------------------------
# Tokenizer (CPU preprocessing)
# ------------------------------------------------------------------------------------------------
class SensorTokenizer:
    """Recording → ``(values [C, T] float32, valid [C, T] bool)`` at the configured rate, normalised.

    Picklable (runs in DataLoader workers). :meth:`fit` returns a config with the per-channel mean and
    std of a set of recordings; :meth:`__call__` needs a fitted config.
    """

    def __init__(self, cfg: SensorConfig):
        self.cfg = cfg
        if cfg.fitted:
            self.mean = np.asarray(cfg.mean, dtype=np.float64)[:, None]
            self.std = np.maximum(np.asarray(cfg.std, dtype=np.float64), cfg.min_std)[:, None]

    # --- checks and resampling ----------------------------------------------------------------
    def _select_channels(self, rec: SensorRecording) -> np.ndarray:
        values = rec.values
        if not isinstance(values, np.ndarray):
            values = np.asarray(values)
        if values.dtype.kind not in "biuf":
            raise SensorDataError(f"{rec.source}: non-numeric sensor data (dtype {values.dtype})")
        if values.ndim != 2:
            raise SensorDataError(f"{rec.source}: expected values [channels, time], got shape {values.shape}")
        want = self.cfg.channels
        if rec.channels is not None:
            names = [str(c) for c in rec.channels]
            if len(names) != values.shape[0]:
                raise SensorDataError(f"{rec.source}: {values.shape[0]} rows but {len(names)} channel names")
            missing = [c for c in want if c not in names]
            if missing:
                raise SensorDataError(f"{rec.source}: missing channel(s) {missing}; it has {names}")
            values = values[[names.index(c) for c in want]]
        elif values.shape[0] != len(want):
            raise SensorDataError(f"{rec.source}: wrong channel count: {values.shape[0]} rows (shape "
                                  f"{values.shape}), the tokenizer expects {len(want)} {want}")
        if values.shape[1] == 0:
            raise SensorDataError(f"{rec.source}: empty recording (no samples)")
        return values.astype(np.float64, copy=False)

    def _timestamps(self, rec: SensorRecording, n: int) -> np.ndarray | None:
        """The recording's sample times if it must be resampled, else None."""
        target = self.cfg.sample_rate
        if rec.timestamps is None:
            rate = rec.rate or target
            if rate <= 0:
                raise SensorDataError(f"{rec.source}: sampling rate must be > 0, got {rate}")
            return None if abs(rate - target) <= 1e-6 * target else np.arange(n) / rate
        t = np.asarray(rec.timestamps, dtype=np.float64)
        if t.shape != (n,):
            raise SensorDataError(f"{rec.source}: {t.shape[0] if t.ndim else 0} timestamps for {n} samples")
        if not np.isfinite(t).all():
            raise SensorDataError(f"{rec.source}: non-finite timestamp at row {int(np.argmin(np.isfinite(t)))}")
        dt = np.diff(t)
        if (dt <= 0).any():
            raise SensorDataError(f"{rec.source}: timestamps are not strictly increasing at row "
                                  f"{int(np.argmax(dt <= 0)) + 1}")
        if n > 1 and np.allclose(dt, 1.0 / target, rtol=1e-3, atol=0):
            return None
        return t

    def resampled(self, rec: SensorRecording) -> tuple[np.ndarray, np.ndarray]:
        """Checked, channel-ordered, resampled raw values ``[C, T]`` (float64) and validity."""
        values = self._select_channels(rec)
        valid = np.isfinite(values)
        if not valid.any():
            raise SensorDataError(f"{rec.source}: all values are NaN/inf")
        t = self._timestamps(rec, values.shape[1])
        if t is not None:
            values, valid = resample(values, valid, t, self.cfg.sample_rate, self.cfg.antialias)
        if values.shape[1] > self.cfg.max_len:
            raise SensorDataError(
                f"{rec.source}: {values.shape[1]} samples ({values.shape[1] / self.cfg.sample_rate:.1f} s) at "
                f"{self.cfg.sample_rate:g} Hz exceed max_len={self.cfg.max_len}; crop it or raise max_len")
        return values, valid

    # --- statistics ---------------------------------------------------------------------------
    def fit(self, recordings: Iterable[SensorRecording]) -> SensorConfig:
        """A copy of the config with per-channel mean/std over the valid values of ``recordings``."""
        c = self.cfg.num_channels
        s, ss, n = np.zeros(c), np.zeros(c), np.zeros(c)
        for rec in recordings:
            values, valid = self.resampled(rec)
            v = np.where(valid, values, 0.0)
            s += v.sum(1)
            ss += (v * v).sum(1)
            n += valid.sum(1)
        if (n == 0).any():
            empty = [ch for ch, k in zip(self.cfg.channels, n) if k == 0]
            raise SensorDataError(f"cannot fit statistics: no valid values for channel(s) {empty}")
        mean = s / n
        std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
        return replace(self.cfg, mean=mean.tolist(), std=np.maximum(std, self.cfg.min_std).tolist())

    def normalize(self, values: np.ndarray) -> np.ndarray:
        self._need_fit()
        return (values - self.mean) / self.std

    def denormalize(self, values: np.ndarray | torch.Tensor) -> np.ndarray:
        """Inverse of :meth:`normalize` (``[C, T]``)."""
        self._need_fit()
        v = values.detach().cpu().double().numpy() if torch.is_tensor(values) else np.asarray(values, np.float64)
        return v * self.std + self.mean

    def _need_fit(self) -> None:
        if not self.cfg.fitted:
            raise RuntimeError("SensorConfig has no mean/std: fit the tokenizer on training data first")

    def __call__(self, rec: SensorRecording) -> tuple[torch.Tensor, torch.Tensor]:
        values, valid = self.resampled(rec)
        x = np.where(valid, self.normalize(values), 0.0)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(valid)


def pad_sensor_batch(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(values [C, T_i], valid [C, T_i])`` pairs → ``values [B, C, T]``, ``valid [B, C, T]``."""
    c = items[0][0].shape[0]
    t = max(v.shape[1] for v, _ in items)
    values = torch.zeros(len(items), c, t, dtype=items[0][0].dtype)
    valid = torch.zeros(len(items), c, t, dtype=torch.bool)
    for i, (v, m) in enumerate(items):
        values[i, :, : v.shape[1]] = v
        valid[i, :, : m.shape[1]] = m
    return values, valid


# ------------------------------------------------------------------------------------------------
# Embedding (inside the model)
# ------------------------------------------------------------------------------------------------
def _patch_stats(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per patch and channel over valid values: mean, std, mean |first difference| → ``[..., 3]``."""
    n = m.sum(-1, keepdim=True).clamp(min=1.0)
    mean = (v * m).sum(-1, keepdim=True) / n
    std = ((((v - mean) * m) ** 2).sum(-1, keepdim=True) / n + 1e-6).sqrt()
    pair = m[..., 1:] * m[..., :-1]
    diff = ((v[..., 1:] - v[..., :-1]).abs() * pair).sum(-1, keepdim=True) / pair.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.cat([mean, std, diff], dim=-1)


class SensorEmbedder(nn.Module):
    """Normalised ``values [B, C, T]`` (+ ``valid [B, C, T]``) → patch embeddings ``[B, N, d_model]``.

    Each patch's ``C * patch_len`` values, as many validity flags and three statistics per channel (mean,
    standard deviation and mean absolute first difference over the valid values: posture, intensity and a
    frequency proxy, which a linear map of raw, phase-shifted waveforms cannot compute) go through one
    linear layer; a learned position per patch index gives time. Returns the embeddings and ``mask [B, N]`` (True for
    a patch with at least one valid value).
    """

    def __init__(self, cfg: SensorConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.num_channels * (2 * cfg.patch_len + 3), d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.max_patches, d_model))
        self.norm = nn.LayerNorm(d_model)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, values: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if values.ndim != 3 or values.shape[1] != cfg.num_channels:
            raise ValueError(f"expected sensor values [B, {cfg.num_channels}, T] for channels {cfg.channels}, "
                             f"got {tuple(values.shape)}")
        if values.shape[2] > cfg.max_len:
            raise ValueError(f"sensor input of {values.shape[2]} samples exceeds max_len={cfg.max_len}")
        if valid is None:
            valid = torch.isfinite(values)
        values = values.masked_fill(~valid, 0.0)
        n = cfg.num_patches(values.shape[2])
        pad = cfg.patch_len + (n - 1) * cfg.patch_stride - values.shape[2]
        if pad > 0:
            values = nn.functional.pad(values, (0, pad))
            valid = nn.functional.pad(valid, (0, pad))
        v = values.unfold(2, cfg.patch_len, cfg.patch_stride)  # [B, C, N, P]
        m = valid.unfold(2, cfg.patch_len, cfg.patch_stride)  # [B, C, N, P]
        feats = torch.cat([v, m.to(v.dtype), _patch_stats(v, m.to(v.dtype))], dim=-1)  # [B, C, N, 2P+3]
        feats = feats.permute(0, 2, 1, 3).flatten(2)  # [B, N, C*(2P+3)]
        x = self.norm(self.proj(feats) + self.pos[:n])
        return x, m.any(-1).any(1)  # [B, N]


def collate_sensor(items: list[Any]) -> Any:
    """A batch of sensor segments: ``(values, valid)`` pairs of any length padded (:func:`pad_sensor_batch`),
    plain tensors stacked."""
    return pad_sensor_batch(items) if isinstance(items[0], tuple) else torch.stack(items)


register_modality("sensor", config=SensorConfig, embedder=SensorEmbedder, preprocess=SensorTokenizer,
                  collate=collate_sensor, typed=True, legacy_type_index=3,
                  field_checks={"patch_len": is_pos, "patch_stride": is_pos, "max_len": is_pos})
