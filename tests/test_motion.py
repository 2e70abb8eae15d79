"""Motion generator (determinism, layout, descriptions) and the sensor file readers."""
import json

import numpy as np
import pytest

from modalities.sensor import IMU_CHANNELS, SensorDataError
from tasks.data.motion import ACTIVITIES, MotionConfig, ensure_motion, generate_recording
from tasks.data.sensor_formats import read_csv, read_manifest, read_npy, read_npz, read_recording, write_csv
from tasks.sensor_to_text import parse_activities

SMALL = dict(n_train=24, n_val=6, n_test=6)


@pytest.fixture(scope="module")
def motion_csv(tmp_path_factory):
    return ensure_motion(tmp_path_factory.mktemp("m") / "motion", MotionConfig(**SMALL))


def test_generator_is_deterministic_and_independent_of_split_sizes():
    a = generate_recording(MotionConfig(seed=3), 0, 7)
    b = generate_recording(MotionConfig(seed=3, n_train=5), 0, 7)
    c = generate_recording(MotionConfig(seed=4), 0, 7)
    assert np.array_equal(a["values"], b["values"]) and a["descriptions"] == b["descriptions"]
    assert not np.array_equal(a["values"][:, :100], c["values"][:, :100])


def test_recordings_look_like_imu_data():
    cfg = MotionConfig()
    seen = set()
    for i in range(40):
        r = generate_recording(cfg, 0, i)
        v = r["values"]
        assert v.shape[0] == 6 and 8 * 50 <= v.shape[1] <= 12 * 50 and np.isfinite(v).all()
        assert 6 < np.linalg.norm(v[:3], axis=0).mean() < 16  # gravity dominates the accelerometer
        acts = [s["activity"] for s in r["segments"]]
        assert 1 <= len(acts) <= 3 and all(x != y for x, y in zip(acts, acts[1:]))
        assert r["segments"][0]["start"] == 0 and abs(r["segments"][-1]["end"] - v.shape[1] / 50) < 0.02
        assert len(r["descriptions"]) >= 3 and len(set(r["descriptions"])) == len(r["descriptions"])
        seen.update(acts)
    assert seen == set(ACTIVITIES)


def test_parser_recovers_every_reference_of_the_generator():
    cfg = MotionConfig()
    n = 0
    for split in range(3):
        for i in range(150):
            r = generate_recording(cfg, split, i)
            truth = [s["activity"] for s in r["segments"]]
            for d in r["descriptions"]:
                assert parse_activities(d) == truth, (d, truth)
                n += 1
    assert n > 1500


def test_parser_on_free_text():
    assert parse_activities("The person walks up the stairs, then sits.") == ["climbing stairs", "sitting"]
    assert parse_activities("someone jogs and jogs, then lies down") == ["running", "lying"]
    assert parse_activities("a person gets up and stands after lying") == ["standing", "lying"]
    assert parse_activities("nothing to see") == []


def test_ensure_motion_layout_and_reuse(motion_csv):
    marker = json.loads((motion_csv / "motion.json").read_text())
    assert marker["config"]["n_train"] == 24
    recs = read_manifest(motion_csv / "manifest_train.jsonl")
    assert len(recs) == 24 and recs[0].path.suffix == ".csv" and recs[0].activities
    mtime = (motion_csv / "motion.json").stat().st_mtime_ns
    ensure_motion(motion_csv, MotionConfig(**SMALL))  # same config: reused as is
    assert (motion_csv / "motion.json").stat().st_mtime_ns == mtime
    # the CSV holds what the generator made
    rec = read_recording(recs[3].path, IMU_CHANNELS)
    gen = generate_recording(MotionConfig(**SMALL), 0, 3)["values"]
    assert rec.values.shape == gen.shape and np.allclose(rec.values, gen, atol=1e-4)
    assert np.allclose(np.diff(rec.timestamps), 0.02)


def test_npz_format_matches_csv(tmp_path, motion_csv):
    root = ensure_motion(tmp_path / "npz", MotionConfig(**SMALL, format="npz"))
    a = read_manifest(root / "manifest_val.jsonl")
    b = read_manifest(motion_csv / "manifest_val.jsonl")
    assert [r.descriptions for r in a] == [r.descriptions for r in b]
    ra, rb = read_recording(a[0].path, IMU_CHANNELS), read_recording(b[0].path, IMU_CHANNELS)
    assert ra.rate == 50 and list(ra.channels) == list(IMU_CHANNELS)
    assert np.allclose(ra.values, rb.values, atol=1e-4)


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        ensure_motion(tmp_path / "mine", MotionConfig(**SMALL))


