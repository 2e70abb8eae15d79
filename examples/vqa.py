"""Answer a question about images with a model folder, from Python.

    python examples/vqa.py exports/ofa-tiny-multitask "what colour is the circle?" scene1.png scene2.png
    python examples/vqa.py                # no folder: trains a micro VQA model in seconds and asks about Shapes images
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> None:
    import zoo

    with tempfile.TemporaryDirectory() as tmp:
        if argv:
            folder, question, images = argv[0], argv[1], argv[2:]
        else:
            from examples._tiny import tiny_model

            folder, question = tiny_model("vqa_shapes", tmp), "how many shapes are there?"
            images = sorted(str(p) for p in (Path(tmp) / "data" / "images").rglob("*.png"))[:4]
        model = zoo.load(folder)
        for path, answer in zip(images, model.answer(images, question)):
            print(f"{path}: {question} -> {answer}")


if __name__ == "__main__":
    main(sys.argv[1:])
