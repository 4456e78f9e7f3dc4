"""Real-browser tests (headless Debian Chromium driven by Playwright): the static docs site and JupyterLab.

The site is built by `python docs/build.py` into a temporary directory, or taken from `LATENTCOT_DOCS_SITE` (a site
built before). The JupyterLab test opens `nbs/index.ipynb` (or `LATENTCOT_LAB_NOTEBOOK`). Every request that leaves
the local server is blocked and counts as a failure. Screenshots go to `test_artifacts/` (git-ignored).
"""
import functools
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test_artifacts"
LAB_NOTEBOOK = Path(os.environ.get("LATENTCOT_LAB_NOTEBOOK", ROOT / "nbs" / "index.ipynb")).resolve()
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
RUN_TIMEOUT = 600  # seconds for "Run All Cells" in JupyterLab
pytestmark = pytest.mark.slow


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory):
    "The built docs site: `LATENTCOT_DOCS_SITE`, or a fresh build with the one docs command."
    if prebuilt := os.environ.get("LATENTCOT_DOCS_SITE"): return Path(prebuilt).resolve()
    site = tmp_path_factory.mktemp("docs") / "site"
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "build.py"), "--site", str(site)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"python docs/build.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    print(f"\n{r.stdout.strip()}\ndocs build: {time.time() - t0:.0f} s")
    return site


