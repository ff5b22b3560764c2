"""The browser pages in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

``lmforge app`` on builtin:tiny behind ``--auth``: a wrong password is refused, then a typed message
gets a reply that streams in (the page is seen growing it), Regenerate answers again, Clear empties
the chat. ``lmforge web-ui``: a 20-step
training of builtin:tiny on builtin:self-cognition started from the generated form, the loss
curve drawn from ``logging.jsonl`` while it runs, the page reloaded and re-attached to the running
job, the run finished, then a chat with its checkpoint in the Chat tab.

Both commands run as subprocesses, exactly as a user starts them. Screenshots go to ``tmp_path``, or
to ``$LMFORGE_SCREENSHOTS`` (``LMFORGE_SCREENSHOTS=docs/images`` refreshes the README's pictures).
About 100 s together on two idle cores (the training is most of it).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1400"]
# records each state of the newest bot message: proof that a reply streamed in (grew on the page)
WATCH_JS = """
window.__snaps = [];
const root = document.querySelector(arguments[0]);
new MutationObserver(() => {
  const bots = root.querySelectorAll('[data-testid="bot"]');
  const text = bots.length ? bots[bots.length - 1].innerText : '';
  if (window.__snaps[window.__snaps.length - 1] !== text) window.__snaps.push(text);
}).observe(root, {subtree: true, childList: true, characterData: true});
"""


def _browser_or_skip() -> tuple[str, str]:
    pytest.importorskip("gradio", reason="the pages need gradio (pip install 'lmforge[ui]')")
    pytest.importorskip("selenium", reason="the browser tests drive Chromium with selenium (pip install selenium)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver (.ci/run installs them)")
    return binary, driver


@pytest.fixture
def browser():
    binary, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lmforge-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LMFORGE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """A started ``lmforge`` page (subprocess) and its URL."""

    def __init__(self, args: list[str], cwd: Path):
        self.port = _free_port()
        self.log = cwd / f"page-{self.port}.log"
        from deploy_process import repo_env

        env = repo_env({"PYTHONUNBUFFERED": "1"})
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli.main", *args, "--server_port",
                                      str(self.port)], cwd=cwd, env=env, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 120
        while "Running on local URL" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the page did not come up:\n" + self.log.read_text()
            time.sleep(0.3)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait(condition, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def _find(driver, css: str, timeout: float = 30):
    from selenium.webdriver.common.by import By

    return _wait(lambda: (driver.find_elements(By.CSS_SELECTOR, css) or [None])[0], timeout, css)


def _text(driver, css: str) -> str:
    """The element's text, read in one step in the page (gradio re-renders elements while they update)."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
                                 css)


