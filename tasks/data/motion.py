"""Motion: the embedded sensor dataset, a deterministic generator of 6-axis IMU recordings.

A thigh-worn IMU (accelerometer ``acc_x/y/z`` in m/s², gyroscope ``gyro_x/y/z`` in rad/s; x points
up the thigh when upright, z forward) records 8-12 s at 50 Hz. Each recording is a sequence of 1-3
activities (walking, running, sitting, standing, lying, jumping, climbing stairs), never the same
twice in a row, joined by smooth ~0.8 s transitions in which posture (gravity direction) and
movement cross-fade, and the rotation of the thigh shows up on the gyroscope.

Per subject: cadence and amplitude factors, sensor orientation (a small rotation), accelerometer and
gyroscope biases and noise level. Per recording: bias drift and white noise. Every recording comes
with five reference descriptions such as "the wearer walks briskly for about four seconds, then sits
down", and its ground-truth activity segments.

Layout written by :func:`ensure_motion`::

    root/motion.json                 marker: format version + generating config (written last)
    root/manifest_{split}.jsonl      {"id", "file", "rate", "subject", "descriptions", "activities"}
    root/{split}/{id}.csv|.npz       the recordings (CSV: timestamp + named channels; NPZ: values/channels/rate)

Determinism: recording ``i`` of a split is drawn from ``np.random.default_rng([seed, split_index, i])``
and subject ``s`` from ``default_rng([seed, 99, s])``: the same seed gives the same data whatever the
split sizes. Subjects of val/test are disjoint from train ones.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalities.sensor import IMU_CHANNELS
from tasks.data.sensor_formats import write_csv, write_manifest
from tasks.data.generated import ensure_generated

__all__ = ["FORMAT_VERSION", "ACTIVITIES", "SPLITS", "MotionConfig", "generate_recording", "write_motion",
           "ensure_motion"]

FORMAT_VERSION = 1
ACTIVITIES: tuple[str, ...] = ("walking", "running", "sitting", "standing", "lying", "jumping", "climbing stairs")
SPLITS: tuple[str, ...] = ("train", "val", "test")
GRAVITY = 9.81
_TRANSITION = 0.8  # seconds of cross-fade between activities
_MIN_SEGMENT = 2.0  # seconds

# Posture: unit "up" vector in the body frame (x along the thigh, y lateral, z forward).
_UP = {
    "upright": np.array([1.0, 0.0, 0.0]),
    "stairs": np.array([0.93, 0.0, 0.37]),
    "sitting": np.array([0.22, 0.05, 0.97]),
    "lying": np.array([0.12, 0.96, 0.25]),
}
_POSTURE = {"walking": "upright", "running": "upright", "standing": "upright", "jumping": "upright",
            "climbing stairs": "stairs", "sitting": "sitting", "lying": "lying"}
# Step cadence (Hz) range of each activity; amplitudes scale with the subject.
_CADENCE = {"walking": (1.6, 2.1), "running": (2.5, 3.1), "climbing stairs": (1.2, 1.55), "jumping": (1.7, 2.3)}

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


@dataclass
class MotionConfig:
    """What to generate; stored in the ``motion.json`` marker to decide whether a dataset is reusable."""

    seed: int = 0
    n_train: int = 3000
    n_val: int = 300
    n_test: int = 300
    format: str = "csv"  # csv | npz
    rate: float = 50.0
    min_seconds: float = 8.0
    max_seconds: float = 12.0
    n_subjects: int = 80  # the last 25 % are held out for val/test

    def __post_init__(self) -> None:
        if self.format not in ("csv", "npz"):
            raise ValueError(f"MotionConfig.format must be 'csv' or 'npz', got {self.format!r}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError("MotionConfig needs 0 < min_seconds <= max_seconds")
        if self.n_subjects < 4:
            raise ValueError("MotionConfig.n_subjects must be >= 4")


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------
def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation matrix of up to ``max_deg`` degrees about a random axis (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = np.deg2rad(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _subject(seed: int, subject: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 99, subject])
    return {
        "cadence": rng.uniform(0.92, 1.08),
        "amplitude": rng.uniform(0.8, 1.25),
        "rotation": _rotation(rng, 20.0),
        "acc_bias": rng.normal(0, 0.15, 3),
        "gyro_bias": rng.normal(0, 0.03, 3),
        "noise": rng.uniform(0.8, 1.3),
    }


def _smooth_noise(rng: np.random.Generator, n: int, fs: float, cutoff: float, scale: float) -> np.ndarray:
    """Low-pass noise ``[3, n]`` (moving average of white noise), unit-ish std times ``scale``."""
    w = max(1, int(fs / cutoff))
    white = rng.normal(size=(3, n + w))
    c = np.cumsum(white, axis=1)
    return (c[:, w:] - c[:, :-w]) / np.sqrt(w) * scale


def _movement(act: str, t: np.ndarray, cadence: float, amp: float, rng: np.random.Generator,
              fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic body-frame acceleration and angular rate ``[3, T]`` of one activity (no gravity)."""
    n = len(t)
    acc, gyro = np.zeros((3, n)), np.zeros((3, n))
    ph = 2 * np.pi * cadence * t + rng.uniform(0, 2 * np.pi)  # step phase
    if act == "walking":
        a = 2.6 * amp
        acc[0] = a * (0.7 * np.sin(ph) + 0.3 * np.sin(2 * ph + 0.4))
        acc[1] = 0.35 * a * np.sin(ph / 2)
        acc[2] = 0.5 * a * np.sin(ph + 0.9)
        gyro[1] = 1.6 * amp * np.sin(ph / 2)
        gyro[0] = 0.25 * amp * np.sin(ph / 2 + 1.0)
        gyro[2] = 0.35 * amp * np.sin(ph / 2 + 0.5)
    elif act == "running":
        a = 9.0 * amp
        acc[0] = a * (0.7 * np.sin(ph) + 0.35 * np.sin(2 * ph + 0.3) + 0.15 * np.sin(3 * ph + 0.6))
        acc[1] = 0.25 * a * np.sin(ph / 2)
        acc[2] = 0.45 * a * np.sin(ph + 1.1)
        gyro[1] = 4.0 * amp * np.sin(ph / 2)
        gyro[0] = 0.6 * amp * np.sin(ph / 2 + 0.8)
        gyro[2] = 0.8 * amp * np.sin(ph / 2 + 0.3)
    elif act == "climbing stairs":
        a = 2.0 * amp
        acc[0] = a * (0.5 * np.sin(ph) + 0.45 * np.sin(2 * ph + 0.6))
        acc[1] = 0.3 * a * np.sin(ph / 2 + 0.3)
        acc[2] = 1.2 * a * np.sin(ph + 1.9)
        gyro[1] = 2.4 * amp * (np.sin(ph / 2) + 0.3 * np.sin(ph + 0.7))
        gyro[0] = 0.3 * amp * np.sin(ph / 2 + 1.2)
        gyro[2] = 0.2 * amp * np.sin(ph / 2)
    elif act == "jumping":
        u = (ph / (2 * np.pi)) % 1.0  # position in the hop cycle
        spike = np.exp(-0.5 * ((u - 0.5) / 0.06) ** 2)
        acc[0] = 16.0 * amp * (spike - spike.mean())
        acc[2] = 1.0 * amp * np.sin(ph + 0.5)
        gyro[1] = 0.5 * amp * np.sin(ph)
        gyro[0] = 0.15 * amp * np.sin(ph + 1.3)
    elif act == "standing":
        acc += _smooth_noise(rng, n, fs, 1.0, 0.08)
        gyro += _smooth_noise(rng, n, fs, 1.0, 0.05)
    elif act == "sitting":
        acc += _smooth_noise(rng, n, fs, 0.5, 0.05)
        gyro += _smooth_noise(rng, n, fs, 0.5, 0.03)
    elif act == "lying":
        breath = np.sin(2 * np.pi * rng.uniform(0.2, 0.3) * t)
        acc[2] += 0.06 * breath
        acc += _smooth_noise(rng, n, fs, 0.3, 0.02)
        gyro += _smooth_noise(rng, n, fs, 0.3, 0.015)
    else:
        raise ValueError(f"unknown activity {act!r}")
    return acc, gyro