@pytest.fixture(scope="session")
def site_url(docs_site):
    "The site served over HTTP on localhost (as a host would serve it: search needs http, not file://)."
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(docs_site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def offline_page(browser, base: str, **kw):
    "A new page that may only load from `base`; console errors, page errors and failed or blocked requests go to `problems`."
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, **kw)
    problems = []
    def block(route):
        problems.append(f"network request outside the site: {route.request.url}")
        route.abort()
    ctx.route(lambda url: not url.startswith(base), block)
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text} at {m.location.get('url')}"))
    page.on("pageerror", lambda e: problems.append(f"uncaught exception: {e}"))
    # ERR_ABORTED is a request cancelled by the next navigation (the favicon, typically), not a broken page;
    # a missing file shows as an HTTP error below
    page.on("requestfailed", lambda r: r.url.startswith(base) and "ERR_ABORTED" not in (r.failure or "")
            and problems.append(f"failed request: {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    return page, problems


def wait_for_widgets(page):
    "Wait until the widget manager has rendered the page's saved widget views (if it has any)."
    n = page.locator(f'script[type="{WIDGET_VIEW}"]').count()
    if n: page.wait_for_function("n => document.querySelectorAll('.jupyter-widgets').length >= n", arg=n)
    return n


def test_docs_every_page_loads_without_errors(browser, docs_site, site_url):
    pages = sorted(p.relative_to(docs_site).as_posix() for p in docs_site.rglob("*.html"))
    assert {"index.html", "masks.html"} <= set(pages) and any(p.startswith("api/") for p in pages), pages
    page, problems = offline_page(browser, site_url)
    bad = {}
    for name in pages:
        problems.clear()
        page.goto(site_url + name, wait_until="load")
        wait_for_widgets(page)
        page.wait_for_timeout(250)  # errors of scripts that start at load (MathJax, the widget manager)
        if problems: bad[name] = list(problems)
    assert not bad, "pages with errors:\n" + "\n".join(f"{n}: {p}" for n, p in bad.items())


def test_docs_navigation_search_and_api_reference(browser, site_url):
    page, problems = offline_page(browser, site_url)
    page.goto(site_url + "index.html")
    links = page.eval_on_selector_all("nav.md-nav--primary a.md-nav__link[href]", "els => els.map(e => e.getAttribute('href'))")
    assert "masks.html" in links and "api/masks.html" in links, links
    page.locator("input.md-search__input").click()
    page.keyboard.type("mask_explorer")
    page.wait_for_selector(".md-search-result__item")
    hits = page.eval_on_selector_all(".md-search-result__item a", "els => els.map(e => e.getAttribute('href'))")
    assert any("masks.html" in h for h in hits) and any("api/masks.html" in h for h in hits), hits
    page.goto(site_url + "api/masks.html")  # mkdocstrings: one entry per public name, with its docstring
    entry = page.locator('[id="latentcot.masks.mask_explorer"]')
    assert entry.count() == 1
    assert "Explore masks" in page.locator(".doc-object", has=entry).first.inner_text()
    assert not problems, problems


def widget_with_image(browser, site_url, page_name: str):
    "The docs page's first saved widget box that shows an image, once the image has loaded; and the page's problems."
    page, problems = offline_page(browser, site_url)
    page.goto(site_url + page_name)
    assert wait_for_widgets(page), f"{page_name} has no saved widget view"
    box = page.locator(".jupyter-widgets.widget-vbox", has=page.locator("img.widget-image")).first
    box.scroll_into_view_if_needed()
    image = box.locator("img.widget-image").first
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return box, problems


def test_docs_mask_explorer_renders(browser, site_url):
    box, problems = widget_with_image(browser, site_url, "masks.html")
    assert box.locator(".widget-slider").count() >= 1, "the mask explorer shows no slider"
    assert box.locator(".widget-toggle-button").count() >= 1, "the mask explorer shows no flag toggles"
    ARTIFACTS.mkdir(exist_ok=True)
    box.screenshot(path=str(ARTIFACTS / "docs_mask_explorer.png"))
    assert not problems, problems


def test_docs_generation_explorer_renders(browser, site_url):
    box, problems = widget_with_image(browser, site_url, "mmdit.html")
    assert box.locator(".widget-slider").count() >= 1, "the generation explorer shows no held-out slider"
    text = box.inner_text()
    assert "edit-heldout-" in text and "copy_img0" in text, text[:500]
    ARTIFACTS.mkdir(exist_ok=True)
    box.screenshot(path=str(ARTIFACTS / "docs_generation_explorer.png"))
    assert not problems, problems


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def jupyterlab(tmp_path):
    "JupyterLab on localhost, no token, autosave off (the notebook in the tree stays as committed); stopped afterwards."
    root = ROOT if LAB_NOTEBOOK.is_relative_to(ROOT) else LAB_NOTEBOOK.parent
    settings = tmp_path / "settings" / "@jupyterlab"
    _write_json(settings / "docmanager-extension" / "plugin.jupyterlab-settings", {"autosave": False})
    _write_json(settings / "notebook-extension" / "tracker.jupyterlab-settings", {"windowingMode": "none", "autoStartDefaultKernel": True})
    _write_json(settings / "apputils-extension" / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    port, log = _free_port(), tmp_path / "jupyterlab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", "--IdentityProvider.token=", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    with open(log, "w") as out:
        # own process group, so stopping the server also stops the kernels it started
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None: pytest.fail(f"JupyterLab exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "api/status", timeout=2): break
            except OSError:
                if time.time() > deadline: pytest.fail(f"JupyterLab did not answer in 120 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, root, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode is not None


# prompts of the notebook's non-empty code cells: "[ ]" not run, "[*]" running or queued, "[n]" done
_PROMPTS = """() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')]
  .filter(c => (c.querySelector('.jp-Cell-inputArea .cm-content')?.textContent ?? 'x').trim() !== '')
  .map(c => (c.querySelector('.jp-InputPrompt')?.textContent ?? '').trim())"""


_KERNEL_IDLE = """() => {
  const status = [...document.querySelectorAll('.jp-StatusBar-TextItem')].map(e => e.textContent).find(t => t.includes(' | ')) ?? '';
  return status.endsWith('| Idle') && !status.startsWith('No Kernel');
}"""


def wait_kernel_settled(page, quiet: float = 2.0, timeout: float = 120):
    "Wait until the notebook's kernel is connected and has stayed idle for `quiet` s (the widget manager's"
    " handshake with a fresh kernel comes right after the first idle; cells run before it lose their widgets)."
    t0 = since = time.time()
    while time.time() - since < quiet:
        if not page.evaluate(_KERNEL_IDLE): since = time.time()
        if time.time() - t0 > timeout: pytest.fail(f"the kernel did not become idle in {timeout} s")
        time.sleep(0.1)


def run_all_cells(page, timeout: float):
    "Run > Run All Cells, then wait until nothing is queued; returns the final prompts."
    prompts = lambda: page.evaluate(_PROMPTS)
    wait_kernel_settled(page)
    for _ in range(6):  # a click before the notebook's kernel session is up does nothing: click again
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        try:
            page.wait_for_function(f"() => ({_PROMPTS})().some(p => p !== '[ ]:')", timeout=10_000)
            break
        except Exception:
            if page.locator(".jp-Dialog").count(): pytest.fail(f"JupyterLab asks: {page.locator('.jp-Dialog').inner_text()}")
    else: pytest.fail("Run All Cells never started")
    page.wait_for_function(f"() => !({_PROMPTS})().some(p => p === '[*]:')", timeout=timeout * 1000, polling=500)
    return prompts()


def test_jupyterlab_quickstart_runs_and_shows_widget(browser, jupyterlab):
    url, root, log = jupyterlab
    before = LAB_NOTEBOOK.read_bytes()
    page, _ = offline_page(browser, url)
    page.set_default_timeout(60_000)
    page.goto(f"{url}lab/tree/{LAB_NOTEBOOK.relative_to(root).as_posix()}?reset")
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-CodeCell")
    prompts = run_all_cells(page, RUN_TIMEOUT)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "jupyterlab_quickstart.png"
    if "[ ]:" in prompts:  # Lab stops at the first failing cell: the last one with a number
        last = max(int(p[1:-2]) for p in prompts if p[1:-2].isdigit())
        failed = page.locator(".jp-Notebook .jp-CodeCell", has=page.locator(".jp-InputPrompt", has_text=f"[{last}]:")).first
        failed.scroll_into_view_if_needed()
        page.screenshot(path=str(shot))
        pytest.fail(f"{LAB_NOTEBOOK.name} stopped at a failing cell in JupyterLab (prompts {prompts}):\n"
                    f"{failed.inner_text()[-3000:]}")
    # the quickstart's mask explorer (progress bars are widgets too, so look for its slider and its image)
    widget = page.locator(".jp-OutputArea-output .jupyter-widgets.widget-vbox",
                          has=page.locator("img.widget-image")).filter(has=page.locator(".widget-slider")).first
    try:
        widget.wait_for(state="visible", timeout=30_000)
        widget.evaluate("e => e.scrollIntoView({block: 'start'})")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                               arg=widget.locator("img.widget-image").first.element_handle(), timeout=30_000)
        shown = True
    except Exception: shown = False
    page.wait_for_timeout(500)
    page.screenshot(path=str(shot))
    errs = page.locator(".jp-OutputArea-output", has_text="Error displaying widget")
    assert not errs.count(), f"{errs.first.inner_text()} (screenshot: {shot})"
    assert shown, f"no mask explorer (slider + image widget) in the outputs of {LAB_NOTEBOOK.name} (screenshot: {shot})"
    assert LAB_NOTEBOOK.read_bytes() == before, f"{LAB_NOTEBOOK} was modified by the test"
