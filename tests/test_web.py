"""The chat page of `tiaoyu serve`, in a real headless browser (Debian's chromium driven by playwright):
type a question, see the answer stream in, see a reasoning model's thinking apart from its answer.

Needs /usr/bin/chromium and the `playwright` Python package (`.ci/run` installs both; playwright's own
browser download is never used). Skipped with the reason when either is missing."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (`.ci/run` installs Debian's chromium): browser test skipped",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                               "(`.ci/run` installs it): browser test skipped")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def start(engine, name):
    from tiaoyu_cli.serve.server import make_server

    srv = make_server(engine, "127.0.0.1", 0, name, quiet=True)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def ask(page, question: str):
    page.fill("#prompt", question)
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
    return page.locator(".msg.assistant").last


def test_page_streams_an_answer(base_ckpt, browser, tmp_path):
    from tiaoyu_cli.serve.server import ServeConfig, load_engine

    engine, name = load_engine(base_ckpt, device="cpu", mode="complete", config=ServeConfig())
    srv, url = start(engine, name)
    try:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent === 'base'")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")
        msg = ask(page, "Tosi has a pet named")
        answer = msg.locator(".content").inner_text()
        assert answer.strip()
        assert int(msg.get_attribute("data-chunks")) >= 2  # arrived in pieces
        assert msg.locator(".thinking").count() == 0
        assert page.locator(".msg.user").inner_text() == "Tosi has a pet named"
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        assert (tmp_path / "chat.png").stat().st_size > 1000
        # a second turn keeps the conversation; "New chat" clears it
        ask(page, "And then?")
        assert page.locator(".msg.assistant").count() == 2
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0
        page.close()
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()


def test_page_shows_thinking_apart_from_the_answer(base_ckpt, browser, tmp_path):
    from tiaoyu_cli.infer.generate import END_THINK_ID, THINK_ID, Step
    from tiaoyu_cli.serve.server import Engine, ServeConfig
    from tiaoyu_cli.checkpoint import load_model, load_tokenizer

    tok = load_tokenizer(base_ckpt)
    model, _ = load_model(base_ckpt)
    script = [THINK_ID, *tok.encode("3 + 4 = 7."), END_THINK_ID, *tok.encode("The answer is 7."), 5]

    def steps(model, prompts, n, params, stops, gen):  # a reasoning model's tokens, scripted
        for t in script[:n]:
            yield Step(list(range(len(prompts))), [t] * len(prompts), None)

    engine = Engine(model, tok, "chat", ServeConfig(), steps=steps)
    srv, url = start(engine, "reasoner")
    try:
        page = browser.new_page()
        page.goto(url)
        msg = ask(page, "What is 3 + 4?")
        assert msg.locator(".thinking .text").inner_text() == "3 + 4 = 7."
        assert msg.locator(".content").inner_text() == "The answer is 7."
        page.screenshot(path=str(tmp_path / "thinking.png"), full_page=True)
        page.close()
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()
