"""A model folder saved by mmzoo before the modality registry (tests/fixtures/old_model_v1, written by
make_old_model_v1.py) still loads, with the same 4-row modality-type table and identical outputs."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from modalities.sensor import SensorRecording, pad_sensor_batch
from zoo.pretrained import Pretrained

FIXTURE = Path(__file__).parent / "fixtures" / "old_model_v1"


def test_old_model_loads_with_identical_outputs():
    bundle = Pretrained.from_folder(FIXTURE / "model")
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    assert bundle.model.type_embed.weight.shape[0] == 4  # text, image, image_codes, sensor
    recs = [SensorRecording(values=ref[f"sensor_raw_{i}"].numpy()) for i in range(2)]
    values, valid = pad_sensor_batch([bundle.preprocessor("sensor")(r) for r in recs])
    assert torch.equal(values, ref["sensor_values"]) and torch.equal(valid, ref["sensor_valid"])
    text = (ref["text_ids"], ref["text_mask"])
    with torch.no_grad():
        logits_image = bundle.model({"image": ref["pixels"], "text": text}, ref["tgt_in"])
        logits_sensor = bundle.model({"sensor": (values, valid), "text": text}, ref["tgt_in"])
    assert torch.equal(logits_image, ref["logits_image"])
    assert torch.equal(logits_sensor, ref["logits_sensor"])
    expected = json.loads((FIXTURE / "reference.json").read_text())
    assert bundle.caption(list(ref["pixels"])) == expected["captions"]
    assert bundle.describe([r.values for r in recs]) == expected["descriptions"]
