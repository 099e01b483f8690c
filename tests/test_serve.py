"""tsdsr-serve with the tiny model, as its users meet it: the page in a real browser (Debian's
chromium, driven by Playwright), the ``/super_resolve`` API from ``gradio_client`` (equal to
``tsdsr-infer``; 8 concurrent clients in fewer device calls) and bad uploads. The server runs
from ``.venv-serve`` (Gradio wants Pillow < 13; `make test` builds it); the clients from here."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import processes
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tsdsr_jax.inference import command as infer

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / ".venv-serve" / "bin" / "tsdsr-serve"
CHROMIUM = Path("/usr/bin/chromium")
PHOTO = ROOT / "tests" / "data" / "astronaut.png"  # 128²: one size class, warmed up
MAX_PIXELS = 300 * 300
MAX_BATCH = 4
# as the machine's notes say: no sandbox as root, and none of the calls home that a closed
# network refuses
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def needed(path: Path, what: str) -> None:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: {what}")
        pytest.skip(f"no {path} ({what})")


class Server(NamedTuple):
    url: str
    log: Path

    def calls(self) -> int:
        """The device calls made so far."""
        return self.log.read_text().count("image(s) in one call")

    def client(self, downloads: Path) -> Client:
        return Client(self.url, download_files=str(downloads), verbose=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory, jax_cache):
    needed(SERVE, "`make test` builds .venv-serve")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = processes.start(
        [str(SERVE), "--model", "tiny", "--precision", "fp32", "--port", str(port),
         "--max-batch-size", str(MAX_BATCH), "--warm-up", "128x128",
         "--max-pixels", str(MAX_PIXELS), "--cache-dir", str(jax_cache)], log, jax_cache)
    try:
        processes.wait_for(lambda: "serving on" in log.read_text(), proc, log, timeout=900)
        text = log.read_text()
        folder = Path(text.split("temporary folder ")[1].split()[0])
        assert folder.is_dir()
        yield Server(f"http://127.0.0.1:{port}/", log)
    finally:
        proc.terminate()
        code, text = processes.finish(proc, log, timeout=60)
    assert code == 128 + 15, text[-3000:]
    assert not folder.exists(), "the server left its temporary folder"
    assert "Traceback" not in text, text[-3000:]
    assert not list((ROOT / "tsdsr_jax").rglob("*.pyi")), "Gradio wrote stubs into the package"


def sr_of(path: Path, tmp: Path) -> dict[str, np.ndarray]:
    """What ``tsdsr-infer`` writes for ``path`` (a file or a folder) with the server's options:
    {name: SR}."""
    out = tmp / "infer"
    assert infer.main(["--model", "tiny", "--precision", "fp32", "-i", str(path),
                       "-o", str(out), "--workers", "1", "--cache-dir", str(tmp / "cache")]) == 0
    return {p.name: np.asarray(Image.open(p)) for p in out.glob("*.png")}


def test_api_gives_what_infer_gives(server, tmp_path):
    photo = tmp_path / "photo.png"
    shutil.copy(PHOTO, photo)
    got = server.client(tmp_path / "downloads").predict(handle_file(str(photo)),
                                                        api_name="/super_resolve")
    assert Path(got).name == "photo_x4.png"
    got = np.asarray(Image.open(got))
    assert got.shape == (512, 512, 3)
    np.testing.assert_array_equal(got, sr_of(photo, tmp_path)["photo.png"])


def test_concurrent_requests_share_device_calls(server, tmp_path):
    """8 clients at once: each gets what it gets alone (its noise is its name's), in fewer
    calls than requests."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(8):
        shutil.copy(PHOTO, inputs / f"p{i}.png")
    before = server.calls()
    got, errors = {}, []

    def request(i: int) -> None:
        try:
            client = server.client(tmp_path / f"downloads{i}")
            got[i] = np.asarray(Image.open(client.predict(
                handle_file(str(inputs / f"p{i}.png")), api_name="/super_resolve")))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    calls = server.calls() - before
    assert 2 <= calls < 8  # at most MAX_BATCH per call
    alone = sr_of(inputs, tmp_path)
    for i in range(8):  # batched programs differ from batch 1's by float rounding at most
        assert np.abs(got[i].astype(int) - alone[f"p{i}.png"]).max() <= 1
    assert np.abs(got[0].astype(int) - got[1]).max() > 1  # another name: other noise


def truncated(tmp: Path) -> Path:
    data = PHOTO.read_bytes()
    path = tmp / "truncated.png"
    path.write_bytes(data[:len(data) // 2])
    return path


def not_an_image(tmp: Path) -> Path:
    path = tmp / "notes.png"
    path.write_text("these are not pixels\n")
    return path


def too_large(tmp: Path) -> Path:
    path = tmp / "large.png"
    Image.new("RGB", (400, 300), "gray").save(path)
    return path


BAD = [
    (not_an_image, "notes.png: cannot read image"),
    (truncated, "truncated.png: cannot read image (image file is truncated"),
    (too_large, "large.png: 400x300 is 0.12 MP, more than --max-pixels 0.09 MP"),
]


@pytest.mark.parametrize("make, message", BAD, ids=["not-an-image", "truncated", "too-large"])
def test_bad_uploads_get_one_line_and_the_server_goes_on(server, tmp_path, make, message):
    client = server.client(tmp_path / "downloads")
    with pytest.raises(AppError) as raised:
        client.predict(handle_file(str(make(tmp_path))), api_name="/super_resolve")
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value) and "Traceback" not in str(raised.value)
    ok = client.predict(handle_file(str(PHOTO)), api_name="/super_resolve")
    assert Image.open(ok).size == (512, 512)


def test_page_in_a_browser(server, tmp_path):
    """Upload, press the button, see the before/after slider at 4x; then a bad upload's line."""
    needed(CHROMIUM, "install Debian's chromium (.ci/run does)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(server.url)
            expect(page.locator("#tiny-warning")).to_contain_text("RANDOM model")
            page.locator("#photo input[type=file]").set_input_files(str(PHOTO))
            page.locator("#run").click()
            images = page.locator("#slider img")
            expect(images).to_have_count(2, timeout=120_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#slider img')]"
                ".every(im => im.complete && im.naturalWidth > 0)", timeout=60_000)
            sizes = images.evaluate_all("ims => ims.map(im => [im.naturalWidth, "
                                        "im.naturalHeight])")
            assert sizes == [[512, 512], [512, 512]]  # 4x the 128² photo, before and after
            expect(page.locator("#download a").first).to_have_attribute(
                "href", re.compile(r"/astronaut_x4\.png$"))
            page.screenshot(path=str(tmp_path / "page.png"))
            if shot := os.environ.get("TSDSR_SCREENSHOT"):  # the README's picture
                shutil.copy(tmp_path / "page.png", shot)
            page.reload()
            page.locator("#photo input[type=file]").set_input_files(str(not_an_image(tmp_path)))
            page.locator("#run").click()
            expect(page.get_by_text("notes.png: cannot read image")).to_be_visible(
                timeout=60_000)
        finally:
            browser.close()


def test_serve_refuses_bad_flags(tmp_path):
    needed(SERVE, "`make test` builds .venv-serve")
    for flags, message in [(["--warm-up", "256"], "--warm-up 256: '256' is not HxW"),
                           (["--max-batch-size", "0"], "--max-batch-size 0: must be at least 1"),
                           (["--size-classes", "99"], "--size-classes 99:")]:
        done = subprocess.run([str(SERVE), "--model", "tiny", *flags], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.startswith(f"error: {message}"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
