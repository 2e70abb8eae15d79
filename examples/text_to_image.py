"""Generate images from text with a model folder (one holding a VQ image tokenizer), from Python.

    python examples/text_to_image.py exports/ofa-tiny-multitask "a small red circle" out/
    python examples/text_to_image.py      # no folder: trains a micro model in seconds (it draws noise)
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> None:
    import zoo

    out = Path(argv[2] if len(argv) > 2 else "generated")
    with tempfile.TemporaryDirectory() as tmp:
        if argv:
            folder, prompt = argv[0], argv[1]
        else:
            from examples._tiny import tiny_model

            folder, prompt = tiny_model("t2i_shapes", tmp), "a large blue square"
        model = zoo.load(folder)
        images = model.generate_image([prompt, prompt], seed=0)  # PIL images
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            img.save(out / f"{i}.png")
            print(f"{prompt!r} -> {out / f'{i}.png'} ({img.size[0]}x{img.size[1]})")


if __name__ == "__main__":
    main(sys.argv[1:])
