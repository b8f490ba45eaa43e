"""Build the docs site into `_docs/`, a site that works with no network.

With Quarto on PATH this is `nbdev_docs`. Without it (Quarto cannot be installed on our machines) it builds the same
site offline: nbdev's own notebook processing (`_proc/`, with the show_doc output), then the pure-Python renderer
`smalldocs`. Either way the site is then made self-contained: KaTeX is served from the site itself, external font
imports are dropped, and links to the published docs become relative links.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "_docs"
KATEX_VERSION = "0.16.11"
KATEX_CDN = re.compile(r"https://cdn\.jsdelivr\.net/npm/katex@[^/\"']*/dist/")
FONT_IMPORT = re.compile(r"@import\s+url\(\s*[\"']?https?://[^)]*\)\s*;?")
EXTERNAL_LOAD = re.compile(r"""(?:\bsrc=["']|<link[^>]*rel=["'](?:stylesheet|preload|modulepreload)["'][^>]*href=["']|url\(\s*["']?|@import\s+["'])(https?:)?//""")


def build_with_quarto():
    "Quarto is here: `nbdev_docs` does it all. It also rewrites README.md, which scripts/make_readme.py owns: keep ours."
    readme = ROOT / "README.md"
    kept = readme.read_bytes() if readme.exists() else None
    try: subprocess.run([str(Path(sys.executable).parent / "nbdev_docs")], cwd=ROOT, check=True)
    finally:
        if kept is not None: readme.write_bytes(kept)


def build_offline():
    "nbdev's notebook processing into `_proc/`, then smalldocs renders `_proc/` into `_docs/`."
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.serve import proc_nbs
    from smalldocs.cli import main as smalldocs

    refresh_quarto_yml()  # writes nbs/nbdev.yml: site url, output-dir _docs
    proc = ROOT / "_proc"
    if proc.exists():  # a notebook deleted from nbs/ must not keep its page
        for nb in proc.glob("*.ipynb"):
            if not (ROOT / "nbs" / nb.name).exists(): nb.unlink()
    try: proc_nbs(n_workers=0)  # executes the exported, show_doc, import and exec_doc cells; cached by modification time
    except Exception:
        print("\nbuild_docs: nbdev's docs processing failed in the notebook named below. It runs every cell that exports,\n"
              "calls show_doc, has #| exec_doc, or contains an import: keep imports in cells of their own.\n", file=sys.stderr)
        raise
    shutil.rmtree(proc / "_docs", ignore_errors=True)
    if smalldocs(["render", str(proc), "--quiet"]) != 0: sys.exit("smalldocs could not render _proc/")
    shutil.rmtree(DOCS, ignore_errors=True)
    shutil.move(proc / "_docs", DOCS)
    name_pages_as_nbdev(proc)


def output_file(nb: Path) -> str | None:
    "The `output-file` nbdev put in a processed notebook's front matter (`core.html` for `00_core.ipynb`), if any."
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    front = "".join(cells[0]["source"]) if cells and cells[0]["cell_type"] == "raw" else ""
    m = re.search(r"^output-file:\s*['\"]?([\w.-]+\.html)", front, re.M)
    return m.group(1) if m else None


def site_files(exts=(".html", ".json", ".xml", ".css", ".js")):
    return [p for p in DOCS.rglob("*") if p.is_file() and p.suffix in exts and "katex" not in p.parts]


def name_pages_as_nbdev(proc: Path):
    "smalldocs names a page after its notebook (00_core.html); nbdev and Quarto use `output-file` (core.html). Use nbdev's."
    names = {f"{nb.stem}.html": out for nb in proc.glob("*.ipynb") if (out := output_file(nb)) and out != f"{nb.stem}.html"}
    for old, new in names.items():
        if (DOCS / old).exists(): (DOCS / old).rename(DOCS / new)
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
    from nbdev.config import get_config
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


def main():
    start = time.time()
    os.chdir(ROOT)
    if shutil.which("quarto"): build_with_quarto()
    else: build_offline()
    make_self_contained()
    pages = sorted(p.name for p in DOCS.glob("*.html"))
    print(f"docs site in {DOCS.relative_to(ROOT)}/ ({len(pages)} pages: {', '.join(pages)}) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
