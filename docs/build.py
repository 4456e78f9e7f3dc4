"""Build the static docs site from the notebooks: `python docs/build.py` writes `site/`.

1. Run every notebook in `nbs/` with execnb, as `nbdev-test` does (cells flagged with a `tst_flags` flag such as
   `#| slow` are skipped unless `--flags slow`), keeping outputs and the state of the widgets they show.
2. Apply nbdev's doc processors: hidden and exported cells go, every exported name gets its `show_doc`, names in
   backticks link to their docs. Pages take nbdev's names (`06_masks.ipynb` -> `masks.html`).
3. Write an API reference page per module (mkdocstrings, from the docstrings), copy the widget manager, require.js
   and MathJax from `docs/node_modules` (`npm ci` of `docs/package-lock.json`), and run mkdocs (material theme).

Nothing is fetched from a CDN when the pages load. `nbdev-docs` (Quarto) does not use any of this and still works
wherever Quarto is installed.
"""
import argparse, json, logging, os, re, shutil, subprocess, sys, time
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
BUILD = DOCS / "_build"  # processed pages (git-ignored by docs/.gitignore)
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
MATHJAX_PARTS = ("MathJax.js", "config/TeX-AMS_CHTML-full.js", "config/Safe.js", "extensions", "jax/input/TeX",
                 "jax/element", "jax/output/CommonHTML", "fonts/HTML-CSS/TeX/woff")  # what TeX-AMS_CHTML-full,Safe loads
ASSETS = ("png", "jpg", "jpeg", "gif", "svg", "webp")  # files next to the notebooks that pages may show


def notebooks(nbs_path: Path) -> list[Path]:
    "The notebooks nbdev documents (`_`-prefixed ones are left out), home page first."
    from nbdev.doclinks import nbglob
    return sorted(nbglob(nbs_path, func=Path), key=lambda p: (p.stem != "index", p.relative_to(nbs_path).as_posix()))


def page_name(nb: Path) -> str:
    "nbdev's page name, so its doc links (`masks.html#mask_explorer`) resolve: `06_masks.ipynb` -> `masks.ipynb`."
    from nbdev.doclinks import nbpath2html
    return nbpath2html(nb).with_suffix(".ipynb").name


def shown_widget_state(nb, state: dict) -> dict:
    "The widget models shown in `nb`'s outputs and every model they reference (children, layouts, styles)."
    todo = [o["data"][WIDGET_VIEW]["model_id"] for c in nb.cells for o in c.get("outputs", [])
            if WIDGET_VIEW in o.get("data", {})]
    keep = {}
    while todo:
        mid = todo.pop()
        if mid in keep or mid not in state: continue
        keep[mid] = state[mid]
        todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(state[mid]["state"]))
    return keep


def quarto_to_nbconvert(nb):
    "Apply the Quarto bits nbdev's processors leave (`#| echo: false`, `[source](url){attrs}`) in nbconvert's terms."
    cells = []
    for c in nb.cells:
        if c.cell_type == "code":
            head = re.match(r"(?:[ \t]*#\|.*(?:\n|$))*", c.source).group()
            opts = dict(re.findall(r"#\|\s*([\w-]+)\s*:\s*(\S+)", head))
            if opts.get("include") == "false": continue
            c.source = c.source[len(head):]
            if opts.get("echo") == "false": c.metadata.setdefault("tags", []).append("remove-input")
            if opts.get("output") == "false": c.outputs = []
            c.outputs = [o for o in c.get("outputs", []) if o.get("output_type") == "stream" or o.get("data") or o.get("ename")]
            for o in c.outputs:
                if "text/markdown" in o.get("data", {}):
                    o["data"]["text/markdown"] = re.sub(r"(\]\([^)\s]*\))\{[^}\n]*\}", r"\1", o["data"]["text/markdown"])
        c.metadata.pop("execution", None)  # execnb's timings (floats, which nbformat rejects)
        c.pop("has_sd", None)  # nbdev's marker on the show_doc cells it added (not a notebook field)
        cells.append(c)
    nb.cells = cells


