"""Exact resume: a ``zoo-train`` subprocess killed with SIGKILL (mid-epoch, and inside a checkpoint write) and resumed
with ``ckpt_path=last`` ends bit-identical to the uninterrupted run, and its logs keep every row."""
import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from zoo.atomic import TEMP_PATTERN, atomic_file, atomic_write_text, remove_orphan_temps

STEPS, EVERY, EPOCH = 40, 5, 16  # 64 images at batch 4: 16 steps an epoch; last.ckpt every 5 steps
RUN = ["experiment=caption_shapes", "model=test_tiny", "data.batch_size=4", "data.eval_batch_size=16",
       "data.tokenizer_vocab_size=300", "task.max_new_tokens=8", "data.shapes.n_train=64", "data.shapes.n_val=16",
       "data.shapes.n_test=16",
       "data.captions_per_image=3",  # Shapes has 5 a image: each visit draws 3 at random (per-sample RNG)
       f"trainer.max_steps={STEPS}", "trainer.max_epochs=-1", "trainer.deterministic=true",
       "trainer.check_val_every_n_epoch=1",  # validations at steps 16 and 32, one of them before the kill
       f"callbacks.mid_epoch_checkpoint.every_n_train_steps={EVERY}", "trainer.log_every_n_steps=1",
       "task.warmup_steps=5", "test=false"]
# the model keeps caption_shapes' frozen, pretrained ResNet stem (BatchNorm in eval mode) and dropout 0.1
TIMING = {"train/samples_per_sec"}  # wall-clock figures: never equal between two runs


def _zoo_train(run_dir: Path, data: Path, workers: int, *extra: str, env: dict | None = None, umask: int | None = None,
               wait: bool = True):
    args = [sys.executable, "-m", "tasks.cli.train", *RUN, f"data.root={data}", f"data.num_workers={workers}",
            f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}/logs", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    pre = (lambda: os.umask(umask)) if umask is not None else None
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pre)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, preexec_fn=pre)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # RNG states too are weights_only-safe


def _step(path: Path) -> int:
    try:
        return int(_load(path)["global_step"])
    except Exception:  # not there yet
        return -1