# --- readers ------------------------------------------------------------------------------------
def test_csv_shuffled_columns_missing_cells_and_iso_times(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("gyro,extra,time,acc\n0.5,x,2024-01-01T00:00:00.000,1\n,x,2024-01-01T00:00:00.020,nan\n"
                 "0.7,x,2024-01-01T00:00:00.040, 3 \n")
    rec = read_csv(p, ["acc", "gyro"], timestamp_column="time")
    assert rec.values.shape == (2, 3) and rec.values[0, 2] == 3 and np.isnan(rec.values[1, 1])
    assert np.allclose(rec.timestamps, [0, 0.02, 0.04])


def test_csv_time_units_and_no_timestamp(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("ts,a\n0,1\n10,2\n20,3\n")
    assert np.allclose(read_csv(p, ["a"], "ts", time_unit="ms").timestamps, [0, 0.01, 0.02])
    rec = read_recording(p, ["a"], rate=100.0, timestamp_column=None)
    assert rec.timestamps is None and rec.rate == 100.0


@pytest.mark.parametrize("text, match", [
    ("timestamp,a,b\n0,1,2\n0.02,1,oops\n", r"non-numeric value 'oops' in column 'b' at line 3"),
    ("timestamp,a\n0,1\n", r"missing channel column\(s\) \['b'\]"),
    ("a,b\n1,2\n", "no timestamp column 'timestamp'"),
    ("timestamp,a,b\n", "empty recording"),
    ("", "empty file"),
    ("timestamp,a,b\n0,1\n", "line 2 has 2 fields"),
    ("timestamp,a,b\nnoon,1,2\n", "neither numbers nor ISO"),
])
def test_csv_errors_name_the_file(tmp_path, text, match):
    p = tmp_path / "bad_rec.csv"
    p.write_text(text)
    with pytest.raises(SensorDataError, match=match) as e:
        read_csv(p, ["a", "b"])
    assert "bad_rec.csv" in str(e.value)


def test_npz_and_npy_layouts(tmp_path):
    v = np.random.default_rng(0).normal(size=(2, 20))
    np.savez(tmp_path / "per_channel.npz", b=v[1], a=v[0], timestamp=np.arange(20) / 10)
    rec = read_npz(tmp_path / "per_channel.npz", ["a", "b"])
    assert np.array_equal(rec.values, v) and np.allclose(rec.timestamps[-1], 1.9)
    np.savez(tmp_path / "values.npz", values=v[::-1], channels=np.array(["b", "a"]), rate=25.0)
    rec = read_npz(tmp_path / "values.npz", ["a", "b"])
    assert rec.rate == 25.0 and list(rec.channels) == ["b", "a"]
    np.save(tmp_path / "x.npy", v)
    assert read_npy(tmp_path / "x.npy", rate=10.0).values.shape == (2, 20)
    np.savez(tmp_path / "strings.npz", values=np.array([["a", "b"]]))
    with pytest.raises(SensorDataError, match="strings.npz: non-numeric"):
        read_npz(tmp_path / "strings.npz", ["a", "b"])
    with pytest.raises(SensorDataError, match="unsupported recording format"):
        (tmp_path / "x.wav").write_bytes(b"")
        read_recording(tmp_path / "x.wav", ["a"])


def test_manifest_errors_name_the_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"file": "a.csv", "description": "someone walks"}\n{"file": "b.csv"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: no 'descriptions'"):
        read_manifest(m)
    m.write_text('{"file": "a.csv", "descriptions": ["x"]}\nnot json\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: invalid JSON"):
        read_manifest(m)
    m.write_text('{"file": "a.csv", "description": "someone walks", "activities": ["walking"], "rate": 25}\n')
    (r,) = read_manifest(m)
    assert r.id == "a" and r.descriptions == ["someone walks"] and r.activities == ["walking"] and r.rate == 25.0


def test_write_csv_round_trip(tmp_path):
    v = np.random.default_rng(1).normal(size=(6, 30)).astype(np.float32)
    write_csv(tmp_path / "w.csv", v, IMU_CHANNELS, np.arange(30) / 50)
    rec = read_csv(tmp_path / "w.csv", list(IMU_CHANNELS)[::-1])
    assert np.allclose(rec.values, v[::-1], atol=1e-4)