def _weights(t: np.ndarray, bounds: list[float]) -> np.ndarray:
    """Cross-fade weights ``[K, T]`` (sum 1) of K segments split at ``bounds[1:-1]``."""
    k = len(bounds) - 1
    rise = [np.ones_like(t)]
    for b in bounds[1:-1]:
        x = np.clip((t - (b - _TRANSITION / 2)) / _TRANSITION, 0, 1)
        rise.append(x * x * (3 - 2 * x))  # smoothstep
    rise.append(np.zeros_like(t))
    return np.stack([rise[i] - rise[i + 1] for i in range(k)])


def _segments(rng: np.random.Generator, duration: float) -> list[tuple[str, float, float]]:
    n = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    acts: list[str] = []
    while len(acts) < n:
        a = str(rng.choice(ACTIVITIES))
        if not acts or a != acts[-1]:
            acts.append(a)
    spare = duration - n * _MIN_SEGMENT
    cuts = np.sort(rng.uniform(0, spare, n - 1)) if n > 1 else np.array([])
    lengths = np.diff(np.concatenate([[0.0], cuts, [spare]])) + _MIN_SEGMENT
    ends = np.cumsum(lengths)
    starts = np.concatenate([[0.0], ends[:-1]])
    return [(a, float(s), float(e)) for a, s, e in zip(acts, starts, ends)]


