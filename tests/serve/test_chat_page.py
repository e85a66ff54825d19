"""The chat page in a real headless Chromium: send, watch the answer stream in, keep the
conversation, change temperature and max tokens, start over.

Uses Debian's `chromium` and `chromium-driver` (CI installs them with apt-get); Selenium is given
both paths, so nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tinyllm.runtime.checkpoint import checkpoint_name  # noqa: E402
from tinyllm.runtime.run_dir import CHECKPOINTS, METRICS  # noqa: E402
from tinyllm.serve import BackgroundServer  # noqa: E402
from tinyllm.serve.runinfo import read_run_info  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]

# CI sets TINYLLM_REQUIRE_BROWSER=1 so a missing browser fails there instead of skipping.
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("TINYLLM_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def page_server(tokenizer, make_model, slow_gpt, model_name):
    model = make_model(slow_gpt)
    model.delay = 0.04  # slow enough for the page to be seen mid-answer
    with BackgroundServer(model, tokenizer, model_name=model_name) as srv:
        yield srv


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER)
    )
    try:
        yield driver
    finally:
        driver.quit()


def assistant_bubbles(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def wait_streamed_answer(driver, n: int, timeout: float = 30):
    """Wait for the n-th answer; return (text seen while it was still streaming, final text)."""
    wait = WebDriverWait(driver, timeout, poll_frequency=0.01)
    partial = wait.until(
        lambda d: len(assistant_bubbles(d)) >= n and _partial(assistant_bubbles(d)[n - 1])
    )
    bubble = assistant_bubbles(driver)[n - 1]
    wait.until(lambda d: "done" in bubble.get_attribute("class"))
    return partial, driver.execute_script(
        "return arguments[0].querySelector('.content').textContent", bubble
    )


def _partial(bubble) -> str | None:
    # Read text and state in one script call, so both describe the same moment.
    text, streaming = bubble.parent.execute_script(
        "const b = arguments[0];"
        "return [b.querySelector('.content').textContent, b.classList.contains('streaming')]",
        bubble,
    )
    return text if text and streaming else None


def test_chat_page_streams_keeps_the_conversation_and_starts_over(page_server, browser, model_name):
    browser.get(page_server.url + "/")
    WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.ID, "model-name").text == model_name
    )
    assert browser.find_element(By.TAG_NAME, "header").text.count(model_name) == 1
    assert browser.find_element(By.TAG_NAME, "h1").text == model_name  # the served id, once
    # Greedy decoding and a short answer, set through the page's own controls.
    browser.execute_script(
        "const t = document.getElementById('temperature'); t.value = '0';"
        "t.dispatchEvent(new Event('input'));"
    )
    assert browser.find_element(By.ID, "temperature-value").text == "0.00"
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("12")

    send(browser, "Hello there")
    partial, answer = wait_streamed_answer(browser, 1)
    assert answer.startswith(partial) and len(partial) < len(
        answer
    )  # seen mid-stream, then it grew
    first = assistant_bubbles(browser)[0]
    assert first.get_attribute("data-completion-tokens") == "12"

    # The page sent exactly this request: the API answers it with the same text.
    api = httpx.post(
        page_server.url + "/v1/chat/completions",
        timeout=30,
        json={
            "model": model_name,
            "messages": [{"role": "user", "content": "Hello there"}],
            "temperature": 0,
            "max_tokens": 12,
        },
    ).json()
    assert api["choices"][0]["message"]["content"] == answer

    send(browser, "And then?")
    wait_streamed_answer(browser, 2)
    second = assistant_bubbles(browser)[1]
    used_before = int(first.get_attribute("data-prompt-tokens")) + int(
        first.get_attribute("data-completion-tokens")
    )
    assert (
        int(second.get_attribute("data-prompt-tokens")) > used_before
    )  # the whole conversation was sent
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message.user")) == 2

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
    send(browser, "Hello there")
    _, again = wait_streamed_answer(browser, 1)
    assert again == answer  # a fresh conversation: same prompt, same greedy answer


def test_a_max_tokens_beyond_the_room_left_answers_up_to_the_context(tokenizer, make_model, browser):
    # The page's default cap (200, or the context) cannot fit beside any prompt in a 32-token
    # context: the answer then fills what is left, instead of every message failing.
    with BackgroundServer(make_model(block_size=32), tokenizer, model_name="tiny-test") as srv:
        browser.get(srv.url + "/")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model-name").text == "tiny-test")
        send(browser, "Hello there")
        wait = WebDriverWait(browser, 30, poll_frequency=0.01)
        bubble = wait.until(lambda d: assistant_bubbles(d) and assistant_bubbles(d)[0])
        wait.until(lambda d: "done" in bubble.get_attribute("class"))
        assert "error" not in bubble.get_attribute("class"), bubble.text
        prompt = int(bubble.get_attribute("data-prompt-tokens"))
        assert 1 <= int(bubble.get_attribute("data-completion-tokens")) <= 32 - prompt


def write_run(root: Path, *, step: int, log: list[dict] | None) -> Path:
    """A run directory with checkpoint `step` (its state.json: the page needs no weights)."""
    ckpt = root / CHECKPOINTS / checkpoint_name(step)
    ckpt.mkdir(parents=True)
    state = {"step": step, "tokens": 64 * step, "val_loss": 2.5, "val_bpb": 1.25}
    (ckpt / "state.json").write_text(json.dumps(state))
    if log is not None:
        lines = [json.dumps(record) for record in log] + ['{"step": 12, "loss": 3.']  # torn
        (root / METRICS).write_text("\n".join(lines))
    return ckpt


def drawn_steps(driver, series: str) -> tuple[int, list[int], list[float]]:
    """A curve's vertex count, the steps it says it drew, and its x coordinates."""
    return driver.execute_script(
        "const line = document.querySelector(`#loss-curve polyline.${arguments[0]}`);"
        "const xs = Array.from({length: line.points.numberOfItems}, (_, i) => line.points.getItem(i).x);"
        "return [line.points.numberOfItems, line.dataset.steps.split(',').map(Number), xs];",
        series,
    )


