"""Clean logs: each Lightning message once, no adverts, timm's missing-key list summarised, no false monitor warning."""
import logging
import warnings


def test_one_line_per_message_no_advert_and_missing_keys_summarised(caplog):
    import lightning  # noqa: F401

    from tasks.runtime.logs import tidy_logging

    root = logging.getLogger()
    handler = logging.StreamHandler()  # stands in for Hydra's console handler
    root.addHandler(handler)
    try:
        tidy_logging()
        lg = logging.getLogger("lightning")
        assert not [h for h in lg.handlers if type(h) is logging.StreamHandler] and lg.propagate
        with caplog.at_level(logging.INFO):
            logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: try installing [litlogger](...)")
            logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
            logging.getLogger("timm.models._builder").info(
                "Missing keys (layer4.0.conv1.weight, layer4.0.bn1.weight, fc.weight) discovered while loading "
                "pretrained weights. This is expected if model is being adapted.")
        text = [r.getMessage() for r in caplog.records]
        assert not any("litlogger" in t for t in text) and "GPU available: False, used: False" in text
        summary = [t for t in text if "not in the pretrained file" in t]
        assert summary and summary[0].startswith("3 weights of fc, layer4") and "layer4.0.conv1" not in summary[0]
    finally:
        root.removeHandler(handler)


def test_monitored_checkpoint_waits_quietly_for_its_metric(tmp_path):
    from tasks.runtime.callbacks import MonitoredCheckpoint

    cb = MonitoredCheckpoint(dirpath=tmp_path, monitor="val/cider", mode="max")
    assert cb.state_key.startswith("ModelCheckpoint{")  # old checkpoints resume, zoo-export finds its score
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb._save_topk_checkpoint(None, {"train/loss": 1.0})  # no val/cider yet: no save, no warning
    assert not list(tmp_path.iterdir())