def _retry_stale(action):
    """Run ``action`` again if gradio re-rendered its element in between (a stale element reference)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(5):
        try:
            return action()
        except StaleElementReferenceException:
            if attempt == 4:
                raise
            time.sleep(0.3)


def _type(driver, css: str, value: str, enter: bool = False) -> None:
    from selenium.webdriver.common.keys import Keys

    def act():
        box = _find(driver, css)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(value)
        box.send_keys(Keys.ENTER if enter else Keys.TAB)

    _retry_stale(act)


def _click(driver, css: str) -> None:
    def act():
        el = _find(driver, css)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        el.click()

    _retry_stale(act)


def _line_points(driver, plot: str, series: str) -> int:
    """Points of ``series`` drawn (with a visible stroke) in the vega line plot ``plot``."""
    return driver.execute_script("""
      const lines = [...document.querySelectorAll(arguments[0] + ' [aria-roledescription="line mark"]')]
        .filter(e => (e.getAttribute('aria-label') || '').endsWith('series: ' + arguments[1]));
      if (!lines.length || getComputedStyle(lines[0]).stroke === 'none') return 0;
      return lines[0].getAttribute('d').split('L').length;""", plot, series)


def _bots(driver, chatbot: str) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.innerText);",
                                 f"{chatbot} [data-testid='bot']")


def _chat_and_watch(driver, prefix: str, message: str) -> tuple[str, list[str]]:
    """Send ``message`` and wait for the reply; returns it and every state the page showed it in."""
    chatbot = f"#{prefix}-chatbot"
    _find(driver, chatbot)
    driver.execute_script(WATCH_JS, chatbot)
    _type(driver, f"#{prefix}-message textarea", message, enter=True)
    _wait(lambda: driver.execute_script("return window.__snaps.filter(s => s.trim()).length"), 60, "a reply")
    _wait(lambda: _idle(driver, chatbot), 120, "the reply to finish")
    snaps = driver.execute_script("return window.__snaps")
    return _bots(driver, chatbot)[-1], [s for s in snaps if s.strip()]


def _idle(driver, chatbot: str) -> bool:
    """The chat's event has ended (gradio hides the component's status tracker then)."""
    return driver.execute_script(
        "const t = document.querySelector(arguments[0] + ' [data-testid=\"status-tracker\"]');"
        "return !t || t.classList.contains('hide');", chatbot)


def _assert_streamed(final: str, snaps: list[str]) -> None:
    assert final.strip(), "the reply is empty"
    assert len(set(snaps)) >= 3, f"the reply did not stream in (page states: {snaps})"
    for partial in snaps:
        assert final.startswith(partial.rstrip()), (partial, final)  # it only grew


def _log_in(driver, user: str, password: str) -> None:
    _type(driver, "input[data-testid='textbox']", user)
    _type(driver, "input[data-testid='password']", password, enter=True)


def test_app_login_then_chat_streams_regenerates_clears(browser, tmp_path):
    users = tmp_path / "users"
    users.write_text("# the page's logins\nann:s3cret-pass\n")
    page = Page(["app", "--model", "builtin:tiny", "--temperature", "1.0", "--max_new_tokens", "48",
                 "--auth", str(users)], tmp_path)
    try:
        browser.get(page.url)
        _log_in(browser, "ann", "wrong-pass")
        _wait(lambda: "Incorrect" in _text(browser, "body"), 20, "the wrong password refused")
        assert not _text(browser, "#app-chatbot")
        browser.get(page.url)
        _log_in(browser, "ann", "s3cret-pass")
        reply, snaps = _chat_and_watch(browser, "app", "Hello! Who are you?")
        _assert_streamed(reply, snaps)
        browser.save_screenshot(str(_shots(tmp_path) / "app-chat.png"))
        assert [m for m in _bots(browser, "#app-chatbot")] == [reply]

        _click(browser, "#app-regenerate")  # answered again: one reply, sampled anew
        _wait(lambda: _bots(browser, "#app-chatbot") and _bots(browser, "#app-chatbot")[-1] != reply, 60,
              "a regenerated reply")
        _wait(lambda: _idle(browser, "#app-chatbot"), 120, "the regenerated reply to finish")
        assert len(_bots(browser, "#app-chatbot")) == 1
        assert "Hello! Who are you?" in _text(browser, "#app-chatbot")

        _click(browser, "#app-clear")
        _wait(lambda: not _bots(browser, "#app-chatbot") and "Hello!" not in _text(browser, "#app-chatbot"), 20,
              "an empty chat")
        assert "s3cret-pass" not in page.log.read_text()
    finally:
        page.close()


def _job_pids(jobs_dir: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in jobs_dir.glob("*/job.json")]


def test_webui_train_watch_reattach_and_chat(browser, tmp_path):
    jobs_dir = tmp_path / "output" / "webui-jobs"
    page = Page(["web-ui"], tmp_path)
    try:
        browser.get(page.url)
        for name, value in (("model", "builtin:tiny"), ("dataset", "builtin:self-cognition")):
            _type(browser, f"#sft-{name} textarea", value)
        for name, value in (("max_steps", "20"), ("logging_steps", "1")):
            _type(browser, f"#sft-{name} input", value)
        for name, value in (("per_device_train_batch_size", "2"), ("gradient_accumulation_steps", "1")):
            _type(browser, f"#sft-{name} textarea", value)
        expected = ("lmforge sft --model builtin:tiny --dataset builtin:self-cognition --max_steps 20 "
                    "--per_device_train_batch_size 2 --gradient_accumulation_steps 1 --logging_steps 1")
        _wait(lambda: expected in _text(browser, "#sft-command"), 20, "the command preview")

        _click(browser, "#sft-start")
        _wait(lambda: "Started" in _text(browser, "#sft-message"), 30, "the job to start")
        # the loss curve is drawn while the job runs, from the run's logging.jsonl
        _wait(lambda: _line_points(browser, "#sft-loss-plot", "loss") >= 8, 150, "the loss plot")
        assert "running" in _text(browser, "#sft-status") and "step" in _text(browser, "#sft-progress")
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(_shots(tmp_path) / "webui-train.png"))

        browser.refresh()  # a reload finds the running job again from its folder
        _wait(lambda: "sft-" in _text(browser, "#sft-status") and _text(browser, "#sft-log").strip(), 30,
              "the job after a reload")
        _wait(lambda: "finished" in _text(browser, "#sft-status"), 180, "the run to finish")
        _wait(lambda: "step 20/20" in _text(browser, "#sft-progress"), 10, "the progress of a finished run")
        assert "sft: checkpoints, logs and plots ->" in _text(browser, "#sft-status")
        _wait(lambda: _line_points(browser, "#sft-loss-plot", "loss") == 20, 10, "20 points of loss")
        assert _line_points(browser, "#sft-lr-plot", "learning_rate") == 20

        _click(browser, "#sft-chat")  # the run's checkpoint goes to the Chat tab
        _wait(lambda: "checkpoint-20" in browser.execute_script(
            "return document.querySelector('#chat-ckpt_dir input')?.value || ''"), 20, "the checkpoint in the Chat tab")
        _click(browser, "#chat-load")
        _wait(lambda: "Loaded" in _text(browser, "#chat-loaded"), 90, "the checkpoint to load")
        _type(browser, "#chat-temperature input[type=number]", "1")
        reply, snaps = _chat_and_watch(browser, "chat", "Who are you?")
        _assert_streamed(reply, snaps)
        browser.execute_script("document.querySelector('#chat-loaded').scrollIntoView({block: 'start'})")
        browser.save_screenshot(str(_shots(tmp_path) / "webui-chat.png"))
    finally:
        for pid in _job_pids(jobs_dir):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        page.close()
