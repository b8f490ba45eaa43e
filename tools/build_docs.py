"""Build the docs site into `_docs/`, a site that works with no network.

Every page shows the outputs of its notebook run top to bottom. The committed notebooks carry no outputs; this script
runs each one once (two at a time, each in a fresh process, in its own folder, skipping exactly the cells `nbdev_test`
skips: `#| eval: false` and the settings' `tst_flags`) through nbdev's own docs processors, with nbdev's
`exec_show_docs` (which runs only exporting, import and show_doc cells) replaced by a processor that runs them all.
So the outputs on the site are the ones the current code produces, and hidden cells stay hidden. This run is also the
test of the notebooks (it replaces `nbdev_test`): a cell that raises stops the build with the notebook, the cell and
the traceback, and the time each notebook took is listed at the end, slowest first. The executed copies
land in `_proc/` and are rendered by Quarto when it is on PATH (as `nbdev_docs` does), else by the pure-Python
`smalldocs`. The site is then made self-contained: KaTeX is served from the site itself, external font imports are
dropped, and links to the published docs become relative links.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from fastcore.basics import str2bool
from fastcore.xtras import globtastic
from nbdev.config import get_config
from nbdev.doclinks import nbglob
from nbdev.processors import FilterDefaults, exec_show_docs
from nbdev.quarto import refresh_quarto_yml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "_docs"
KATEX_VERSION = "0.16.11"
KATEX_CDN = re.compile(r"https://cdn\.jsdelivr\.net/npm/katex@[^/\"']*/dist/")
FONT_IMPORT = re.compile(r"@import\s+url\(\s*[\"']?https?://[^)]*\)\s*;?")
EXTERNAL_LOAD = re.compile(r"""(?:\bsrc=["']|<link[^>]*rel=["'](?:stylesheet|preload|modulepreload)["'][^>]*href=["']|url\(\s*["']?|@import\s+["'])(https?:)?//""")


def shown(nb: Path) -> str:
    "A notebook as the reader knows it: its path under nbs/ (`api/00_core.ipynb`)."
    nbs = get_config().nbs_path
    return Path(nb).resolve().relative_to(nbs.resolve()).as_posix() if Path(nb).resolve().is_relative_to(nbs.resolve()) else str(nb)


def skipped_by_tests(cell) -> bool:
    "What `nbdev_test` skips: non-code cells, `nbdev_export()` calls, `#| eval: false`, cells with one of the `tst_flags`."
    if cell.cell_type != "code" or "nbdev_export(" in cell.source: return True
    directives = getattr(cell, "directives_", None) or {}
    if directives.get("eval:", [""])[0].lower() == "false": return True
    return bool(set(get_config().tst_flags.split()) & directives.keys())


class run_cells(exec_show_docs):
    "nbdev's `exec_show_docs`, but running every cell that `nbdev_test` runs (and the show_doc cells nbdev adds), in order."
    def begin(self):
        super().begin()
        if hasattr(self, "k"): self.k.set_path(self.nb.path_)  # as nbdev_test: the notebook's folder on sys.path

    def __call__(self, cell):
        if str2bool(getattr(self.nb, "frontmatter_", {}).get("skip_exec", False)): return super().__call__(cell)
        if not hasattr(self, "k") or skipped_by_tests(cell): return
        self.k.cell(cell)
        if self.k.exc: raise RuntimeError(f"{shown(Path(self.nb.path_))}, cell {cell.idx_}:\n{cell.source}") from self.k.exc


class ExecutedDocs(FilterDefaults):
    "nbdev's docs processors with `run_cells` in place of `exec_show_docs`: the page shows every output of a full run."
    def base_procs(self): return [run_cells if p is exec_show_docs else p for p in super().base_procs()]