def _tensors(ckpt: dict) -> dict:
    """Every tensor of the final weights and of the optimizer state, by name."""
    out = {f"weights/{k}": v for k, v in ckpt["state_dict"].items()}
    for i, opt in enumerate(ckpt["optimizer_states"]):
        for pid, state in opt["state"].items():
            out.update({f"optimizer{i}/{pid}/{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def _assert_identical(ref: Path, run: Path) -> int:
    a, b = _load(ref / "checkpoints" / "last.ckpt"), _load(run / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ, e.g. {differ[:5]}"
    n_opt = sum(k.startswith("optimizer") for k in ta)
    assert n_opt > 100 and len(ta) - n_opt > 80  # weights and optimizer state both compared
    print(f"[resume] {len(ta)} tensors compared ({len(ta) - n_opt} weights, {n_opt} optimizer state): all equal")
    return len(ta)


def _rows(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _comparable(rows: list[dict], keys: set[str]) -> list[dict]:
    """Rows over the same columns (a column added later is empty in earlier rows), timings masked."""
    return [{k: ("<time>" if k in TIMING and r.get(k) else r.get(k, "")) for k in sorted(keys)} for r in rows]


def _assert_log_complete(ref: Path, run: Path, before: list[dict], killed_at: int) -> None:
    """Every row written before the kill up to the checkpoint is kept; the file then reads as the uninterrupted
    run's: one ``train/loss`` row per step, with the same values."""
    final, reference = _rows(run), _rows(ref)
    keys = set(reference[0])
    after = _comparable(final, keys)
    kept = [r for r in _comparable(before, keys) if int(r["step"]) < killed_at]
    assert kept and all(r in after for r in kept)
    assert {int(r["step"]) for r in before if r.get("train/loss")} >= set(range(killed_at))  # flushed before kill
    losses = [int(r["step"]) for r in after if r.get("train/loss")]
    assert losses == list(range(STEPS))  # every step once, in order
    assert set(final[0]) == keys and after == _comparable(reference, keys)
    print(f"[resume] csv rows: {len(before)} before the kill ({len(kept)} up to the checkpoint at step "
          f"{killed_at}), {len(after)} after the resume; uninterrupted run {len(reference)}")


@pytest.fixture(scope="module")
def reference(tiny_shapes, tmp_path_factory):
    """The uninterrupted run with ``workers`` loader workers (0: loading in the main process)."""
    runs: dict[int, Path] = {}

    def get(workers: int) -> Path:
        if workers not in runs:
            runs[workers] = tmp_path_factory.mktemp(f"ref{workers}") / "run"
            _zoo_train(runs[workers], tiny_shapes, workers)
        return runs[workers]

    return get


def test_sigkill_mid_epoch_then_resume_is_bit_identical(reference, tiny_shapes, tmp_path):
    """Two loader workers, killed mid-epoch after a validation."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = _zoo_train(run, tiny_shapes, 2, umask=0o027, wait=False)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and _step(last) < 20:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _step(last)
    assert 20 <= killed_at < STEPS and killed_at % EPOCH, killed_at  # mid-epoch, after the validation at step 16
    before = _rows(run)
    log_before = (run / "train.log").read_text()

    out = _zoo_train(run, tiny_shapes, 2, "ckpt_path=last", umask=0o027)
    assert "Restoring states from the checkpoint" in out
    _assert_identical(reference(2), run)
    _assert_log_complete(reference(2), run, before, killed_at)
    assert (run / "train.log").read_text().startswith(log_before)  # the job log is appended to
    for name in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "metrics.json", "predictions.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o640, name  # 0o666 & ~umask


def test_sigkill_inside_checkpoint_write_then_resume_is_bit_identical(reference, tiny_shapes, tmp_path):
    """The third last.ckpt write (step 15) stops after its bytes are in the temp file; killed there, the run
    resumes from step 10, and the orphan temp file is removed at the start."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    proc = _zoo_train(run, tiny_shapes, 0, env={"MMZOO_TEST_HANG_IN_WRITE": "last.ckpt:3"}, wait=False)
    deadline = time.time() + 240
    temps: list[Path] = []
    while proc.poll() is None and time.time() < deadline:
        temps = list(ckpts.glob(".last.ckpt.*.tmp")) if ckpts.is_dir() else []
        if temps and temps[0].stat().st_size > 0 and _step(ckpts / "last.ckpt") == 2 * EVERY:
            time.sleep(0.5)  # let it be wholly written (it hangs before the rename)
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(temps) == 1 and temps[0].is_file()
    assert _step(ckpts / "last.ckpt") == 2 * EVERY  # the interrupted write left last.ckpt as it was
    assert temps[0].stat().st_size > 0.5 * (ckpts / "last.ckpt").stat().st_size
    before = _rows(run)

    out = _zoo_train(run, tiny_shapes, 0, "ckpt_path=last")
    assert f"removed {temps[0]}" in out and not temps[0].exists()
    assert not list(ckpts.glob(".*.tmp"))
    _assert_identical(reference(0), run)
    _assert_log_complete(reference(0), run, before, 2 * EVERY)


def test_multitask_sigkill_then_resume_is_bit_identical(tmp_path):
    """The main job's shape: four tasks' loaders (one worker each) in a CombinedLoader that cycles the shorter
    ones; every cache (data, tokenizers, VQ tokenizer, pretrained stem, probe) is built by the reference run."""
    from tasks.data.shapes import ShapesConfig, ensure_shapes
    from tests.test_train import multitask_overrides

    data = tmp_path / "shapes"
    ensure_shapes(data, ShapesConfig(n_train=64, n_val=16, n_test=16))
    steps = 24
    run_args = ["experiment=multitask",
                *[o.replace("num_workers=0", "num_workers=1") for o in multitask_overrides(data, tmp_path)],
                "callbacks.time_budget=null", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
                "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1", "trainer.deterministic=true",
                f"callbacks.mid_epoch_checkpoint.every_n_train_steps={EVERY}", "trainer.log_every_n_steps=1",
                "test=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def zoo_train(run: Path, *extra: str, wait: bool = True):
        args = [sys.executable, "-m", "tasks.cli.train", *run_args, f"hydra.run.dir={run}", f"paths.log_dir={tmp_path}/logs",
                *extra]
        if not wait:
            return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]

    ref, run = tmp_path / "ref", tmp_path / "run"
    zoo_train(ref)
    proc = zoo_train(run, wait=False)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and _step(last) < 2 * EVERY:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _step(last)
    loaders = _load(last)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert len(loaders) == 4 and len({s["pass"] for s in loaders}) > 1  # a shorter loader has cycled
    zoo_train(run, "ckpt_path=last")
    a, b = _load(ref / "checkpoints" / "last.ckpt"), _load(last)
    assert a["global_step"] == b["global_step"] == steps and 2 * EVERY <= killed_at < steps
    ta, tb = _tensors(a), _tensors(b)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert ta.keys() == tb.keys() and len(ta) > 200 and not differ, differ[:5]
    losses = [r for r in _rows(run) if r.get("train/loss")]
    assert [int(r["step"]) for r in losses] == list(range(steps))
    assert [r["train/loss"] for r in losses] == [r["train/loss"] for r in _rows(ref) if r.get("train/loss")]
    print(f"[resume] multitask: {len(ta)} tensors compared, all equal (killed at step {killed_at})")


# --- the parts, without subprocesses --------------------------------------------------------------------------
class _Noisy(Dataset):
    """Each sample draws from the torch, numpy and Python RNGs, as datasets with random captions do."""

    def __len__(self) -> int:
        return 22

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), torch.rand(()).item(), float(np.random.rand()), random.random()])


def _batches(loader, n: int | None = None, it=None) -> list[torch.Tensor]:
    out = []
    for b in it if it is not None else loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def _same(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    return len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys))


