"""zoo-serve end to end: a real server in a subprocess on a free loopback port, serving a tiny model with all four
tasks; every endpoint, dynamic batching, bad requests, graceful shutdown and the web page in headless Chromium."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from modalities.image_codes import ImageCodeTokenizer, VQConfig
from modalities.sensor_io import write_csv
from modalities.text import TextTokenizer
from zoo.pretrained import Pretrained

requests = pytest.importorskip("requests")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a small red circle", "the wearer walks then sits", "what colour is the square?"] * 20
CHANNELS = ["acc_x", "acc_y", "acc_z"]
# Runs zoo-serve's main() after one test-only change: a batch with num_beams=7 raises inside the model, so that the
# test can check that a model failure gives a 500 and the server keeps serving. Everything else is the real server.
LAUNCHER = """
import sys
from zoo.serve.runner import ModelRunner
real = ModelRunner.run
def run(self, task, options, ready):
    if options.get("num_beams") == 7:
        raise RuntimeError("injected model failure (test)")
    return real(self, task, options, ready)
ModelRunner.run = run
from zoo.serve.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A test-tiny model with image, sensor and image-code (text-to-image) modalities: all four tasks."""
    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    sensor = {"channels": CHANNELS, "sample_rate": 50.0, "patch_len": 10, "patch_stride": 10,
              "max_len": 200, "mean": [0.0, 0.0, 9.8], "std": [1.0, 1.0, 1.0]}
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4},
                             modalities={"sensor": sensor}, max_positions=80)
    with torch.no_grad():  # large random weights: outputs that depend on the input, greedy choices far from ties
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.5)
    vq = ImageCodeTokenizer.from_config(VQConfig(channels=[8, 8, 8, 8], num_codes=12, latent_channels=4,
                                                 norm_num_groups=4)).eval()
    tasks = {"caption": {"max_new_tokens": 6}, "vqa": {"max_new_tokens": 4}, "sensor_to_text": {"max_new_tokens": 5},
             "text_to_image": {"guidance_scale": 2.0, "seed": 0}}
    return Pretrained(model, tok, tasks=tasks, image_tokenizer=vq).save_pretrained(
        tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def bundle(model_dir):
    torch.set_num_threads(1)
    return zoo.load(model_dir)


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    colours = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
               (128, 128, 128)]
    return [_png(np.full((40 + 4 * i, 48, 3), c, np.uint8)) for i, c in enumerate(colours)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, *extra: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", LAUNCHER, f"pretrained={model_dir}", f"port={port}", "threads=1",
           "max_batch_size=8", "batch_timeout_ms=300", "preprocess_workers=1", "max_upload_mb=2",
           "log_level=warning", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zoo-serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"zoo-serve did not come up in 180 s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc, url = start_server(model_dir, log=tmp_path_factory.mktemp("log") / "server.log")
    yield url
    assert stop_server(proc) == 0


def _caption(url: str, img: bytes, **form) -> requests.Response:
    return requests.post(url + "/caption", files={"image": ("x.png", img, "image/png")}, data=form, timeout=60)


def _batches(url: str) -> dict[str, int]:
    return requests.get(url + "/metrics", timeout=10).json()["batch_sizes"]


def _new_batches(before: dict[str, int], after: dict[str, int]) -> dict[int, int]:
    return {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


# ------------------------------------------------------------------------------------------------
def test_health_docs_and_page(server):
    h = requests.get(server + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["tasks"] == ["caption", "vqa", "text_to_image", "sensor_to_text"]
    spec = requests.get(server + "/openapi.json", timeout=10).json()
    assert {"/caption", "/vqa", "/text_to_image", "/sensor_to_text", "/health", "/metrics"} <= set(spec["paths"])
    assert "question" in json.dumps(spec["paths"]["/vqa"]) and "image/png" in json.dumps(spec["paths"]["/text_to_image"])
    assert requests.get(server + "/docs", timeout=10).status_code == 200
    page = requests.get(server + "/", timeout=10)
    assert page.status_code == 200 and "zoo-serve" in page.text and 'id="task"' in page.text


def test_each_task_equals_the_python_api(server, bundle, images, tmp_path):
    for img in images[:3]:
        r = _caption(server, img)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["caption"] == bundle.caption(img) and body["caption"]
        assert body["timings"]["model_ms"] > 0 and body["timings"]["total_ms"] >= body["timings"]["model_ms"]
    q = "what colour is the square?"
    r = requests.post(server + "/vqa", files={"image": ("x.png", images[1], "image/png")}, data={"question": q},
                      timeout=60)
    assert r.status_code == 200 and r.json() == {**r.json(), "question": q, "answer": bundle.answer(images[1], q)}
    # sensor: a CSV with timestamps at 25 Hz (resampled to 50 Hz) and an NPZ
    rng = np.random.default_rng(1)
    csv = write_csv(tmp_path / "rec.csv", rng.normal(size=(3, 60)), CHANNELS, np.arange(60) / 25.0)
    npz = tmp_path / "rec.npz"
    np.savez(npz, values=rng.normal(size=(3, 90)).astype(np.float32), channels=np.array(CHANNELS))
    for path in (csv, npz):
        r = requests.post(server + "/sensor_to_text", files={"file": (path.name, path.read_bytes())}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["description"] == bundle.describe(str(path))
    # text to image: a PNG equal to the Python API's image for the same seed
    r = requests.post(server + "/text_to_image", json={"text": "a small red circle", "seed": 3}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    got = np.asarray(Image.open(io.BytesIO(r.content)))
    ref = np.asarray(bundle.generate_image("a small red circle", seed=3))
    assert got.shape == ref.shape == (bundle.image_tokenizer.image_size,) * 2 + (3,) and np.array_equal(got, ref)
    assert json.loads(r.headers["X-Timings"])["model_ms"] > 0


def test_concurrent_requests_share_one_batch_with_their_own_answers(server, bundle, images):
    before = _batches(server)
    results: dict[int, requests.Response] = {}

    def go(i: int) -> None:
        results[i] = _caption(server, images[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values())
    assert _new_batches(before, _batches(server)) == {8: 1}  # eight clients, one batch
    assert all(r.json()["timings"]["batch_size"] == 8 for r in results.values())
    expected = [bundle.caption(img) for img in images]  # one image at a time through the Python API
    assert [results[i].json()["caption"] for i in range(8)] == expected
    assert len(set(expected)) > 1  # the test tells images apart


def test_different_generation_options_are_not_batched_together(server, bundle, images):
    before = _batches(server)
    results: dict[int, requests.Response] = {}

    def go(i: int) -> None:
        results[i] = _caption(server, images[i], **({"max_new_tokens": 2} if i % 2 else {}))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _new_batches(before, _batches(server)) == {4: 2}
    for i in range(8):
        assert results[i].json()["caption"] == bundle.caption(images[i], max_new_tokens=2 if i % 2 else None)
    assert all(len(results[i].json()["caption"].split()) <= 2 for i in range(1, 8, 2))


def _bad_requests(images: list[bytes], tmp_path: Path) -> list[tuple[str, str, dict, int, str]]:
    """(case, path, requests kwargs, expected status, expected text in the error)."""
    png = images[0]
    huge = _png(np.zeros((12000, 12000, 3), np.uint8))  # small file (zeros compress), 144 MP once decoded
    rng = np.random.default_rng(2)
    bad_csv = write_csv(tmp_path / "two_channels.csv", rng.normal(size=(2, 50)), CHANNELS[:2], np.arange(50) / 50)
    img = lambda data: {"files": {"image": ("x.png", data, "image/png")}}  # noqa: E731
    return [
        ("not an image", "/caption", img(b"hello, I am text"), 400, "not an image"),
        ("truncated image", "/caption", img(png[: len(png) // 2]), 400, "truncated or corrupt"),
        ("12000x12000 image", "/caption", img(huge), 413, "12000x12000 pixels is over the server's limit"),
        ("upload over max_upload_mb", "/caption", img(b"\0" * (3 << 20)), 413, "over the server's limit"),
        ("missing image field", "/caption", {"data": {"max_new_tokens": 3}}, 422, "missing field 'image'"),
        ("missing question field", "/vqa", img(png), 422, "missing field 'question'"),
        ("missing text field", "/text_to_image", {"json": {"seed": 1}}, 422, "missing field 'text'"),
        ("unknown task", "/translate", img(png), 404, "unknown task 'translate'"),
        ("over-long question", "/vqa", {**img(png), "data": {"question": "why " * 100}}, 422,
         "question: String should have at most 300 characters"),
        ("question over the model's token limit", "/vqa", {**img(png), "data": {"question": "zq9 " * 70}}, 422,
         "tokens is over the model's limit of 80 tokens"),
        ("max_new_tokens over the model's limit", "/caption", {**img(png), "data": {"max_new_tokens": 1000}}, 422,
         "max_new_tokens: 1000 is outside 1..80"),
        ("sensor CSV with a missing channel", "/sensor_to_text",
         {"files": {"file": ("two_channels.csv", bad_csv.read_bytes())}}, 422,
         "two_channels.csv: missing channel column(s) ['acc_z']"),
        ("sensor file of an unknown type", "/sensor_to_text", {"files": {"file": ("rec.xlsx", b"PK")}}, 415,
         "not a sensor recording"),
        ("failure inside the model", "/caption", {**img(png), "data": {"num_beams": 7}}, 500,
         "the model failed on a batch of 1 caption request(s): RuntimeError: injected model failure"),
    ]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, images, tmp_path, capsys):
    rows = ["| case | status | message | server still up |", "|---|---|---|---|"]
    for case, path, kwargs, status, text in _bad_requests(images, tmp_path):
        r = requests.post(server + path, timeout=60, **kwargs)
        assert r.status_code == status, (case, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        message = r.json()["error"]
        assert text in message, (case, message)
        up = _caption(server, images[1]).status_code == 200  # a good request right after: still serving
        assert up, case
        rows.append(f"| {case} | {status} | {message[:160]} | {'yes' if up else 'NO'} |")
    m = requests.get(server + "/metrics", timeout=10).json()
    assert m["requests"]["caption"]["500"] >= 1 and m["requests"]["caption"]["413"] >= 2
    with capsys.disabled():
        print("\n" + "\n".join(rows))


def test_graceful_shutdown_finishes_in_flight_requests(model_dir, images, tmp_path):
    proc, url = start_server(model_dir, "batch_timeout_ms=1500", log=tmp_path / "server.log")
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("r", _caption(url, images[0])))
    t.start()
    time.sleep(0.6)  # the request now waits in the batcher (1.5 s batch timeout)
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert proc.wait(60) == 0
    assert results["r"].status_code == 200 and results["r"].json()["caption"]
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=2)


# ------------------------------------------------------------------------------------------------
def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install chromium "
                                                "chromium-driver; .ci/run does this)")
def test_web_page_in_headless_chromium(server, bundle, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser, driver_path = _chromium()
    photo = tmp_path / "photo.png"
    try:
        from skimage import data
        Image.fromarray(data.astronaut()).save(photo)
    except ImportError:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(photo)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--window-size=900,800"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=opts)
    try:
        drv.get(server + "/")
        wait = WebDriverWait(drv, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        Select(drv.find_element(By.ID, "task")).select_by_value("caption")
        drv.find_element(By.ID, "file").send_keys(str(photo))
        drv.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "result").text.strip())
        assert drv.find_element(By.ID, "result").text == bundle.caption(str(photo))
        assert "model" in drv.find_element(By.ID, "timings").text and "ms" in drv.find_element(By.ID, "timings").text
        assert drv.execute_script("return document.getElementById('preview').naturalWidth") == \
            Image.open(photo).width  # the uploaded photo is shown
        shot = tmp_path / "page.png"
        drv.save_screenshot(str(shot))
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        assert pixels.shape[0] > 300 and pixels.std() > 10  # a rendered page, not a blank one
        if os.environ.get("ZOO_SERVE_SCREENSHOT"):
            shutil.copy(shot, os.environ["ZOO_SERVE_SCREENSHOT"])
        # text to image in the page: the generated PNG renders
        Select(drv.find_element(By.ID, "task")).select_by_value("text_to_image")
        drv.find_element(By.ID, "prompt").send_keys("a small red circle")
        drv.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.execute_script("const i = document.getElementById('output-image');"
                                              "return !i.classList.contains('hidden') && i.naturalWidth > 0"))
        # a bad upload shows the server's error
        Select(drv.find_element(By.ID, "task")).select_by_value("caption")
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        drv.find_element(By.ID, "file").send_keys(str(bad))
        drv.find_element(By.ID, "submit").click()
        wait.until(lambda d: "error 400" in d.find_element(By.ID, "result").text)
    finally:
        drv.quit()


def test_generate_text_from_preprocessed_inputs_equals_the_task_methods(model_dir, bundle, images, tmp_path):
    """The hook the server's model thread calls, in process: worker-side preprocessing + one batched call."""
    from zoo.serve.app import ServeSettings, prep_spec
    from zoo.serve.preprocess import Preprocessor

    pre = Preprocessor(prep_spec(bundle, ServeSettings()))
    ready = [pre.prepare("caption", {"image": img}) for img in images]
    pixels = torch.from_numpy(np.stack([r["pixels"] for r in ready]))
    assert bundle.generate_text_from("caption", [r["text_ids"] for r in ready], pixels=pixels) == bundle.caption(images)
    qs = ["what colour is the square?", "a small red circle"] * 4
    ready = [pre.prepare("vqa", {"image": img, "question": q}) for img, q in zip(images, qs)]
    pixels = torch.from_numpy(np.stack([r["pixels"] for r in ready]))
    assert bundle.generate_text_from("vqa", [r["text_ids"] for r in ready], pixels=pixels, max_new_tokens=3) == \
        bundle.answer(images, qs, max_new_tokens=3)
    path = write_csv(tmp_path / "r.csv", np.random.default_rng(3).normal(size=(3, 70)), CHANNELS, np.arange(70) / 50)
    r = pre.prepare("sensor_to_text", {"file": path.read_bytes(), "filename": "r.csv"})
    sensor = (torch.from_numpy(r["values"])[None], torch.from_numpy(r["valid"])[None])
    assert bundle.generate_text_from("sensor_to_text", [r["text_ids"]], sensor=sensor) == [bundle.describe(str(path))]