def execute_notebook(src: Path, dst: Path) -> tuple[str, float, str]:
    "Process `src` into `dst` with `ExecutedDocs`, run in its own folder as nbdev_test runs it; (name, seconds, error)."
    os.environ["IN_TEST"] = "1"
    os.chdir(src.parent)
    sys.path.insert(0, str(ROOT))
    start = time.time()
    try:
        nb = read_nb(src)
        ExecutedDocs()(nb)
        write_nb(nb, dst)
        return shown(src), time.time() - start, ""
    except Exception:
        return shown(src), time.time() - start, traceback.format_exc()


def copy_site_files(proc: Path):
    "Everything in nbs/ the site needs besides the notebooks (`_quarto.yml`, `nbdev.yml`, pictures in subfolders)."
    nbs = get_config().nbs_path
    files = globtastic(nbs, func=Path, recursive=True, skip_folder_re=r"^[_.]", skip_file_re=r"^[_.]|\.ipynb$")
    for f in files + [nbs / n for n in ("_quarto.yml", "_brand.yml") if (nbs / n).exists()]:
        (proc / f.relative_to(nbs)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, proc / f.relative_to(nbs))


def process_notebooks(only: list[Path], n_workers: int = 2) -> Path:
    "Execute the notebooks into `_proc/` (all of them, or `only` these, keeping the other pages of the last build)."
    refresh_quarto_yml()  # writes nbs/nbdev.yml: site url, output-dir _docs
    proc, nbs = ROOT / "_proc", get_config().nbs_path
    if not only or not proc.exists(): shutil.rmtree(proc, ignore_errors=True)
    proc.mkdir(exist_ok=True)
    copy_site_files(proc)
    todo = [nb.resolve() for nb in only] or sorted(nbglob(nbs, func=Path))
    dst = {nb: proc / nb.relative_to(nbs.resolve()) for nb in todo}  # nbs/api/00_core.ipynb -> _proc/api/00_core.ipynb
    for d in dst.values(): d.parent.mkdir(parents=True, exist_ok=True)
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # a fresh process for each notebook
    results = []
    with ProcessPoolExecutor(min(n_workers, len(todo)), mp_context=multiprocessing.get_context("spawn"), **fresh) as pool:
        for done in as_completed([pool.submit(execute_notebook, nb, dst[nb]) for nb in todo]):
            results.append(done.result())  # not a daemon pool: a notebook may start processes of its own
            name, seconds, error = results[-1]
            print(f"{'FAILED' if error else 'executed'} {name} in {seconds:.0f} s", flush=True)
    print("notebook timings, slowest first:\n" + "\n".join(f"  {t:6.0f} s  {name}" for name, t, _ in
                                                            sorted(results, key=lambda r: -r[1])), flush=True)
    failed = [(name, error) for name, _, error in results if error]
    for name, error in failed: print(f"\n{name} failed:\n{error}", file=sys.stderr)
    if failed: sys.exit(f"build_docs: {len(failed)} notebook(s) failed to run: {', '.join(n for n, _ in failed)}")
    return proc


def render(proc: Path):
    "Render `_proc/` into `_docs/`: with Quarto when it is on PATH (as nbdev_docs does), else with smalldocs."
    shutil.rmtree(proc / "_docs", ignore_errors=True)
    if shutil.which("quarto"): subprocess.run(["quarto", "render", "--no-cache"], cwd=proc, check=True)
    else:
        from smalldocs.cli import main as smalldocs
        if smalldocs(["render", str(proc), "--quiet"]) != 0: sys.exit("smalldocs could not render _proc/")
    shutil.rmtree(DOCS, ignore_errors=True)
    shutil.move(proc / "_docs", DOCS)
    if not shutil.which("quarto"): name_pages_as_nbdev(proc)


def output_file(nb: Path) -> str | None:
    "The `output-file` nbdev put in a processed notebook's front matter (`core.html` for `00_core.ipynb`), if any."
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    front = "".join(cells[0]["source"]) if cells and cells[0]["cell_type"] == "raw" else ""
    m = re.search(r"^output-file:\s*['\"]?([\w.-]+\.html)", front, re.M)
    return m.group(1) if m else None