def render_notebook(src: Path, dest: Path, skip_flags: list, force_flags: list, cell_timeout=None) -> float:
    "Run `src` as nbdev-test would, apply nbdev's doc processors and write the page notebook `dest`; returns seconds."
    from execnb.shell import CaptureShell
    from fastcore.nbio import dict2nb, nb2str
    from nbdev.config import get_config
    from ipywidgets import Widget
    from nbdev.process import NBProcessor
    from nbdev.processors import FilterDefaults, add_fold, exec_show_docs, insert_warning
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.test import nb_test_cells
    t0 = time.time()
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
    run = {c.idx_ for c in nb_test_cells(src, skip_flags, force_flags)}
    nb = NBProcessor(src, rm_directives=False, process=True).nb
    k = CaptureShell(src)
    os.chdir(src.parent)
    try: k.run_all(nb, exc_stop=True, preproc=lambda c: c.idx_ not in run, cell_timeout=cell_timeout)
    except BaseException as e:
        raise RuntimeError(f"{src.name}: a cell failed, so its page cannot be built\n{k.prettytb(fname=src) or e!r}") from None
    k.run_cell("from nbdev.showdoc import show_doc")
    nb = dict2nb(json.loads(nb2str(nb)))  # outputs as a saved notebook holds them (joined text), as the processors expect

    def run_added_show_docs(cell):
        # nbdev's exec_show_docs would re-run imports and exports in a fresh shell (`#| slow` ones too): use ours
        if getattr(cell, "has_sd", False):
            k.cell(cell)
            if k.exc: raise RuntimeError(f"{src.name}: {cell.source} failed: {k.exc!r}")

    # frontmatter and the warning/fold cells are Quarto-only; the title stays the notebook's first heading
    drop = {FrontmatterProc, insert_warning, add_fold}
    procs = [run_added_show_docs if p is exec_show_docs else p for p in FilterDefaults().procs() if p not in drop]
    NBProcessor(nb=nb, procs=procs, rm_directives="quarto").process()
    state = Widget.get_manager_state(drop_defaults=True)
    if shown := shown_widget_state(nb, state["state"]):
        nb.metadata["widgets"] = {WIDGET_STATE: {**state, "state": shown}}
    Widget.close_all()  # the worker runs the next notebook with an empty widget registry
    os.chdir(ROOT)
    quarto_to_nbconvert(nb)
    # nbdev links names to the published site; point them at this site's pages instead
    site_url = f"{get_config(ROOT).doc_host}{get_config(ROOT).doc_baseurl}".rstrip("/") + "/"
    dest.write_text(nb2str(nb).replace(f"]({site_url}", "](").replace(f'href=\\"{site_url}', 'href=\\"'), encoding="utf-8")
    return time.time() - t0


def _render_one(args):
    src, dest, skip, force, timeout = args
    main = sys.modules["__main__"]
    try: return src.name, render_notebook(src, dest, skip, force, timeout), None
    except Exception as e: return src.name, None, str(e)
    finally: sys.modules["__main__"] = main  # IPython's shell takes `__main__`; the worker's next task needs it back


def title_and_module(nb: Path) -> tuple[str, str | None]:
    "The notebook's first `# heading` (its page title) and its `#| default_exp` module."
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    src = lambda c: "".join(c["source"])
    title = next((m.group(1).strip() for c in cells if c["cell_type"] == "markdown"
                  for m in [re.search(r"^#\s+(.+)$", src(c), re.M)] if m), nb.stem)
    mod = next((m.group(1) for c in cells if c["cell_type"] == "code"
                for m in [re.search(r"^#\|\s*default_exp\s+(\S+)", src(c), re.M)] if m), None)
    return title, mod


def write_api_pages(out: Path, lib_name: str, modules: list[str]) -> list[dict]:
    "One mkdocstrings page per module (`::: lib.mod`); returns their nav entries."
    (out / "api").mkdir(parents=True, exist_ok=True)
    nav = []
    for mod in modules:
        name = f"{lib_name}.{mod}"
        (out / "api" / f"{mod}.md").write_text(f"# `{name}`\n\n::: {name}\n", encoding="utf-8")
        nav.append({name: f"api/{mod}.md"})
    return nav