# ------------------------------------------------------------------------------------------------
# Descriptions
# ------------------------------------------------------------------------------------------------
def _pace(act: str, cadence: float) -> str:
    lo, hi = _CADENCE[act]
    x = (cadence - lo) / (hi - lo)
    return "fast" if x > 0.62 else "slow" if x < 0.38 else "steady"


def _phrase(rng: np.random.Generator, act: str, pace: str, prev: str | None) -> str:
    """A verb phrase (third person, present) for one activity."""
    if act == "walking":
        adv = {"fast": ["briskly", "quickly"], "slow": ["slowly", "at a slow pace"], "steady": ["at a steady pace", ""]}[pace]
        return ("walks " + str(rng.choice(adv))).strip()
    if act == "running":
        return str(rng.choice({"fast": ["runs fast", "sprints"], "slow": ["jogs", "runs at an easy pace"],
                               "steady": ["runs", "jogs"]}[pace]))
    if act == "climbing stairs":
        return str(rng.choice(["climbs the stairs", "walks up the stairs", "goes up a flight of stairs"]))
    if act == "jumping":
        return str(rng.choice(["jumps up and down", "jumps in place", "hops on the spot"]))
    if act == "sitting":
        return str(rng.choice(["sits down", "takes a seat"] if prev else ["sits still", "is sitting"]))
    if act == "standing":
        if prev in ("sitting", "lying"):
            return str(rng.choice(["stands up", "gets up and stands"]))
        return str(rng.choice(["stands still", "stands"] if prev else ["stands still", "is standing"]))
    if act == "lying":
        return str(rng.choice(["lies down", "lies down to rest"] if prev else ["lies still", "is lying down"]))
    raise ValueError(act)


def _seconds(rng: np.random.Generator, length: float) -> str:
    n = int(np.clip(round(length), 1, len(_NUMBERS) - 1))
    unit = "second" if n == 1 else "seconds"
    return str(rng.choice([f"for about {_NUMBERS[n]} {unit}", f"for {_NUMBERS[n]} {unit}",
                           f"for roughly {_NUMBERS[n]} {unit}"]))


