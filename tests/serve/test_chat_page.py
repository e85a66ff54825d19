"""The chat page in a real headless Chromium: send, watch the answer stream in, keep the
conversation, change temperature and max tokens, start over.

Uses Debian's `chromium` and `chromium-driver` (CI installs them with apt-get); Selenium is given
both paths, so nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tinyllm.serve import BackgroundServer  # noqa: E402

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