def vendor_js(out: Path):
    "Install the pinned npm packages (`npm ci`, only when the lock file changed) and copy what the pages load."
    nm = DOCS / "node_modules"
    stamp = nm / ".package-lock.json"  # npm writes it on install
    if not stamp.exists() or stamp.stat().st_mtime < (DOCS / "package-lock.json").stat().st_mtime:
        if not shutil.which("npm"): raise SystemExit("docs/build.py: npm is needed to vendor the widget JavaScript")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=DOCS, check=True)
    v = out / "assets" / "vendor"
    hm = nm / "@jupyter-widgets" / "html-manager" / "dist"
    (v / "html-manager").mkdir(parents=True, exist_ok=True)
    for f in hm.iterdir():  # the AMD bundle and the icon fonts it references next to itself
        if f.name == "embed-amd.js" or f.suffix in (".woff2", ".woff", ".ttf", ".eot", ".svg"): shutil.copy2(f, v / "html-manager")
    shutil.copy2(nm / "requirejs" / "require.js", v / "require.js")
    for part in MATHJAX_PARTS:  # MathJax 2, the version nbconvert's pages and the widgets' LaTeX labels call
        src, dst = nm / "mathjax" / part, v / "mathjax" / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir(): shutil.copytree(src, dst, ignore=shutil.ignore_patterns("a11y"))
        else: shutil.copy2(src, dst)


def build(flags: str = "", workers: int = 2, site: Path = ROOT / "site") -> Path:
    "Build the site into `site` and return it."
    from nbdev.config import get_config
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config
    t0 = time.time()
    cfg = get_config(ROOT)
    skip = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags)
    force = flags.split()
    src_dir = BUILD / "src"
    shutil.rmtree(src_dir, ignore_errors=True)
    src_dir.mkdir(parents=True)
    nbs = notebooks(cfg.nbs_path)
    for f in cfg.nbs_path.rglob("*"):
        if f.suffix.lstrip(".").lower() in ASSETS and not any(p.startswith((".", "_")) for p in f.relative_to(cfg.nbs_path).parts):
            (src_dir / f.relative_to(cfg.nbs_path)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, src_dir / f.relative_to(cfg.nbs_path))

    jobs = [(nb, src_dir / nb.relative_to(cfg.nbs_path).with_name(page_name(nb)), skip, force, cfg.cell_timeout or None) for nb in nbs]
    for _, dest, *_ in jobs: dest.parent.mkdir(parents=True, exist_ok=True)
    # worker processes are reused across notebooks, as nbdev-test does (imports are paid once per worker)
    with ProcessPoolExecutor(max(workers, 1), mp_context=mp.get_context("spawn")) as ex:
        results = list(ex.map(_render_one, jobs))
    failed = [(n, e) for n, s, e in results if e]
    for n, e in failed: print(e, file=sys.stderr)
    if failed: raise SystemExit(f"docs/build.py: notebooks failed: {', '.join(n for n, _ in failed)}")
    t_nbs = time.time() - t0

    nav, modules = [], []
    for nb, dest, *_ in jobs:
        title, mod = title_and_module(nb)
        nav.append({title: dest.relative_to(src_dir).as_posix()})
        if mod and mod not in modules and (cfg.lib_path / f"{mod.replace('.', '/')}.py").exists(): modules.append(mod)
    nav.append({"API reference": write_api_pages(src_dir, cfg.lib_name, modules)})
    vendor_js(src_dir)
    t1 = time.time()
    mkdocs_build(load_config(str(DOCS / "mkdocs.yml"), docs_dir=str(src_dir), site_dir=str(site), nav=nav))
    for n, s, _ in sorted(results, key=lambda r: -r[1]): print(f"  {n}: {s:.1f} s")
    print(f"docs: {len(nbs)} notebooks run in {t_nbs:.0f} s, site rendered in {time.time() - t1:.0f} s -> {site}")
    return site


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flags", default="", help="space separated tst_flags whose cells to run too, e.g. 'slow'")
    p.add_argument("--workers", type=int, default=2, help="notebooks run in parallel")
    p.add_argument("--site", type=Path, default=ROOT / "site", help="output directory")
    a = p.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)  # mkdocs' warnings
    build(a.flags, a.workers, a.site.resolve())


if __name__ == "__main__": main()
