"""Describe IMU recordings (.csv / .tsv / .npz / .npy) with a model folder, from Python.

    python examples/sensor_to_text.py exports/ofa-tiny-multitask walk.csv run.npz
    python examples/sensor_to_text.py     # no folder: trains a micro model in seconds on generated Motion data
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> None:
    import zoo

    with tempfile.TemporaryDirectory() as tmp:
        if argv:
            folder, files = argv[0], argv[1:]
        else:
            from examples._tiny import tiny_model

            folder = tiny_model("sensor_motion", tmp)
            files = sorted(str(p) for p in (Path(tmp) / "data").rglob("*")
                           if p.suffix in (".csv", ".npz") and "test" in p.as_posix())[:3]
        model = zoo.load(folder)
        for path, text in zip(files, model.describe(files)):
            print(f"{path}: {text}")


if __name__ == "__main__":
    main(sys.argv[1:])
