"""The page at / in a real browser: headless Chromium (Debian's chromium and chromium-driver, installed here when
missing; the tests skip, saying why, where that cannot be done) driven by Selenium against snapkv-serve as a real
process. A document and a question go in through the page; the streamed answer must equal the API's greedy answer
to the same request, the kept view must mark exactly the positions the API reports as kept (token by token and
pixel by pixel of the heatmap), the file `--show-kept` writes must draw the same thing from the same JSON, the
comparison must report the API's matched tokens and memory, and every refused or failed request must show a
visible message. No test may leave a JavaScript error in the browser console.

SNAPKV_SCREENSHOTS=1 also writes the screenshot the README shows, docs/browser_page.png."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from compare import first_difference, matched_tokens
from kept_view import write_kept_report
from tests.conftest import ROOT
from tests.test_server import Server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: `make install` (the test "
                                "extra pins it)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

DOCUMENT = (ROOT / "examples" / "long_prompt.txt").read_text()[:1500]
LONG_DOCUMENT = (ROOT / "examples" / "long_prompt.txt").read_text()[:4000]  # ~900 tokens: over --max-kv-len
QUESTION = "Where does the Harlow Valley Lighthouse stand?"
SNAPKV = {"budget": 96, "window": 16, "policy": "snapkv"}
MAX_TOKENS = 12
MAX_KV_LEN = 512


def chromium_paths() -> tuple[str, str]:
    """The system's chromium and chromedriver, installed with apt-get where they are missing (as root)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get): run "
                        "`apt-get install -y chromium chromium-driver`")
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300)
            result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0 or not (shutil.which("chromium") and shutil.which("chromedriver")):
            pytest.skip("could not install Chromium (`apt-get install -y chromium chromium-driver` failed): "
                        + (result.stderr or result.stdout).strip()[-300:])
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = chromium_paths()
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1500"):
        options.add_argument(arg)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the system chromedriver, so Selenium Manager never looks for (or downloads) one
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(smol_dir):
    s = Server("--max-batch-size", "2", "--max-kv-len", str(MAX_KV_LEN), "--budget", "256", model=smol_dir)
    yield s
    s.stop()