def test_resumable_loader_draws_what_a_shuffled_dataloader_draws():
    """Same batches (order and per-sample draws) and the same global RNG afterwards: runs keep their results."""
    from torch.utils.data import DataLoader

    from tasks.runtime.resume import ResumableLoader

    def two_passes(loader) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        return _batches(loader) + _batches(loader), torch.rand(3)

    plain, after = two_passes(DataLoader(_Noisy(), batch_size=4, shuffle=True, drop_last=True))
    ours, ours_after = two_passes(ResumableLoader(_Noisy(), batch_size=4, seed=0))
    assert len(plain) == 10 and _same(ours, plain) and torch.equal(ours_after, after)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_resumes_mid_pass_and_after(workers):
    """State after 2 batches of the second pass + the RNG states then: a new loader, whose iterator is created
    before the RNG is restored (as Lightning does), serves the rest of that pass and the next pass as the
    uninterrupted loader does."""
    from tasks.runtime.resume import ResumableLoader, collect_rng_states, set_rng_states

    def loader() -> ResumableLoader:
        return ResumableLoader(_Noisy(), batch_size=4, seed=0, num_workers=workers,
                               persistent_workers=workers > 0)

    torch.manual_seed(0)
    whole = loader()
    first = _batches(whole)
    it = iter(whole)
    head = _batches(whole, 2, it)
    state, rng = whole.state_dict(), collect_rng_states()
    expected = _batches(whole, it=it) + _batches(whole)
    assert state["pass"] == 1 and state["batches"] == 2 and state["seed"] >= 0
    assert len(expected) == 8 and not _same(head, first[:2])  # a pass of its own

    resumed = loader()
    resumed.load_state_dict(state)
    torch.manual_seed(99)  # whatever happens before the restore
    it = iter(resumed)
    set_rng_states(rng)
    assert _same(_batches(resumed, it=it) + _batches(resumed), expected)


def test_resumable_loader_worker_count_does_not_change_the_samples():
    from tasks.runtime.resume import ResumableLoader

    def run(workers: int) -> list[torch.Tensor]:
        torch.manual_seed(3)
        return _batches(ResumableLoader(_Noisy(), batch_size=4, seed=0, num_workers=workers))

    one = run(1)
    assert _same(run(2), one) and len({round(float(b[0, 1]), 6) for b in one}) == len(one)


def test_resumable_loader_after_a_complete_pass_starts_the_next():
    from tasks.runtime.resume import ResumableLoader, collect_rng_states, set_rng_states

    torch.manual_seed(1)
    whole = ResumableLoader(_Noisy(), batch_size=4, seed=0)
    _batches(whole)
    state, rng = whole.state_dict(), collect_rng_states()
    assert state["batches"] == 5
    nxt = _batches(whole)
    resumed = ResumableLoader(_Noisy(), batch_size=4, seed=0)
    resumed.load_state_dict(state)
    set_rng_states(rng)
    assert _same(_batches(resumed), nxt)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    from tasks.runtime.resume import collect_rng_states, set_rng_states

    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    torch.save({"rng": collect_rng_states()}, tmp_path / "c.ckpt")
    expected = (torch.rand(4), np.random.rand(3), random.random())
    set_rng_states(torch.load(tmp_path / "c.ckpt", weights_only=True)["rng"])
    got = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_orphan_temp_files_only_ours_are_removed(tmp_path):
    ours = [tmp_path / ".last.ckpt.k2x_9abc.tmp", tmp_path / ".metrics.json.a1b2c3d4.tmp"]
    others = [tmp_path / ".last.ckpt.tmp", tmp_path / "notes.tmp", tmp_path / ".last.ckpt.ABCDEFGH.tmp",
              tmp_path / "last.ckpt", tmp_path / ".last.ckpt.k2x_9abc.tmp.bak"]
    for p in ours + others:
        p.write_bytes(b"x" * 10)
    sub = tmp_path / ".sub.abcdefgh.tmp"  # a folder of that name is not ours
    sub.mkdir()
    assert sorted(remove_orphan_temps(tmp_path)) == sorted(ours)
    assert all(p.exists() for p in others) and sub.is_dir() and not any(p.exists() for p in ours)
    assert remove_orphan_temps(tmp_path / "missing") == []
    with atomic_file(tmp_path / "w.bin", "wb") as f:  # what a killed writer would leave matches the pattern
        f.write(b"abc")
        (temp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".w.bin.")]
        assert TEMP_PATTERN.match(temp.name)
    assert (tmp_path / "w.bin").read_bytes() == b"abc" and not temp.exists()


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        text = atomic_write_text(tmp_path / "metrics.json", "{}")
        with atomic_file(tmp_path / "last.ckpt", "wb") as f:
            f.write(b"\0")
    finally:
        os.umask(old)
    for p in (text, tmp_path / "last.ckpt"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask
