"""Caption images with a model folder, from Python.

    python examples/caption.py exports/quickstart photo1.png photo2.jpg
    python examples/caption.py            # no folder: trains a micro model in seconds and captions Shapes images
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str]) -> None:
    import zoo

    with tempfile.TemporaryDirectory() as tmp:
        if argv:
            folder, images = argv[0], argv[1:]
        else:
            from examples._tiny import tiny_model

            folder = tiny_model("caption_shapes", tmp)
            images = sorted(str(p) for p in (Path(tmp) / "data" / "images").rglob("*.png"))[:4]
        model = zoo.load(folder)  # a folder, "hf-hub:org/name" or a registered arch.tag
        for path, text in zip(images, model.caption(images)):
            print(f"{path}: {text}")


if __name__ == "__main__":
    main(sys.argv[1:])
