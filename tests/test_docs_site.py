"""The docs site in a real browser: Chromium (Debian's) driven by Playwright, the site served on 127.0.0.1 by the test.

The site is the one `tools/build_docs.py` built (the session fixture `docs_site` of conftest.py: in `make test` the
build that ran every notebook, just before pytest). One crawl starts at the landing page and follows the links between
pages, from the top folder and from the subfolders (api/, studies/, explanations/); the tests below check what it saw,
including that every page shows the outputs its notebook computes (figures, tables, printed numbers).
"""
import ast
import json
from pathlib import Path
from urllib.parse import urldefrag, urlparse

import pytest
from nbdev.config import get_config

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
ARTIFACTS = ROOT / "artifacts"
EXPORTED_FUNCTION = "get_device"  # from crossclass_nb.core, so its show_doc section is always on the site
MIN_FIGURES = {"studies/robust_overfitting.ipynb": 6, "studies/soft_labels.ipynb": 3, "api/05_attribution.ipynb": 2,
               "api/04_attacks.ipynb": 2, "api/07_learner.ipynb": 1, "api/01_data.ipynb": 1, "api/02_synthetic.ipynb": 5,
               "index.ipynb": 2}
MIN_SHOWN = 0.8  # of the code cells that print, draw or end in an expression, the share whose output is on the page

from playwright.sync_api import TimeoutError as PlaywrightTimeout


def notebooks() -> list[Path]:
    "The notebooks of the book: nbs/ and its subfolders (not `_`- or `.`-folders), as nbdev finds them."
    return sorted(p for p in NBS.rglob("*.ipynb") if not any(part.startswith((".", "_")) for part in p.relative_to(NBS).parts))


def notebook_titles() -> dict[str, str]:
    "The title (`# Title` of the first markdown cell) of every notebook, by its path under nbs/ (`api/00_core.ipynb`)."
    titles = {}
    for nb in notebooks():
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        first = next(c for c in cells if c["cell_type"] == "markdown")
        titles[nb.relative_to(NBS).as_posix()] = "".join(first["source"]).splitlines()[0].lstrip("#").strip()
    return titles


def page_name(nb: str) -> str:
    "The page nbdev (and Quarto) make of a notebook: `api/00_core.ipynb` -> `api/core.html` (its `output-file`)."
    from nbdev.doclinks import _nbpath2html
    return _nbpath2html(Path(nb)).as_posix()


@pytest.fixture(scope="module")
def site(docs_site, chromium, serve):
    "The built site, served on a free port of 127.0.0.1."
    return serve(docs_site)


PAGE_FACTS = """() => ({
    title: (document.querySelector('h1') || {}).innerText || '',
    sidebar: [...document.querySelectorAll('#quarto-sidebar a.sidebar-link')].map(a => a.innerText.trim()),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    images: [...document.images].map(i => ({src: i.src.slice(0, 80), ok: i.complete && i.naturalWidth > 0})),
    katex: document.querySelectorAll('.katex').length,
    untypeset: [...document.querySelectorAll('.math')].filter(m => !m.querySelector('.katex')).map(m => m.innerText.slice(0, 60)),
    raw_dollars: document.body.innerText.includes('$$'),
    cells: [...document.querySelectorAll('div.cell')].map(c => ({
        code: (c.querySelector('.cell-code code') || {}).textContent || '',
        outputs: c.querySelectorAll('.cell-output:not(.cell-output-stderr)').length,
        figures: c.querySelectorAll('.cell-output img, .cell-output > svg, .cell-output figure svg').length,
    })),
})"""


@pytest.fixture(scope="module")
def crawl(site, chromium):
    "Visit every page reachable by links from the landing page; return {url: facts}, the requests made, and the sidebar's links."
    requests, pages = [], {}
    context = chromium.new_context(viewport={"width": 1280, "height": 900})

    def guard(route):  # record every request; anything not for 127.0.0.1 is refused (and fails a test below)
        requests.append(route.request.url)
        url = urlparse(route.request.url)
        if url.scheme in ("data", "blob") or url.hostname == "127.0.0.1": route.continue_()
        else: route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    todo, seen = [site + "index.html"], set()
    while todo:
        url = todo.pop(0)
        if url in seen: continue
        seen.add(url)
        response = page.goto(url, wait_until="load")
        facts = {"status": response.status if response else None}
        if facts["status"] == 200:
            page.wait_for_function("document.fonts.status === 'loaded'")
            facts.update(page.evaluate(PAGE_FACTS))
            for link in facts["links"]:
                link = urldefrag(link).url
                if link == site: link = site + "index.html"
                if link.startswith(site) and link.endswith(".html") and link not in seen: todo.append(link)
        pages[url] = facts

    page.goto(site + "index.html", wait_until="load")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "landing.png"), full_page=True)
    sidebar = {a.inner_text().strip(): urldefrag(a.evaluate("a => a.href")).url
               for a in page.query_selector_all("#quarto-sidebar a.sidebar-link")}

    # search, as a reader does: type the name of an exported function and follow the first hit
    page.fill("#quarto-search input", EXPORTED_FUNCTION)
    try:
        page.click(f".search-result:has-text('{EXPORTED_FUNCTION}')", timeout=10_000)
        page.wait_for_load_state("load")
        search = {"url": page.url, "found": page.locator(f"[id='{EXPORTED_FUNCTION}']").count() > 0}
    except PlaywrightTimeout:
        search = {"url": "(no search result named it)", "found": False}
    context.close()
    return {"pages": pages, "requests": requests, "sidebar": sidebar, "search": search}