def site_files(exts=(".html", ".json", ".xml", ".css", ".js")):
    return [p for p in DOCS.rglob("*") if p.is_file() and p.suffix in exts and "katex" not in p.parts]


def name_pages_as_nbdev(proc: Path):
    """smalldocs names a page after its notebook (api/00_core.html); nbdev and Quarto use `output-file` (api/core.html).
    Use nbdev's: rename the pages, then every link to them (a link names the file, in whatever folder it points to)."""
    renamed = {nb.relative_to(proc).with_suffix(".html"): out for nb in proc.rglob("*.ipynb")
               if "_docs" not in nb.relative_to(proc).parts and (out := output_file(nb)) and out != f"{nb.stem}.html"}
    for old, new in renamed.items():
        if (DOCS / old).exists(): (DOCS / old).rename(DOCS / old.with_name(new))
    names = {old.name: new for old, new in renamed.items()}
    if len(names) < len(renamed): sys.exit(f"two notebooks in different folders share a file name: {sorted(renamed)}")
    if not names: return
    pat = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])")
    for f in site_files((".html", ".json", ".xml")):
        text = f.read_text(encoding="utf-8")
        new = pat.sub(lambda m: names[m.group(1)], text)
        if new != text: f.write_text(new, encoding="utf-8")


def katex_dist() -> Path:
    "KaTeX from npm, installed once into the (git-ignored) node_modules/ of the repository."
    pkg = ROOT / "node_modules" / "katex"
    meta = pkg / "package.json"
    if not (meta.exists() and json.loads(meta.read_text())["version"] == KATEX_VERSION):
        if not shutil.which("npm"): sys.exit("npm is needed once to fetch KaTeX for the docs: run `make setup` (or `apt-get install -y npm`)")
        subprocess.run(["npm", "install", "--prefix", str(ROOT), "--no-save", "--no-package-lock", "--no-audit", "--no-fund",
                        "--loglevel=error", f"katex@{KATEX_VERSION}"], check=True)
    return pkg / "dist"


def make_self_contained():
    "KaTeX from the site itself, no external font imports, relative links to our own pages; then check nothing loads from outside."
    cfg = get_config()
    published = cfg.doc_host.rstrip("/") + "/" + cfg.doc_baseurl.strip("/") + "/"
    dist, libs = katex_dist(), DOCS / "site_libs" / "katex"
    shutil.rmtree(libs, ignore_errors=True)
    shutil.copytree(dist / "fonts", libs / "fonts")
    (libs / "contrib").mkdir(parents=True)
    for f in ["katex.min.css", "katex.min.js", "contrib/auto-render.min.js"]: shutil.copy(dist / f, libs / f)
    for f in site_files():
        text = f.read_text(encoding="utf-8")
        up = os.path.relpath(DOCS, f.parent).replace(os.sep, "/") + "/"
        up = "" if up == "./" else up
        new = KATEX_CDN.sub(up + "site_libs/katex/", text)
        new = FONT_IMPORT.sub("", new)
        if f.suffix == ".html": new = new.replace(published, up)
        if new != text: f.write_text(new, encoding="utf-8")
        if f.suffix in (".html", ".css") and (m := EXTERNAL_LOAD.search(new)):
            sys.exit(f"{f.relative_to(ROOT)} still loads from outside the site: {new[m.start():m.end() + 60]!r}")


def main(argv: list[str]):
    "`build_docs.py` builds the whole site; `build_docs.py nbs/api/02_synthetic.ipynb ...` re-runs only those notebooks."
    start = time.time()
    os.chdir(ROOT)
    render(process_notebooks([Path(a) for a in argv]))
    make_self_contained()
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.html") if "site_libs" not in p.parts)
    print(f"docs site in {DOCS.relative_to(ROOT)}/ ({len(pages)} pages: {', '.join(pages)}) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
