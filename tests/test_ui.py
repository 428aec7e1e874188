"""The page at /ui: its routes (identity from the manifest, thumbnails only from the index's own
folder, on by default on loopback only, --no-ui) and the page itself in a real headless Chromium
(Debian's chromium + chromium-driver, driven by selenium): upload an image, read each model's
top-k, run a text search on a demo-like index, check the thumbnails.

Expectations come from an Engine and the Index opened in this process."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from clipfold.compile.tiny import data
from clipfold.compile.tiny.samples import write_photos
from clipfold.runtime import Engine
from clipfold.runtime.retrieval.index import Index, build_index

pytest.importorskip("uvicorn")
from clipfold.runtime.serve.app import ClipfoldServer, ServeConfig, open_models, ui_enabled  # noqa: E402

from .live_server import LiveServer  # noqa: E402

SEARCH = "a green triangle"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_text_bundle):
    """A bundle with a text tower and an index of the demo's generated photos (``make demo``), plus
    a file outside the indexed folder that a symlink inside it points to."""
    tmp = tmp_path_factory.mktemp("ui")
    bundle = Path(shutil.copytree(tiny_text_bundle.path, tmp / "tiny.bundle"))  # compiled once per session
    photos = write_photos(tmp, n=40)
    secret = tmp / "secret.png"
    data.generate(1, seed=3)[0].image.save(secret)
    (photos / "zz_link.png").symlink_to(secret)
    build_index(Engine.open(bundle), photos, tmp / "photos.index")
    return tmp, bundle, photos, tmp / "photos.index"


@pytest.fixture(scope="module")
def live(demo):
    _, bundle, _, index = demo
    engines, indexes = open_models([bundle], indexes=[index])
    running = LiveServer(ClipfoldServer(engines, ServeConfig(max_batch=8, max_delay_ms=5), indexes))
    yield running
    running.stop()


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_page_and_its_files_are_served_with_a_strict_policy(live):
    for path, kind in [("/ui", "text/html"), ("/ui/", "text/html"), ("/ui/app.js", "text/javascript"),
                       ("/ui/style.css", "text/css")]:
        status, headers, body = _get(live.url + path)
        assert status == 200 and headers["content-type"].startswith(kind) and body
        assert "script-src 'self'" in headers["content-security-policy"]
    assert _get(live.url + "/ui/index.py")[0] == 404 and _get(live.url + "/ui/../server.py")[0] == 404


def test_the_page_files_ship_in_the_package_and_load_nothing_from_elsewhere():
    from fnmatch import fnmatch

    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "clipfold.runtime.serve"]
    serve = root / "runtime" / "serve"
    files = sorted(p.relative_to(serve).as_posix() for p in (serve / "ui").iterdir())
    assert {"ui/index.html", "ui/app.js", "ui/style.css"} <= set(files)
    assert all(any(fnmatch(f, pattern) for pattern in patterns) for f in files), (files, patterns)
    for f in files:  # no framework, font or script from a CDN: the page works offline
        text = (serve / f).read_text()
        assert "http:" not in text and "https:" not in text and "//cdn" not in text, f


def test_models_show_the_bundle_identity_from_the_manifest(live, demo):
    _, bundle, _, index = demo
    engine = Engine.open(bundle)
    status, _, raw = _get(live.url + "/ui/models")
    (model,) = json.loads(raw)["models"]
    man = engine.manifest
    assert status == 200 and model["name"] == "tiny" and model["model"] == man.model.name == "clipfold-tiny"
    assert model["labels"] == list(engine.labels) and model["max_k"] == 5 and model["text"] is True
    assert model["variant"]["name"] == man.default_variant and model["variant"]["precision"] == engine.variant.precision
    assert model["variant"]["parity"]["top1_agreement"] == engine.variant.parity.top1_agreement
    gate = engine.variant.gate
    assert model["variant"]["gate"] == (None if gate is None else json.loads(json.dumps(dataclasses.asdict(gate))))
    assert model["index"] == {"images": len(Index.open(index))}


def test_thumbnails_only_from_the_index_folder(live, demo):
    tmp, _, photos, index = demo
    listed = sorted(Index.open(index).meta["files"])
    assert "zz_link.png" in listed  # indexed through the symlink, yet outside the folder
    status, headers, body = _get(f"{live.url}/ui/thumb/tiny?id={urllib.request.quote(listed[0])}")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(body))
    original = Image.open(photos / listed[0])
    assert thumb.format == "JPEG" and max(thumb.size) <= 256 and thumb.size[0] / thumb.size[1] == pytest.approx(
        original.size[0] / original.size[1], rel=0.05)
    outside = ["zz_link.png", "../secret.png", str(tmp / "secret.png"), "%2e%2e/secret.png", "../tiny.bundle/manifest.json",
               "", "photos/" + listed[0], listed[0] + "/..", "/etc/passwd", "..%2fsecret.png"]
    for rel in outside:
        status, _, body = _get(f"{live.url}/ui/thumb/tiny?id={urllib.request.quote(rel, safe='%')}")
        assert status == 404 and "error" in json.loads(body), rel
    assert _get(f"{live.url}/ui/thumb/tiny")[0] == 404  # no id
    assert _get(f"{live.url}/ui/thumb/nope?id={listed[0]}")[0] == 404
    assert _get(f"{live.url}/ui/thumb/..%2f..%2fetc?id={listed[0]}")[0] == 404


def test_page_is_on_by_default_only_on_loopback_and_off_with_no_ui(demo):
    assert ui_enabled(ServeConfig()) and ui_enabled(ServeConfig(host="localhost"))
    assert not ui_enabled(ServeConfig(host="0.0.0.0")) and ui_enabled(ServeConfig(host="0.0.0.0", ui=True))
    assert not ui_enabled(ServeConfig(ui=False))
    _, bundle, _, index = demo
    engines, indexes = open_models([bundle], indexes=[index])
    off = LiveServer(ClipfoldServer(engines, ServeConfig(ui=False), indexes))
    try:
        assert _get(off.url + "/ui")[0] == 404 and _get(off.url + "/ui/thumb/tiny?id=x")[0] == 404
        assert _get(off.url + "/v2/health/live")[0] == 200
    finally:
        off.stop()


# --- in a real browser ------------------------------------------------------------------------
def _browser() -> tuple[str, str] | None:
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    found = _browser()
    if found is None:
        pytest.skip("no headless Chromium here: apt-get install -y chromium chromium-driver (make test does it as root)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1500", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = driver.execute_script("return document.body.innerText")[:2000]
            raise AssertionError(f"timed out waiting for {what}; the page shows: {logs}")
        time.sleep(0.1)


def test_page_in_headless_chromium_classifies_an_upload_and_searches_the_index(live, demo, browser, tmp_path):
    from selenium.webdriver.common.by import By

    _, bundle, photos, index = demo
    engine = Engine.open(bundle)
    upload = tmp_path / "upload.png"
    data.generate(1, seed=77)[0].image.save(upload)
    want = engine.classify([upload], k=5)[0]
    hits = Index.open(index).search(engine, text=SEARCH, k=12).hits

    driver = browser
    driver.get(live.url + "/ui")
    _wait(driver, lambda: driver.execute_script("return document.body.dataset.ready === 'true'"), "the model list")
    card = driver.find_element(By.CSS_SELECTOR, ".bundle[data-model='tiny']")
    fields = {e.get_attribute("data-field"): e.text for e in card.find_elements(By.CSS_SELECTOR, "dd")}
    assert fields["model"].startswith("clipfold-tiny") and fields["labels"].startswith(f"{len(engine.labels)}: red circle")
    assert fields["variant"].startswith(engine.variant.name) and "top-1" in fields["parity"]
    assert fields["index"] == f"{len(Index.open(index))} images"

    driver.find_element(By.ID, "file-input").send_keys(str(upload))
    rows = _wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, ".model-result[data-model='tiny'] .prediction"),
                 "the predictions")
    assert [r.find_element(By.CLASS_NAME, "label").text for r in rows] == [p.label for p in want]
    assert [float(r.find_element(By.CLASS_NAME, "score").text) for r in rows] == \
        pytest.approx([p.score for p in want], abs=6e-4)  # shown with 3 decimals
    widths = [driver.execute_script("return arguments[0].querySelector('.bar span').style.width", r) for r in rows]
    assert [float(w.rstrip("%")) for w in widths] == pytest.approx([100 * p.score for p in want], abs=1e-3)
    assert driver.execute_script("return document.querySelector('.result > img').naturalWidth") > 0

    box = driver.find_element(By.ID, "search-text")
    box.send_keys(SEARCH)
    driver.find_element(By.ID, "search-button").click()
    figures = _wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#hits .hit"), "the search results")
    assert [f.get_attribute("data-id") for f in figures] == [h.path for h in hits]
    assert [float(f.find_element(By.CLASS_NAME, "score").text) for f in figures] == \
        pytest.approx([h.score for h in hits], abs=6e-4)
    _wait(driver, lambda: driver.execute_script(
        "return [...document.querySelectorAll('#hits img')].every(i => i.complete && (i.naturalWidth > 0 "
        "|| i.alt === 'zz_link.png'))"),
        "every thumbnail to load")
    assert all("green" in h.path or "triangle" in h.path for h in hits[:3])  # the tiny model knows its shapes

    # a query image dropped on the search (here: picked): the photo itself comes first
    query = photos / hits[-1].path
    by_image = Index.open(index).search(engine, image=query, k=12).hits
    driver.find_element(By.ID, "search-image").send_keys(str(query))
    _wait(driver, lambda: driver.execute_script(
        "const f = document.querySelector('#hits .hit'); return f && f.dataset.id === arguments[0]", hits[-1].path),
        "the image search results")
    figures = driver.find_elements(By.CSS_SELECTOR, "#hits .hit")
    assert [f.get_attribute("data-id") for f in figures] == [h.path for h in by_image]
    assert float(figures[0].find_element(By.CLASS_NAME, "score").text) == pytest.approx(by_image[0].score, abs=6e-4)

    box.clear()  # back to the text search for the screenshot
    box.send_keys(SEARCH)
    driver.find_element(By.ID, "search-button").click()
    _wait(driver, lambda: driver.execute_script(
        "const f = document.querySelector('#hits .hit'); return f && f.dataset.id === arguments[0]", hits[0].path),
        "the text search results again")
    _wait(driver, lambda: driver.execute_script(
        "return [...document.querySelectorAll('#hits img')].every(i => i.complete && (i.naturalWidth > 0 "
        "|| i.alt === 'zz_link.png'))"),
        "every thumbnail to load")

    shot = tmp_path / "ui.png"
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1280, min(max(height + 200, 900), 2600))  # the whole page (the window has a frame)
    assert driver.save_screenshot(str(shot)) and Image.open(shot).size[0] >= 1000
    if os.environ.get("CLIPFOLD_SCREENSHOT_DIR"):  # make screenshot: the README's copy
        target = Path(os.environ["CLIPFOLD_SCREENSHOT_DIR"]) / "ui.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