def describe(rng: np.random.Generator, segments: list[tuple[str, float, float]], paces: list[str],
             n: int = 5) -> list[str]:
    """``n`` distinct reference descriptions of a recording (tries a few extra draws for variety)."""
    out: list[str] = []
    for _ in range(4 * n):
        subj = str(rng.choice(["the wearer", "the person", "someone", "a person", "the user"]))
        with_time = rng.random() < 0.6
        parts = []
        prev = None
        for (act, s, e), pace in zip(segments, paces):
            p = _phrase(rng, act, pace, prev)
            if with_time and (len(segments) > 1 or rng.random() < 0.7):
                p += " " + _seconds(rng, e - s)
            parts.append(p)
            prev = act
        if len(parts) == 1:
            text = f"{subj} {parts[0]}"
            if not with_time and rng.random() < 0.5:
                text += " the whole time"
        else:
            joins = [str(rng.choice([", then ", " and then ", ", after that "])) for _ in parts[1:]]
            if len(parts) == 3 and rng.random() < 0.5:
                joins[-1] = ", and finally "
            text = subj + " " + parts[0] + "".join(j + p for j, p in zip(joins, parts[1:]))
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------------------
# One recording
# ------------------------------------------------------------------------------------------------
def generate_recording(cfg: MotionConfig, split_index: int, index: int) -> dict[str, Any]:
    """Recording ``index`` of split ``split_index``: values ``[6, T]``, segments, descriptions."""
    rng = np.random.default_rng([cfg.seed, split_index, index])
    n_train_subjects = int(cfg.n_subjects * 0.75)
    subject = int(rng.integers(0, n_train_subjects) if split_index == 0 else rng.integers(n_train_subjects, cfg.n_subjects))
    subj = _subject(cfg.seed, subject)
    fs = cfg.rate
    duration = float(rng.uniform(cfg.min_seconds, cfg.max_seconds))
    n = int(round(duration * fs))
    t = np.arange(n) / fs
    segments = _segments(rng, n / fs)
    bounds = [segments[0][1]] + [e for _, _, e in segments]
    w = _weights(t, bounds)  # [K, T]

    acc, gyro, up = np.zeros((3, n)), np.zeros((3, n)), np.zeros((3, n))
    paces = []
    for k, (act, _, _) in enumerate(segments):
        cadence = 0.0
        if act in _CADENCE:
            lo, hi = _CADENCE[act]
            cadence = float(np.clip(rng.uniform(lo, hi) * subj["cadence"], lo, hi))
        paces.append(_pace(act, cadence) if cadence else "")
        a, g = _movement(act, t, cadence, subj["amplitude"] * rng.uniform(0.9, 1.1), rng, fs)
        tilt = _rotation(rng, 8.0) @ _UP[_POSTURE[act]]  # the posture varies a little per recording
        acc += w[k] * a
        gyro += w[k] * g
        up += w[k][None] * tilt[:, None]
    up /= np.linalg.norm(up, axis=0, keepdims=True)
    # the thigh's rotation during posture changes: omega = u x du/dt
    gyro += np.cross(up.T, np.gradient(up, 1 / fs, axis=1).T).T
    acc += GRAVITY * up

    rot = subj["rotation"]
    noise = subj["noise"]
    drift = rng.normal(0, 0.02, (3, 1)) * t  # slow accelerometer drift (m/s² per s)
    gyro_walk = np.cumsum(rng.normal(0, 0.002, (3, n)), axis=1)  # gyroscope bias random walk
    acc = rot @ acc + subj["acc_bias"][:, None] + drift + rng.normal(0, 0.12 * noise, (3, n))
    gyro = rot @ gyro + subj["gyro_bias"][:, None] + gyro_walk + rng.normal(0, 0.03 * noise, (3, n))
    values = np.concatenate([acc, gyro]).astype(np.float32)
    return {
        "values": values,
        "subject": subject,
        "segments": [{"activity": a, "start": round(s, 2), "end": round(e, 2)} for a, s, e in segments],
        "descriptions": describe(rng, segments, paces),
    }


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
def write_motion(root: str | Path, cfg: MotionConfig) -> Path:
    """Generate every split into ``root`` (overwriting files there); ``motion.json`` is written last."""
    root = Path(root)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    for si, split in enumerate(SPLITS):
        (root / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(sizes[split]):
            rec = generate_recording(cfg, si, i)
            rid = f"{split}-{i:06d}"
            rel = f"{split}/{rid}.{cfg.format}"
            if cfg.format == "csv":
                write_csv(root / rel, rec["values"], IMU_CHANNELS, np.arange(rec["values"].shape[1]) / cfg.rate)
            else:
                np.savez(root / rel, values=rec["values"], channels=np.array(IMU_CHANNELS), rate=np.float64(cfg.rate))
            rows.append({"id": rid, "file": rel, "rate": cfg.rate, "subject": rec["subject"],
                         "descriptions": rec["descriptions"], "activities": rec["segments"]})
        write_manifest(root / f"manifest_{split}.jsonl", rows)
    (root / "motion.json").write_text(json.dumps(_marker(cfg)), encoding="utf-8")
    return root


def _marker(cfg: MotionConfig) -> dict[str, Any]:
    return {"dataset": "motion", "version": FORMAT_VERSION, "config": asdict(cfg)}


def ensure_motion(root: str | Path, cfg: MotionConfig | None = None, timeout_s: float = 1800.0) -> Path:
    """Return ``root`` holding the Motion dataset for ``cfg``, generating it on first use.

    Generation goes to a temporary sibling folder renamed into place (an interrupted run never leaves
    a complete-looking dataset); concurrent callers serialise on ``<root>.lock``. A non-empty ``root``
    without a ``motion.json`` marker is not ours and raises :class:`FileExistsError`.
    """
    cfg = cfg or MotionConfig()
    return ensure_generated(root, "motion.json", _marker(cfg), lambda folder: write_motion(folder, cfg), "Motion",
                            timeout_s)
