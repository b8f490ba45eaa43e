"""The book speaks of its subject, and its markdown says what its author typed.

- Control characters in markdown are a LaTeX backslash lost to a Python escape (`\\approx` written without a raw string
  gives BEL + "pprox"); a line break inside inline maths followed by `e`, `u`, `abla`, ... is a `\\ne`, `\\nu`,
  `\\nabla` lost the same way.
- Headings are plain words or Unicode (ε, not `$\\varepsilon$`): the table of contents shows them raw.
- Markdown, and the strings and comments of code cells, say nothing about how the project is run (owners, tickets,
  sessions, earlier attempts, goals met or missed, numbered findings), about files outside the repository, or about the
  machine a chapter happened to run on (that is the Performance page's subject).

Each pattern is tested on sentences it must catch and on subject sentences it must leave alone.
"""
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
NOTEBOOKS = sorted(p for p in NBS.rglob("*.ipynb") if not any(part.startswith((".", "_")) for part in p.relative_to(NBS).parts))

CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # all but newline; a tab is \t of \theta, \tau, \times ...
DISPLAY_MATH = re.compile(r"\$\$.*?\$\$", re.S)
INLINE_MATH = re.compile(r"(?<![\\$])\$(?!\$)([^$]+?)\$")
HEADING_WITH_TEX = re.compile(r"^#{1,6} .*(?:\$|\\[A-Za-z]+)", re.M)
LOST_N_COMMAND = re.compile(r"\n(?:e|eq|eg|abla|u|ot|otin|ewline|orm|i|mid|leq|geq)(?![A-Za-z])")

PROCESS = {  # what the pattern is about: the pattern (case-insensitive unless it says (?-i))
    "owners": r"\b(?:module|chapter|notebook|file)'?s owner\b|\bowner of (?:this|the) (?:module|chapter|notebook|file)\b"
              r"|(?-i:\bH_(?:docs|train|models|attacks|cli|exp|launch|lead)\b)|\bthe lead(?: engineer| developer)?\b(?! to\b)",
    "tickets": r"\b(?:issue|ticket)s? ?#?\d+\b|\bthe (?:issue|ticket)'?s\b|\b(?:this|that|an?|the|our) ticket\b"
               r"|\bgithub issue\b|\bfiled (?:an? |the )?(?:issue|ticket)\b|\breported to the\b",
    "sessions": r"\b(?:earlier|previous|later|last|this|next|another|an?) (?:work )?session\b(?! of training)",
    "earlier attempts": r"\b(?:earlier|previous) attempts?\b|\bthis project (?:found|tried|did|first)\b"
                        r"|\bof this project\b|\bwe (?:first|earlier|previously) (?:tried|attempted)\b"
                        r"|\b(?:an|the) (?:earlier|previous|old) version of this (?:book|chapter|notebook|package)\b",
    "goals": r"\bgoals? (?:met|missed|set|reached|achieved)\b|\b(?:met|missed|reached) (?:the|its|our) (?:goal|target)s?\b"
             r"|(?-i:\bMISSED\b)|\bacceptance (?:line|criterion|criteria)\b",
    "findings": r"(?-i:\bfindings? F\d+\b)|(?-i:\(F\d+\))",
    "files outside": r"(?<![/\w])shared/|\bcpu[-_]study\b|\bpaper[- ]notes\b|/work/|\bnotes/issue|\bour (?:working )?notes\b",
    "this machine": r"\bon this (?:laptop|box|\d+-core|two-core)\b|\bEPYC\b|\bthis (?:\d+|two)-core\b"
                    r"|\b(?:s|seconds?|min|minutes?|hours?)\b[^.\n]{0,30}\bon this machine\b|\bon this machine,? (?:it )?(?:takes|took|runs|ran)\b"
                    r"|\bsmall shared machines?\b",
}
PROCESS_RE = {k: re.compile(v, re.I) for k, v in PROCESS.items()}
MACHINE_PAGES = {"explanations/performance.ipynb"}  # the machine is the Performance page's subject

CATCH = [  # (kind, a sentence the pattern must catch)
    ("owners", "Ask the module's owner before changing it."), ("owners", "as H_train wrote in 06"),
    ("owners", "reported to the lead"), ("owners", "the lead engineer decides"),
    ("tickets", "as issue 10 asks"), ("tickets", "see ticket #4"), ("tickets", "the issue's text says so"),
    ("tickets", "filed an issue about it"), ("tickets", "this ticket covers the search"),
    ("sessions", "an earlier session measured 3 s"), ("sessions", "in the previous session we saw"),
    ("earlier attempts", "an earlier attempt used SGD"), ("earlier attempts", "this project found a gap of 2"),
    ("earlier attempts", "the first CPU study of this project"), ("earlier attempts", "we first tried Adam"),
    ("goals", "goal met: 2x faster"), ("goals", "goals missed"), ("goals", "speed: MISSED"),
    ("goals", "we reached the target"), ("goals", "the acceptance criteria"),
    ("findings", "finding F9"), ("findings", "clear errors (findings F1, F2)"), ("findings", "a fix (F3)"),
    ("files outside", "see shared/paper-notes.md"), ("files outside", "in the cpu-study runs"),
    ("files outside", "in the words of our paper notes"), ("files outside", "/work/notes/issue10.md"),
    ("this machine", "about 15 s on this 2-core EPYC"), ("this machine", "on this machine it takes 3 s"),
    ("this machine", "each costs 10 to 30 minutes on this machine"), ("this machine", "built on small shared machines"),
]
LEAVE = [  # subject sentences no pattern may catch
    "The point at issue is whether CAS falls.", "An issue of scale: 300 images are few.",
    "The owner of the weights is the head W.", "A training session of 200 epochs on a GPU.",
    "Robust overfitting: the model misses the adversarial examples it once fit.", "The goal of the adversary is to flip the label.",
    "Findings of Rice et al. show a gap of 8 points.", "The first attempt of PGD starts at a random point.",
    "Lead times: the learning rate decays at epoch 100.", "f(x) = W g(x) + b with H_out channels",
    "shared features are used by several classes", "notes on the proof", "we found a gap of 5 points",
    "The machine learning model on a 2-core CPU runs in 3 s.", "this project's README names the command",
    "a pool of fresh processes on this machine", "crossclass reproduce --data /shared/data --out /shared/studies/x",
]


