"""Screenshot of zoo-serve's web page with a captioned photo (for docs/serving.md).

    python -m benchmarks.serve_screenshot [--model-dir <folder>] [--out docs/img/serve_page.png]

Starts ``zoo-serve`` on a free loopback port (default model: the untrained ofa-tiny folder that
``benchmarks.serve_load`` exports), opens ``/`` in headless Chromium (Debian's chromium + chromium-driver, selenium),
uploads scikit-image's astronaut photo for captioning, waits for the caption and saves the page.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.serve_load import ROOT, export_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/zoo-serve-bench/ofa-tiny-untrained"))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "serve_page.png")
    args = p.parse_args()
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from skimage import data

    folder = export_model(args.model_dir)
    tmp = Path(tempfile.mkdtemp())
    photo = tmp / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(photo, quality=90)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "zoo.serve", f"pretrained={folder}", f"port={port}", "threads=1",
                             "log_level=warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium")
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp / 'chromium'}", "--window-size=820,720"):
            opts.add_argument(flag)
        drv = webdriver.Chrome(service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")),
                               options=opts)
        try:
            drv.get(url + "/")
            wait = WebDriverWait(drv, 60)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
            Select(drv.find_element(By.ID, "task")).select_by_value("caption")
            drv.find_element(By.ID, "file").send_keys(str(photo))
            drv.find_element(By.ID, "submit").click()
            wait.until(lambda d: d.find_element(By.ID, "result").text.strip())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            drv.save_screenshot(str(args.out))
            print(f"caption: {drv.find_element(By.ID, 'result').text!r} -> {args.out}")
        finally:
            drv.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