def test_landing_page_screenshot(crawl):
    shot = ARTIFACTS / "landing.png"
    assert shot.exists() and shot.stat().st_size > 10_000


def test_every_page_loads(crawl):
    broken = {url: f["status"] for url, f in crawl["pages"].items() if f["status"] != 200}
    assert not broken, f"links that lead nowhere: {broken}"


def test_sidebar_lists_every_chapter(crawl):
    for url, facts in crawl["pages"].items():
        if facts["status"] != 200: continue
        missing = [t for t in notebook_titles().values() if t not in facts["sidebar"]]
        assert not missing, f"the sidebar of {url} does not list {missing}"


def test_every_notebook_has_a_page(crawl):
    for nb, title in notebook_titles().items():
        url = crawl["sidebar"].get(title)
        assert url, f"no sidebar link titled {title!r} for {nb}"
        facts = crawl["pages"].get(url)
        assert facts and facts["status"] == 200, f"{nb}: its sidebar link {url} does not load"
        assert facts["title"].strip() == title, f"{nb}: {url} shows {facts['title']!r}, not {title!r}"


def test_pages_are_named_as_nbdev_names_them(crawl, site):
    "Each notebook's page sits where nbdev's doc links point (`api/core.html#get_device`), in its notebook's folder."
    from crossclass_nb._modidx import d
    for nb, title in notebook_titles().items():
        assert crawl["sidebar"].get(title) == site + page_name(nb), f"{nb}: the sidebar links {crawl['sidebar'].get(title)}"
    linked = {site + url.split("#")[0] for mod in d["syms"].values() for url, _ in mod.values()}
    missing = sorted(u for u in linked if crawl["pages"].get(u, {}).get("status") != 200)
    assert not missing, f"doc links of crossclass_nb._modidx to pages the crawl did not reach: {missing}"


def test_pages_in_subfolders_link_back(crawl, site):
    "A page in a subfolder reaches the landing page and a page of another folder by its relative links."
    sub = {u: f for u, f in crawl["pages"].items() if f["status"] == 200 and "/" in u.removeprefix(site)}
    assert sub, "the crawl reached no page in a subfolder"
    for url, facts in sub.items():
        links = {urldefrag(l).url for l in facts["links"]}
        assert site + "index.html" in links or site in links, f"{url} has no link to the landing page"


def test_search_finds_an_exported_function(crawl):
    assert crawl["search"]["found"], f"searching {EXPORTED_FUNCTION!r} led to {crawl['search']['url']}, which has no such section"


def test_math_is_typeset(crawl):
    pages = crawl["pages"].values()
    assert sum(f.get("katex", 0) for f in pages) > 0, "no page shows KaTeX output (index.ipynb has display maths)"
    for url, f in crawl["pages"].items():
        assert not f.get("untypeset"), f"{url}: maths left as TeX: {f['untypeset']}"
        assert not f.get("raw_dollars"), f"{url}: raw $$ in the visible text"


def test_every_image_loads(crawl):
    images = [(url, i) for url, f in crawl["pages"].items() for i in f.get("images", [])]
    assert images, "no image on any page (index.ipynb draws one)"
    broken = [(url, i["src"]) for url, i in images if not i["ok"]]
    assert not broken, f"images that do not load: {broken}"


def test_no_request_leaves_the_machine(crawl):
    outside = sorted({u for u in crawl["requests"] if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != "127.0.0.1"})
    assert not outside, f"requests to other hosts: {outside}"
    assert len(crawl["requests"]) > len(crawl["pages"]), "the request log is empty: the guard did not run"


# What a code cell shows, read from the notebook's source
DRAWS = {"subplots", "figure", "plot", "imshow", "matshow", "bar", "barh", "hist", "scatter", "errorbar", "fill_between",
         "pcolormesh", "contour", "contourf", "heatmap", "stem", "step", "boxplot", "violinplot"}
SHOWS = {"print", "display", "show_doc"}
RETURNS_NONE = {"show", "close", "tight_layout", "savefig", "seed", "manual_seed", "set_num_threads", "sleep", "append",
                "extend", "update", "sort", "mkdir", "unlink", "touch", "rmtree", "simplefilter", "filterwarnings",
                "write_text", "write_bytes", "setattr", "insert"}
HIDDEN = {"hide", "export", "exporti", "exports", "default_exp"}  # cells nbdev leaves off the page


def callee(call: ast.Call) -> str:
    "The name a call is made by: `print` for print(...), `plot` for ax.plot(...)."
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def top_level_calls(tree: ast.AST) -> list[str]:
    "Names of the calls a cell makes when it runs (not those inside the functions and classes it defines)."
    names, todo = [], list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)): continue
        if isinstance(node, ast.Call): names.append(callee(node))
        todo += list(ast.iter_child_nodes(node))
    return names