def page(nb: Path) -> str:
    "A notebook's path under nbs/, as the sidebar names it: `api/00_core.ipynb`."
    return nb.relative_to(NBS).as_posix()


def cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell.get("source", []))


def markdown_defects(text: str) -> list[str]:
    "Control characters, and `\\n`-commands of LaTeX turned into a line break inside inline maths."
    found = [f"control character {c!r}" for c in CONTROL.findall(text)]
    found += [f"LaTeX in a heading (the table of contents shows it raw): {h!r}" for h in HEADING_WITH_TEX.findall(text)]
    for m in INLINE_MATH.finditer(DISPLAY_MATH.sub("", text)):
        if LOST_N_COMMAND.search(m.group(1)): found.append(f"a line break inside ${m.group(1)!r}$ (a lost \\n command?)")
    return found


def strings_and_comments(code: str) -> str:
    "The string literals and comments of a code cell (cell directives `#|` left out), one per line."
    try: tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError): return code  # not Python (a magic, a shell cell): all of it
    keep = [t.string for t in tokens if t.type == tokenize.STRING or (t.type == tokenize.COMMENT and not t.string.startswith("#|"))]
    keep += [t.string for t in tokens if getattr(tokenize, "FSTRING_MIDDLE", None) == t.type]
    return "\n".join(keep)


def process_remarks(text: str, page: str = "") -> list[tuple[str, str]]:
    "(kind, the words around it) for every remark about how the project is run in `text`."
    hits = []
    for kind, pattern in PROCESS_RE.items():
        if kind == "this machine" and page in MACHINE_PAGES: continue
        hits += [(kind, text[max(0, m.start() - 40):m.end() + 40].replace("\n", " ")) for m in pattern.finditer(text)]
    return hits


@pytest.mark.parametrize("kind,sentence", CATCH)
def test_pattern_catches(kind, sentence):
    assert kind in {k for k, _ in process_remarks(sentence)}, f"{kind!r} does not catch {sentence!r}"


@pytest.mark.parametrize("sentence", LEAVE)
def test_pattern_leaves_the_subject_alone(sentence):
    assert not process_remarks(sentence), f"{sentence!r} is the subject, not the project"


def test_markdown_checks_catch_the_known_defects():
    assert markdown_defects("a \x07pprox b")                      # BEL of \approx
    assert markdown_defects("if $b \ne 0$ then")                  # \ne as a line break
    assert markdown_defects("$\nabla f$ and $\nu$")
    assert markdown_defects("\\theta as a tab: $\theta$")
    assert not markdown_defects("if $b \\ne 0$ then $\\nabla f$")  # what was meant
    assert not markdown_defects("$a +\nb$ and\n$$\nu = 1\n$$")     # a wrapped formula; display maths
    assert not markdown_defects("costs $5 and\nearns $6")           # dollars that are not maths, across a line
    assert markdown_defects("### Across $\\varepsilon$") and markdown_defects("## Below \\varepsilon_0")
    assert not markdown_defects("### Across ε\n\nwith $\\varepsilon$ in the text") and not markdown_defects("# Title")


def test_strings_and_comments_are_read_from_code():
    code = '#| export\nx = f("see shared/notes")  # finding F3\ny = 2\n'
    assert strings_and_comments(code).splitlines() == ['"see shared/notes"', "# finding F3"]
    assert [k for k, _ in process_remarks(strings_and_comments(code))] == ["findings", "files outside"]
    assert not process_remarks(strings_and_comments("shared_dir = 1  # the shared features\n"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=page)
def test_markdown_has_no_control_characters_or_lost_latex(nb):
    bad = [f"cell {i}: {d}" for i, c in enumerate(cells(nb)) if c["cell_type"] == "markdown"
           for d in markdown_defects(source(c))]
    assert not bad, f"{page(nb)}: a LaTeX backslash lost to a Python escape? Write the markdown with a raw string.\n" + "\n".join(bad)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=page)
def test_book_speaks_of_its_subject(nb):
    hits = []
    for i, c in enumerate(cells(nb)):
        text = source(c) if c["cell_type"] == "markdown" else strings_and_comments(source(c))
        hits += [f"cell {i} ({kind}): ...{words}..." for kind, words in process_remarks(text, page(nb))]
    assert not hits, f"{page(nb)} talks about the project or the machine, not the subject:\n" + "\n".join(hits)


def test_thread_count_is_set_in_one_place_at_most():
    "`torch.set_num_threads` in a notebook's own (not exported) cells: in one notebook at most."
    calls = [page(nb) for nb in NOTEBOOKS
             if any(c["cell_type"] == "code" and "torch.set_num_threads(" in source(c) and "#| export" not in source(c)
                    for c in cells(nb))]
    assert len(calls) <= 1, f"torch.set_num_threads is called in {len(calls)} notebooks: {calls}; keep it in one place"