def console_errors(driver, allow_network: bool = False) -> list[dict]:
    """SEVERE entries of the browser console since the last call (a refused request logs a network one)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and not (allow_network and e.get("source") == "network")]


def open_page(driver, server) -> None:
    driver.get(server.base + "/")
    WebDriverWait(driver, 30).until(lambda d: "SmolLM2-135M-Instruct" in d.find_element(By.ID, "model-info").text)
    console_errors(driver)  # start each test with an empty console


def fill(driver, element_id: str, value) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def set_cache(driver, mode: str, budget: int = SNAPKV["budget"], window: int = SNAPKV["window"],
              policy: str = SNAPKV["policy"]) -> None:
    driver.find_element(By.ID, f"mode-{mode}").click()
    fill(driver, "budget", budget)
    fill(driver, "window", window)
    Select(driver.find_element(By.ID, "policy")).select_by_value(policy)
    fill(driver, "max-tokens", MAX_TOKENS)


def set_value(driver, element_id: str, text: str) -> None:
    """Put long text into a field at once (typing thousands of characters would take seconds)."""
    driver.execute_script("const f = document.getElementById(arguments[0]); f.value = arguments[1];"
                          "f.dispatchEvent(new Event('input'));", element_id, text)


def ask(driver, question: str) -> None:
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()


def last_answer(driver, timeout: float = 240) -> tuple[str, str]:
    """Wait for the last assistant message to finish streaming; its state ('done'/'failed') and text."""
    def settled(d):
        boxes = d.find_elements(By.CSS_SELECTOR, "#chat .message.assistant")
        return boxes and boxes[-1].get_attribute("data-state") != "streaming" and boxes[-1]
    box = WebDriverWait(driver, timeout).until(settled)
    return box.get_attribute("data-state"), box.find_element(By.CLASS_NAME, "text").get_property("textContent")


def api_chat(server, content: str, snapkv) -> dict:
    """The same request through the openai client (not streamed): the greedy answer and the snapkv object."""
    reply = server.client().chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS,
        temperature=0, extra_body={"snapkv": snapkv, "return_kept": True})
    return {"text": reply.choices[0].message.content, "snapkv": reply.model_extra["snapkv"]}


def expected_counts(kept: dict) -> tuple[list[int], list[list[int]]]:
    """From the API's runs: per position, how many (layer, kv head) pairs kept it; per layer and position, how many
    kv heads did."""
    total = [0] * kept["prompt_tokens"]
    by_layer = [[0] * kept["prompt_tokens"] for _ in range(kept["layers"])]
    for layer, heads in enumerate(kept["runs"]):
        for head in heads:
            for start, end in head:
                for p in range(start, end):
                    total[p] += 1
                    by_layer[layer][p] += 1
    return total, by_layer


def drawn_kept_view(driver) -> dict:
    """What the kept view drew: each token span's data-kept, its text, and per heatmap pixel how many kv heads
    its colour stands for (-1: a colour not on the scale)."""
    return driver.execute_script("""
        const view = document.getElementById('kept'), canvas = view.querySelector('canvas');
        const spans = [...view.querySelectorAll('.kept-token')];
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        const H = Number(arguments[0]), shades = [];
        for (let k = 0; k <= H; k++) shades.push(KeptView.color(k / H).join(','));
        const heads = [];
        for (let y = 0; y < canvas.height; y++) {
          const row = [];
          for (let x = 0; x < canvas.width; x++) {
            const i = (y * canvas.width + x) * 4;
            row.push(shades.indexOf([pixels[i], pixels[i + 1], pixels[i + 2]].join(',')));
          }
          heads.push(row);
        }
        return {kept: spans.map((s) => Number(s.dataset.kept)), positions: spans.map((s) => Number(s.dataset.pos)),
                text: spans.map((s) => s.textContent).join(''), heads,
                summary: view.querySelector('.kept-summary').textContent, html: view.innerHTML};
    """, 3)


def test_the_page_answers_as_the_api_and_marks_exactly_what_was_kept(browser, server, tmp_path):
    open_page(browser, server)
    browser.find_element(By.ID, "document").send_keys(DOCUMENT)  # pasted, as a person would
    set_cache(browser, "snapkv")
    ask(browser, QUESTION)
    state, answer = last_answer(browser)
    assert state == "done", browser.find_element(By.ID, "error-text").text
    assert not browser.find_element(By.ID, "error").is_displayed()

    want = api_chat(server, DOCUMENT.rstrip() + "\n\n" + QUESTION, SNAPKV)
    assert answer == want["text"] and len(answer) > 10
    kept = want["snapkv"]["kept"]
    assert kept["prompt_tokens"] == want["snapkv"]["prompt_tokens"] > 3 * SNAPKV["budget"]
    assert (kept["layers"], kept["kv_heads"]) == (30, 3)
    rows = [sum(end - start for start, end in head) for heads in kept["runs"] for head in heads]
    assert rows == [SNAPKV["budget"]] * 90  # each (layer, kv head) kept exactly the budget

    drawn = drawn_kept_view(browser)
    total, by_layer = expected_counts(kept)
    assert drawn["positions"] == list(range(kept["prompt_tokens"]))
    assert drawn["kept"] == total  # every token marked with exactly the API's count
    assert {p for p, n in enumerate(drawn["kept"]) if n} == \
        {p for heads in kept["runs"] for head in heads for start, end in head for p in range(start, end)}
    assert all(n == 90 for n in drawn["kept"][-SNAPKV["window"]:])  # the observation window: kept by every row
    assert 0 in drawn["kept"]
    assert drawn["heads"] == by_layer  # the heatmap, pixel by pixel
    assert drawn["text"] == "".join(kept["tokens"]).replace("\n", "\u21b5\n")
    assert DOCUMENT.strip()[:200].replace("\n", "\u21b5\n") in drawn["text"]
    mib = want["snapkv"]["kv_bytes"] / 2**20, want["snapkv"]["full_kv_bytes"] / 2**20
    assert f"{kept['prompt_tokens']} prompt tokens" in drawn["summary"]
    assert f"{SNAPKV['budget']} kept per layer and kv head" in drawn["summary"]
    assert f"KV memory {mib[0]:.2f} MiB kept against {mib[1]:.2f} MiB" in drawn["summary"]
    assert console_errors(browser) == []

    # the file snapkv-run --show-kept writes, from the same JSON, draws the same view with the same code
    page, _ = write_kept_report(tmp_path / "kept.html", kept)
    browser.get(page.as_uri())
    static = drawn_kept_view(browser)
    assert static["html"] == drawn["html"] and static["heads"] == drawn["heads"]
    assert console_errors(browser) == []


def test_compare_sets_full_and_snapkv_side_by_side(browser, server, tmp_path):
    open_page(browser, server)
    document = tmp_path / "report.txt"
    document.write_text(DOCUMENT)
    browser.find_element(By.ID, "file").send_keys(str(document))  # uploaded this time
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "document").get_property("value") == DOCUMENT)
    set_cache(browser, "snapkv", budget=64, window=8)
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    browser.find_element(By.ID, "compare").click()
    columns = [browser.find_element(By.ID, name) for name in ("compare-full", "compare-snapkv")]
    WebDriverWait(browser, 240).until(lambda d: all(c.get_attribute("data-state") != "streaming" for c in columns))
    assert [c.get_attribute("data-state") for c in columns] == ["done", "done"], \
        browser.find_element(By.ID, "error-text").text

    content = DOCUMENT.rstrip() + "\n\n" + QUESTION
    full, snap = api_chat(server, content, False), api_chat(server, content, SNAPKV | {"budget": 64, "window": 8})
    answers = [c.find_element(By.CLASS_NAME, "answer").get_property("textContent") for c in columns]
    assert answers == [full["text"], snap["text"]]
    ids = [full["snapkv"]["kept"]["completion_token_ids"], snap["snapkv"]["kept"]["completion_token_ids"]]
    n = max(map(len, ids))
    summary = browser.find_element(By.ID, "compare-summary")
    differ = first_difference(*ids)
    assert (int(summary.get_attribute("data-matched")), int(summary.get_attribute("data-compared")),
            int(summary.get_attribute("data-prefix"))) == (matched_tokens(*ids, n=n), n,
                                                           n if differ is None else differ)
    full_mib, snap_mib = full["snapkv"]["kv_bytes"] / 2**20, snap["snapkv"]["kv_bytes"] / 2**20
    assert snap["snapkv"]["kept_tokens"] == 64 and full["snapkv"]["kept_tokens"] == full["snapkv"]["prompt_tokens"]
    assert f"full cache {full_mib:.2f} MiB, SnapKV {snap_mib:.2f} MiB ({full_mib / snap_mib:.2f}x less)" \
        in summary.text
    kept_view = drawn_kept_view(browser)  # the kept view shows the SnapKV side
    assert kept_view["kept"] == expected_counts(snap["snapkv"]["kept"])[0]
    assert console_errors(browser) == []

    browser.find_element(By.ID, "question").clear()
    ask(browser, QUESTION)  # a chat turn too, for the picture
    assert last_answer(browser)[0] == "done"
    screenshot = tmp_path / "browser_page.png"
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 120, 2600))
    browser.save_screenshot(str(screenshot))
    browser.set_window_size(1280, 1500)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SNAPKV_SCREENSHOTS"):
        shutil.copy(screenshot, ROOT / "docs" / "browser_page.png")
    assert console_errors(browser) == []


FAKE_FETCH = {  # failures a healthy local server cannot be made to show on demand, made by replacing fetch
    "network": "window.fetch = async () => { throw new TypeError('Failed to fetch'); };",
    "error event": "window.fetch = async () => new Response("
                   "'data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"The\"}}]}\\n\\n' + "
                   "'data: {\"error\":{\"message\":\"engine step failed: out of memory\",\"type\":\"server_error\"}}"
                   "\\n\\n', {status: 200, headers: {'content-type': 'text/event-stream'}});",
    "cut stream": "window.fetch = async () => new Response("
                  "'data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"The\"}}]}\\n\\n', "
                  "{status: 200, headers: {'content-type': 'text/event-stream'}});",
    "queue full": "window.fetch = async () => new Response(JSON.stringify({error: {message: 'too many requests are "
                  "waiting (256); retry later', type: 'rate_limit_error'}}), {status: 429});",
}


@pytest.mark.parametrize("case, expected", [
    ("invalid budget", "The server answered 400: snapkv: budget (16) must be larger than window (32)"),
    ("prompt too long", "The server answered 400: the request needs"),
    ("network", "Could not reach the server (Failed to fetch)"),
    ("error event", "The request failed on the server: engine step failed: out of memory"),
    ("cut stream", "The answer stream ended before the server finished it"),
    ("queue full", "The server answered 429: too many requests are waiting (256); retry later"),
])
def test_a_refused_or_failed_request_shows_a_visible_message(browser, server, case, expected):
    open_page(browser, server)
    set_value(browser, "document", LONG_DOCUMENT if case == "prompt too long" else DOCUMENT)
    if case == "invalid budget":
        set_cache(browser, "snapkv", budget=16, window=32)
    else:
        set_cache(browser, "full" if case == "prompt too long" else "snapkv")
    if case in FAKE_FETCH:
        browser.execute_script(FAKE_FETCH[case])
    ask(browser, QUESTION)
    state, _ = last_answer(browser)
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 10).until(lambda d: error.is_displayed())
    assert state == "failed" and error.text.startswith(expected), error.text
    if case == "prompt too long":
        assert "max_kv_len >= " in error.text and "cache entries" in error.text
    # the question is back in the box to send again, and the failed turn is not part of the conversation
    assert browser.find_element(By.ID, "question").get_property("value") == QUESTION
    assert browser.execute_script("return state.messages.length") == 0
    assert console_errors(browser, allow_network=True) == []
