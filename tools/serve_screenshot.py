"""The web page of `resnetlab serve` as a person sees it (docs/serving-page.png).

Serves a trained run, opens the page in Debian's headless chromium (the browser test's
set-up), uploads Fashion-MNIST test images and saves a screenshot.

    .venv/bin/python tools/serve_screenshot.py RUN [--out docs/serving-page.png] [--images 3]
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_images(folder: Path, n: int) -> list[Path]:
    data = gzip.decompress((FASHION / "t10k-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
    paths = []
    for i in range(n):
        paths.append(folder / f"test-{i}.png")
        Image.fromarray(images[i]).resize((112, 112), Image.NEAREST).save(paths[-1])
    return paths


def main() -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    from tests.test_serve import chrome, serving

    from resnetlab.serve import ServedModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--out", default=str(ROOT / "docs" / "serving-page.png"))
    ap.add_argument("--images", type=int, default=3)
    args = ap.parse_args()
    model = ServedModel(Path(args.run).name, args.run, "torch", "fp32")
    with tempfile.TemporaryDirectory() as tmp, serving([model]) as addr:
        driver = chrome(1280, 1000)
        try:
            driver.get(f"http://{addr}/")
            wait = WebDriverWait(driver, 60)
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "ready"))
            for i, path in enumerate(test_images(Path(tmp), args.images), 1):
                driver.find_element(By.ID, "files").send_keys(str(path))
                wait.until(lambda d, i=i: len(d.find_elements(By.CSS_SELECTOR, ".row.top"))
                           >= 5 * i)
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1280, max(1000, int(height) + 160))
            time.sleep(0.5)  # the resized page's layout
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    print(args.out)


if __name__ == "__main__":
    main()
