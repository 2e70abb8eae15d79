"""Sensor-to-text: ``[sensor] what is the wearer doing?`` → a description of the activities."""
from __future__ import annotations

from zoo.task_specs.base import TaskSpec, register_task_spec

#: ``[sensor] what is the wearer doing?`` → activity description
SENSOR_PROMPT = "what is the wearer doing?"

SENSOR_TO_TEXT = register_task_spec(TaskSpec("sensor_to_text", method="describe", prompt=SENSOR_PROMPT))