def test_chat_page_shows_the_served_run_and_its_loss_curve(tmp_path, tokenizer, make_model, browser):
    # Train loss at steps 1..40, val loss every 10 (step 0: the untrained model); the checkpoint
    # served is step 30, so the page's curve has steps 0..30, one point per logged step.
    log = [{"step": 0, "tokens": 0, "val_loss": 10.5}]
    log += [{"step": s, "tokens": 64 * s, "loss": 10 - s / 5, **({"val_loss": 10.2 - s / 5} if s % 10 == 0 else {})}
            for s in range(1, 41)]
    info = read_run_info(write_run(tmp_path / "story-run", step=30, log=log))
    with BackgroundServer(make_model(), tokenizer, model_name="tiny-test", run_info=info) as srv:
        browser.get(srv.url + "/")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "run").is_displayed())
        assert browser.find_element(By.ID, "run-name").text == "run story-run"
        assert browser.find_element(By.ID, "run-step").text.startswith("checkpoint step 30 ")
        assert browser.find_element(By.ID, "run-val-loss").text.startswith("val loss 2.5000")
        assert not browser.find_element(By.ID, "curve-note").is_displayed()

        n, steps, xs = drawn_steps(browser, "train")
        assert n == 30 and steps == list(range(1, 31)) and xs == sorted(xs)
        n, steps, _ = drawn_steps(browser, "val")
        assert n == 4 and steps == [0, 10, 20, 30]
        chart = browser.find_element(By.ID, "loss-curve")
        assert not chart.is_displayed()  # folded away until asked for: the chat keeps the room
        browser.find_element(By.CSS_SELECTOR, "#curve-panel summary").click()
        assert chart.is_displayed() and chart.size["width"] > 300

    # A run with no metrics file: what there is, and why there is no curve.
    info = read_run_info(write_run(tmp_path / "quiet-run", step=5, log=None))
    with BackgroundServer(make_model(), tokenizer, model_name="tiny-test", run_info=info) as srv:
        browser.get(srv.url + "/")
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "run").is_displayed())
        assert [span.text for span in browser.find_elements(By.CSS_SELECTOR, "#run-facts span")] == [
            "run quiet-run", "checkpoint step 5 (320 tokens)", "val loss 2.5000, 1.250 bits/byte"]
        note = browser.find_element(By.ID, "curve-note").text
        assert note == f"Loss curve not available: the run has no {METRICS}."
        assert not browser.find_element(By.ID, "curve-panel").is_displayed()
        assert browser.find_elements(By.CSS_SELECTOR, "#loss-curve polyline") == []
