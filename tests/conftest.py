"""Shared fixtures: headless Chromium (installed from Debian packages when missing) for the browser tests."""
import os
import shutil
import subprocess

import pytest

CHROMIUM_PACKAGES = ["chromium", "chromium-driver"]
# flags for a headless Chromium in a container; Playwright adds --headless itself
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium_path():
    "Path of the Debian `chromium` binary, installed with apt-get first if it is missing."
    if path := _chromium(): return path
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("headless Chromium is not installed and cannot be installed here (needs root and apt-get); "
                    f"install it with: apt-get update && apt-get install -y {' '.join(CHROMIUM_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *CHROMIUM_PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode: pytest.fail(f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    if path := _chromium(): return path
    pytest.fail(f"apt-get installed {CHROMIUM_PACKAGES} but no `chromium` is on PATH")


@pytest.fixture(scope="session")
def browser(chromium_path):
    "A Playwright Chromium browser running the Debian binary (Playwright's own browser download is not used)."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def kill_after_first_checkpoint():
    "`run(cmd, out, **popen)`: start `cmd`, SIGKILL its process group right after `out` has a complete checkpoint; return it."
    import signal, time
    from latentcot.trainer import latest_checkpoint

    def run(cmd, out, **popen):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)
        deadline = time.time() + 600
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint within 600 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        return latest_checkpoint(out)
    return run
