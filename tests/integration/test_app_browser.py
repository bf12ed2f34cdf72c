"""`tristage app` in real headless Chromium: type a prompt, pick a style and 2 images, generate, check."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from ..conftest import tristage, user_folder

pytest.importorskip("gradio", reason="gradio is not installed (pip install 'tristage[dev]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium + chromium-driver are not installed"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1100",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny PixArt export served by `tristage app` in a subprocess on localhost."""
    import torch

    from ..tiny_exports import pixart_export

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("app")
    export = pixart_export(root)
    torch.set_num_threads(before)
    port, out = free_port(), root / "outputs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1"}
    cmd = tristage("app", str(export), "--port", str(port), "--out", str(out))
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=user_folder(), env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"app did not start: {(root / 'server.log').read_text()[-2000:]}")
    yield f"http://127.0.0.1:{port}", out
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(condition, timeout: float = 120):
    """Poll until condition() is truthy; an element that is not on the page yet counts as "not yet"."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
        except (NoSuchElementException, StaleElementReferenceException):
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out")


def open_advanced(driver) -> None:
    """Open the accordion; Gradio renders its children only once it is open, so wait for #style."""
    from selenium.webdriver.common.by import By

    def opened():
        style = driver.find_elements(By.CSS_SELECTOR, "#style")
        if style and style[0].is_displayed():
            return True
        if not driver.find_elements(By.CSS_SELECTOR, "#advanced .label-wrap.open"):
            driver.find_element(By.CSS_SELECTOR, "#advanced button, #advanced .label-wrap").click()
        return False

    wait_for(opened, timeout=60)


def set_number(driver, elem_id: str, value: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def test_generate_two_images_with_a_style(server, browser):
    from selenium.webdriver.common.by import By

    url, out = server
    browser.get(url)
    prompt = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#prompt textarea"))[0]
    prompt.send_keys("a red circle on a black background")
    set_number(browser, "num-images", 2)
    open_advanced(browser)
    browser.find_element(By.XPATH, "//*[@id='style']//label[.//span[text()='Anime']]").click()
    set_number(browser, "steps", 2)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
    shown = browser.find_elements(By.CSS_SELECTOR, "#gallery .thumbnail-item img, #gallery .grid-wrap img")
    assert len(shown) == 2
    runs = sorted(out.glob("run_*"))
    assert [r.name for r in runs] == ["run_0001"]
    assert sorted(p.name for p in runs[0].glob("*.png")) == ["00.png", "01.png"]
    settings = (runs[0] / "settings.json").read_text()
    assert '"style": "Anime"' in settings and "anime artwork a red circle" in settings
    if os.environ.get("TRISTAGE_SCREENSHOT"):
        browser.save_screenshot(os.environ["TRISTAGE_SCREENSHOT"])

    from selenium.webdriver.common.keys import Keys

    prompt.send_keys(Keys.CONTROL, "a")  # an empty prompt: a message on the page, no new run, no trace
    prompt.send_keys(Keys.BACKSPACE)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait_for(lambda: "Enter a prompt" in browser.find_element(By.CSS_SELECTOR, "#message").text)
    assert "Traceback" not in browser.page_source
    assert len(sorted(out.glob("run_*"))) == 1


def test_out_of_range_number_shows_a_message(server, browser):
    from selenium.webdriver.common.by import By

    url, out = server
    browser.get(url)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#prompt textarea"))[0].send_keys("a cube")
    before = len(list(out.glob("run_*")))
    set_number(browser, "num-images", 99)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    wait_for(lambda: "from 1 to 8" in browser.find_element(By.CSS_SELECTOR, "#message").text)
    assert len(list(out.glob("run_*"))) == before
