"mkdocs hook: point the notebook pages' CDN scripts (require.js, the widget manager, MathJax) at the vendored copies."
import hashlib, re
from pathlib import Path
from mkdocs.exceptions import PluginError
from mkdocs.utils import get_relative_url

VENDOR = {  # nbconvert's default CDN URLs -> files docs/build.py copies from docs/node_modules
    r'https://cdnjs\.cloudflare\.com/ajax/libs/require\.js/[^"\']+': "assets/vendor/require.js",
    r'https?://[^"\']+/@jupyter-widgets/html-manager@[^/"\']+/dist/embed-amd\.js': "assets/vendor/html-manager/embed-amd.js",
}
BIG_STYLE = re.compile(r'<style type="text/css">([^<]{50000,})</style>')  # nbconvert inlines ~600 kB of JupyterLab CSS
REMOTE = re.compile(r'<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=["\']?(?:https?:)?//[^"\'\s>]+', re.I)


def on_post_page(html, page, config):
    rel = lambda p: get_relative_url(p, page.url)
    for pat, path in VENDOR.items(): html = re.sub(pat, rel(path), html)
    html = html.replace('src="VENDOR/', f'src="{rel("assets/vendor")}/')  # mkdocs.yml's MathJax URL
    html = BIG_STYLE.sub(lambda m: f'<link rel="stylesheet" href="{rel(shared_css(m.group(1), config))}">', html)
    if left := REMOTE.findall(html):
        raise PluginError(f"{page.file.src_path}: the page would load {left[:3]} from the network; vendor it in docs/")
    return html


def shared_css(css: str, config) -> str:
    "Write `css` once into the site (named by its hash) and return its site path, so pages share one copy."
    path = f"assets/stylesheets/notebook-{hashlib.sha1(css.encode()).hexdigest()[:12]}.css"
    out = Path(config["site_dir"]) / path
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(css, encoding="utf-8")
    return path
