"""Task registry: task name → its LightningModule, its datamodule and its default data config.

``zoo-eval`` rebuilds a task from the name stored in a checkpoint (``checkpoint["mmzoo"]["task"]``).
Classes are named by import path and imported on use, so looking a task up stays cheap.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

__all__ = ["TaskEntry", "register_task", "get_task", "list_tasks", "init_params", "default_data_config"]


@dataclass(frozen=True)
class TaskEntry:
    """Where a task's classes live (``module:Class``) and the data config it evaluates on by default."""

    name: str
    task: str
    datamodule: str
    data_config: str

    @staticmethod
    def _load(path: str) -> Any:
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def task_class(self) -> type:
        return self._load(self.task)


_TASKS: dict[str, TaskEntry] = {}


def register_task(name: str, task: str, datamodule: str, data_config: str) -> None:
    """Register a task by name (``task``/``datamodule`` as ``module:Class``; ``data_config`` a
    ``configs/data`` file name)."""
    if name in _TASKS and _TASKS[name] != TaskEntry(name, task, datamodule, data_config):
        raise ValueError(f"task {name!r} is already registered")
    _TASKS[name] = TaskEntry(name, task, datamodule, data_config)


def get_task(name: str) -> TaskEntry:
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(list_tasks())}")
    return _TASKS[name]


def list_tasks() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_TASKS)


def init_params(cls: type) -> set[str]:
    """Keyword parameters accepted along the class's ``__init__`` chain."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {p.name for p in inspect.signature(init).parameters.values()
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self", "model", "tokenizer"}


def default_data_config(name: str) -> Any:
    """The task's default ``configs/data/<name>.yaml``."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    return OmegaConf.load(str(files("configs") / "data" / f"{name}.yaml"))


#: text-to-image routes (``task.decoder``): name → (task class, datamodule class), ``module:Class``
_T2I_DECODERS: dict[str, tuple[str, str]] = {}


def register_t2i_decoder(name: str, task: str, datamodule: str) -> None:
    """Register a text-to-image route selectable as ``task.decoder=<name>``."""
    _T2I_DECODERS[name] = (task, datamodule)


def task_class_for(name: str, settings: dict[str, Any] | None = None) -> type:
    """A registered task's class for its settings: text-to-image's ``decoder`` picks its route's class."""
    decoder = (settings or {}).get("decoder")
    if name == "text_to_image" and decoder is not None:
        if decoder not in _T2I_DECODERS:
            raise ValueError(f"unknown task.decoder={decoder!r}; registered: {', '.join(sorted(_T2I_DECODERS))}")
        return TaskEntry._load(_T2I_DECODERS[decoder][0])
    return get_task(name).task_class()


def t2i_target(part: str, decoder: str) -> str:
    """The Hydra ``_target_`` (dotted path) of a text-to-image route's ``task`` or ``data`` class."""
    if decoder not in _T2I_DECODERS:
        raise ValueError(f"unknown task.decoder={decoder!r}; registered: {', '.join(sorted(_T2I_DECODERS))}")
    if part not in ("task", "data"):
        raise ValueError(f"t2i_target part must be 'task' or 'data', got {part!r}")
    return _T2I_DECODERS[decoder][0 if part == "task" else 1].replace(":", ".")


register_task("caption", "tasks.caption:CaptionTask", "tasks.caption:CaptionDataModule", "shapes_captions")
register_task("vqa", "tasks.vqa:VQATask", "tasks.vqa:VQADataModule", "shapes_vqa")
register_task("text_to_image", "tasks.text_to_image:TextToImageTask", "tasks.text_to_image:T2IDataModule", "shapes_t2i")
register_task("multitask", "tasks.multitask:MultitaskTask", "tasks.multitask:MultitaskDataModule", "multitask")
register_task("sensor_to_text", "tasks.sensor_to_text:SensorToTextTask", "tasks.sensor_to_text:SensorTextDataModule", "motion")
register_task("florence2", "tasks.florence2:Florence2Task", "tasks.florence2:Florence2DataModule", "florence2_od_shapes")
register_t2i_decoder("codes", "tasks.text_to_image:TextToImageTask", "tasks.text_to_image:T2IDataModule")
register_t2i_decoder("layout", "tasks.layout_t2i:LayoutTextToImageTask", "tasks.layout_t2i:LayoutT2IDataModule")
