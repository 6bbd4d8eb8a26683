"""The web demo in a real browser: an export folder run as a Space would run it, driven by headless Chromium.

Needs what the training requirements leave out: the demo's packages (demo/requirements.txt: gradio, which pins an
older Pillow than training's, so they live in an environment of their own, named by DEMO_PYTHON; or in this one),
playwright (its Python package only, here: the browser is Debian's chromium, not one that `playwright install`
downloads). Skipped, with the reason, when any is missing; .ci/run installs them all and fails on a skip.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from demo.classifier import top_k_lines
from tools import export, predict
from training import builtin_data

from test_predict import trained_run

CHROMIUM = Path('/usr/bin/chromium')
# the interpreter of the demo's own environment (pip install -r demo/requirements.txt), as a Space runs it
DEMO_PYTHON = os.environ.get('DEMO_PYTHON', sys.executable)


def has_gradio(python: str) -> bool:
    if python == sys.executable:
        return importlib.util.find_spec('gradio') is not None
    return subprocess.run([python, '-c', 'import gradio'], capture_output=True).returncode == 0

CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']

pytestmark = [
    pytest.mark.skipif(not has_gradio(DEMO_PYTHON),
                       reason=f'the demo needs gradio in {DEMO_PYTHON}: pip install -r demo/requirements.txt into an '
                              'environment of its own, named by DEMO_PYTHON=.../bin/python'),
    pytest.mark.skipif(importlib.util.find_spec('playwright') is None,
                       reason='the browser test needs playwright: pip install playwright'),
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f'the browser test needs {CHROMIUM}: apt-get install chromium'),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for_server(url: str, app: subprocess.Popen, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if app.poll() is not None:
            pytest.fail(f'the demo stopped: {app.stdout.read()}')
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f'the demo did not answer at {url} in {seconds:.0f} s')


@pytest.fixture
def space(tmp_path_factory, shapes, tmp_path):
    """The demo, started as a Space starts it: `python app.py` in an export folder, on a free local port."""
    folder = tmp_path / 'space'
    assert export.main(['--checkpoint', str(trained_run(tmp_path_factory, shapes) / 'last.pth.tar'),
                        '--out', str(folder)]) == 0
    port = free_port()
    env = {**os.environ, 'GRADIO_SERVER_NAME': '127.0.0.1', 'GRADIO_SERVER_PORT': str(port),
           'GRADIO_ANALYTICS_ENABLED': 'False'}
    app = subprocess.Popen([DEMO_PYTHON, 'app.py'], cwd=folder, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_server(f'http://127.0.0.1:{port}/', app, 180)
        yield folder, f'http://127.0.0.1:{port}/'
    finally:
        app.terminate()
        app.wait(30)


def test_uploaded_image_shows_the_top5_that_predict_gives(space, tmp_path):
    from playwright.sync_api import sync_playwright
    folder, url = space
    image = tmp_path / 'ring.png'
    builtin_data.draw_image(builtin_data.CLASSES.index('ring'), 96, np.random.default_rng(0)).save(image)
    assert predict.main(['--checkpoint', str(folder), '--json', str(tmp_path / 'p.json'), str(image)]) == 0
    expected = json.loads((tmp_path / 'p.json').read_text())[0]['topk']

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / 'profile'), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url, wait_until='domcontentloaded')
            page.locator('input[type=file]').first.set_input_files(str(image))
            page.wait_for_function("() => document.querySelector('#top-k textarea')?.value.length > 0",
                                   timeout=60_000)
            page.wait_for_function("() => !document.querySelector('.pending, .translucent')", timeout=30_000)
            shown = page.locator('#top-k textarea').input_value().splitlines()
            chart = page.locator('[data-testid$="-confidence-set"] dt').all_inner_texts()
            page.wait_for_timeout(1500)  # the outputs fade in after the update: a screenshot shows them faded before
            page.screenshot(path=str(tmp_path / 'demo.png'), full_page=True)
        finally:
            browser.close()

    assert shown == top_k_lines(expected) and len(shown) == 5
    assert chart == [entry['class'] for entry in expected]
    assert (tmp_path / 'demo.png').stat().st_size > 10_000