def cell_options(src: str) -> tuple[dict[str, str], str]:
    "The cell's `#|` directives ({name: value}) and its code without them."
    lines, opts = src.splitlines(), {}
    while lines and (lines[0].startswith("#|") or not lines[0].strip()):
        line = lines.pop(0)[2:].strip()
        if line: opts[line.split(":")[0].split()[0]] = line.split(":", 1)[1].strip() if ":" in line else ""
    return opts, "\n".join(lines)


def shows_something(src: str, skip_flags: set[str]) -> bool:
    """Will this code cell show something on the page? It must run in the build (not hidden, not `eval: false`, no test
    flag such as `#| slow`), show its output, and print, display or draw, or end in an expression that is neither
    silenced by `;` nor a call that returns None (a test such as `test_eq`, `plt.show()`, ...)."""
    opts, code = cell_options(src)
    if opts.keys() & (HIDDEN | skip_flags) or opts.get("eval") == "false" or "false" in (opts.get("output"), opts.get("include")):
        return False
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
    try: tree = ast.parse(code)
    except SyntaxError: return False
    calls = top_level_calls(tree)
    if SHOWS & set(calls) or DRAWS & set(calls) or any(c.startswith("plot_") for c in calls): return True
    last = tree.body[-1] if tree.body else None
    if not isinstance(last, ast.Expr) or code.rstrip().endswith(";"): return False
    value = last.value
    return not (isinstance(value, ast.Call) and (callee(value) in RETURNS_NONE or callee(value).startswith("test_")))


def test_shows_something_reads_cells_as_the_reader_does():
    flags = {"slow", "cuda", "notest"}
    for src in ["x", "x = 1\nx", "print(1)", "fig, ax = plt.subplots()\nax.plot([1, 2])", "plot_cas(r)",
                "for i in range(2): print(i)", "d = {}\nd['a']", "show_doc(f)", "plt.plot([1]);"]:
        assert shows_something(src, flags), src
    for src in ["x = 1", "test_eq(1, 1)", "plt.show()", "#| hide\nx", "#| slow\nprint(1)", "#| export\nx",
                "def f():\n    print(1)", "x;", "import torch", "#| eval: false\nx", "#| output: false\nx", ""]:
        assert not shows_something(src, flags), src


def normalised(code: str) -> str:
    """Code as text to match a notebook cell with its rendering: no directives, no trailing blanks; "" for a cell of
    `show_doc` calls, whose code nbdev hides, and for an `echo: false` cell (both are matched with the page's cells
    that show no code)."""
    opts, code = cell_options(code)
    if opts.get("echo") == "false": return ""   # the page shows its output but not its code
    code = code.strip()
    try: body = ast.parse(code).body
    except SyntaxError: body = None
    if body and all(isinstance(b, ast.Expr) and isinstance(b.value, ast.Call) and callee(b.value) == "show_doc" for b in body):
        return ""
    return "\n".join(line.rstrip() for line in code.splitlines())


@pytest.fixture(scope="module")
def outputs(crawl):
    """For each notebook with a page: (cells that show something, how many of them show an output on the page, the
    figures on the page). Also written to artifacts/outputs.json."""
    skip_flags, found = set(get_config().tst_flags.split()), {}
    for nb, title in notebook_titles().items():
        facts = crawl["pages"].get(crawl["sidebar"].get(title), {})
        rendered = {}
        for c in facts.get("cells", []): rendered.setdefault(normalised(c["code"]), []).append(c["outputs"] > 0)
        cells = json.loads((NBS / nb).read_text(encoding="utf-8"))["cells"]
        showing = [normalised("".join(c["source"])) for c in cells
                   if c["cell_type"] == "code" and shows_something("".join(c["source"]), skip_flags)]
        shown = sum(bool(rendered.get(code)) and rendered[code].pop(0) for code in showing)
        found[nb] = {"showing": len(showing), "shown": shown,
                     "figures": sum(c["figures"] for c in facts.get("cells", []))}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "outputs.json").write_text(json.dumps(found, indent=1))
    return found


def table(found: dict) -> str:
    return "\n".join(f"  {nb:<30} figures {v['figures']:>3}   outputs shown {v['shown']:>3} / {v['showing']}"
                      for nb, v in found.items())


def test_chapters_have_their_figures(outputs):
    few = {nb: (outputs.get(nb, {}).get("figures", 0), n) for nb, n in MIN_FIGURES.items()
           if outputs.get(nb, {}).get("figures", 0) < n}
    assert not few, f"pages with fewer figures than they need (have, need): {few}\n{table(outputs)}"


def test_every_page_shows_its_outputs(outputs):
    bare = {nb: f"{v['shown']} / {v['showing']}" for nb, v in outputs.items()
            if v["showing"] and v["shown"] < MIN_SHOWN * v["showing"]}
    assert not bare, (f"pages where fewer than {MIN_SHOWN:.0%} of the cells that print, draw or end in an expression "
                      f"show an output: {bare}\n{table(outputs)}")
