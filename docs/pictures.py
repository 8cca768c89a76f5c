"""The pictures of the docs site, made by embedder itself: `make docs-pictures` (never pasted by hand).

    docs/images/search-page.png     the search page after dropping a photo (headless Chromium)
    docs/images/map-page.png        the /map page of the same index
    docs/images/neighbour-grid.png  `embedder search --grid` of three photos
    docs/images/confusion-matrix.png  `embedder probe` on 600 digits

Needs Debian's chromium (`make browser`) and the shipped data (written into DATA_DIR, default data/).
"""

import contextlib
import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from embedder.cli.main import main
from embedder.data.samples import make_samples

IMAGES = Path(__file__).parent / "images"
CHROMIUM = "/usr/bin/chromium"


def run(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(list(argv)) == 0, argv


def served(index: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "embedder", "serve", str(index), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return server, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the service did not start")


def screenshot(index: Path, path: str, name: str, action=None) -> None:
    from playwright.sync_api import sync_playwright

    server, url = served(index)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url + path)
            if action:
                action(page)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(IMAGES / name))
            browser.close()
    finally:
        server.terminate()
        server.wait(30)


data = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
samples = make_samples(data, only=["photos", "digits"])
out = data / "pictures"
shutil.rmtree(out, ignore_errors=True)
IMAGES.mkdir(exist_ok=True)
photos = samples["photos"]
run("embed", str(photos), "--model", "efficientnet_lite0", "--out", str(out / "photos.h5"), "--quiet")
run("index", str(out / "photos.h5"), "--out", str(out / "photos.index"), "--quiet")
queries = [str(photos / name) for name in ("chelsea.jpg", "rocket.jpg", "coffee.jpg")]
run("search", str(out / "photos.index"), "--image", *queries, "-k", "4", "--grid", str(IMAGES / "neighbour-grid.png"),
    "--overwrite")
digits = out / "digits600"
for d in sorted(p for p in samples["digits"].iterdir() if p.is_dir()):
    (digits / d.name).mkdir(parents=True)
    for f in sorted(d.glob("*.png"))[:60]:
        shutil.copy(f, digits / d.name / f.name)
run("embed", str(digits), "--model", "efficientnet_lite0", "--image-size", "64", "--out", str(out / "digits.h5"),
    "--quiet")
run("probe", str(out / "digits.h5"), "--out", str(out / "digits.probe"), "--quiet")
shutil.copy(out / "digits.probe" / "confusion_matrix.png", IMAGES / "confusion-matrix.png")
run("index", str(out / "digits.h5"), "--out", str(out / "digits.index"), "--quiet")
run("map", str(out / "digits.index"), "--method", "umap", "--quiet")


def drop_a_photo(page) -> None:
    from playwright.sync_api import expect

    page.set_input_files("input[type=file]", str(photos / "chelsea.jpg"))
    expect(page.locator("#results .hit img").first).to_have_js_property("complete", True, timeout=30_000)


screenshot(out / "photos.index", "/", "search-page.png", drop_a_photo)
screenshot(out / "digits.index", "/map", "map-page.png")
print("\n".join(str(p) for p in sorted(IMAGES.glob("*.png"))))
