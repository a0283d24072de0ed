"""README.md and docs/*.md stay one connected, non-repeating manual: every relative link and #anchor resolves (GitHub's
heading slugs), the README's quick start stays the set-up + demo + CI test command, each method page keeps the
common headings, and no prose paragraph is said twice (copies of README sections once drifted). Pure text: well
under a second."""
import functools
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# files whose comments point at the manual: a `docs/<page>.md[#anchor]` in them must resolve too
POINTERS = [*ROOT.glob("*.py"), *(ROOT / "docs").glob("*.py"), *(ROOT / "docs").glob("*.sh"),
            *(ROOT / "tests").glob("*.py"), ROOT / ".ci" / "run"]

# The quick start, exactly: one install line, the digits demo, then the command CI runs (.ci/run's last line).
INSTALL = "pip install -r requirements.txt"
DEMO = ["python3 resa.py --preset digits --output-dir runs/digits_resa && python3 probe.py runs/digits_resa"
        " && python3 monitor.py runs/digits_resa"]
TEST_COMMAND = 'python3 -m pytest -q -m "not slow"'

# Every method page has these second-level headings, in this order (CleanRL's one page per algorithm), and
# these third-level ones under Usage and Results: where a reader (and a new flag's documentation) looks.
METHOD_PAGES = ["excb.md", "resa.md", "simclr_nscl.md"]
METHOD_H2 = ["Usage", "Logged metrics", "Implementation details", "Deviations", "Results", "Tests"]
METHOD_H3 = {"Usage": {"Commands", "Presets", "Outputs"}, "Results": {"Measured"}}

README_MAX_LINES = 300  # the front page (issue 14: about 250); details belong on a docs/ page
MIN_REPEAT = 100  # characters: a repeated paragraph or list item at least this long is a second copy of a fact

FENCE = re.compile(r"^ {0,3}(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), images too
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")  # [label]: target
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")


def slug(text):
    """GitHub's anchor for a heading: the rendered text (links -> their text, code -> its content), lowercased,
    every character that is not a letter, digit, '_', '-' or space dropped, each space -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(headings):
    """Slugs of a page's headings in order, duplicates numbered as GitHub does: x, x-1, x-2, ..."""
    seen, out = {}, set()
    for _, text in headings:
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


@functools.lru_cache(maxsize=None)
def parse(path):
    """(headings [(level, text)], links [(line number, target)], prose blocks [(line number, text)], fenced code
    blocks [(heading above it, code)]) of a markdown file; nothing inside fenced code counts as markdown."""
    headings, links, blocks, code_blocks = [], [], [], []
    in_code, code, block, block_line = False, [], [], 0

    def end_block():
        if block:
            blocks.append((block_line, block[:]))
            block.clear()

    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            end_block()
            if in_code:
                code_blocks.append((headings[-1][1] if headings else "", "\n".join(code)))
            in_code, code = not in_code, []
            continue
        if in_code:
            code.append(line)
            continue
        plain = CODE_SPAN.sub("code", line)  # a link written inside `code` is not a link
        links += [(i, m.group(1)) for m in LINK.finditer(plain)]
        if m := REF_DEF.match(plain):
            links.append((i, m.group(1)))
        if m := HEADING.match(line):
            end_block()
            headings.append((len(m.group(1)), m.group(2)))
        elif not line.strip():
            end_block()
        else:
            if not block:
                block_line = i
            block.append(line)
    end_block()
    return headings, links, blocks, code_blocks


def broken_links(path):
    """Every relative link of a markdown file whose file or #anchor does not exist, as 'file:line: target'."""
    path = Path(path)
    bad = []
    for line, target in parse(path)[1]:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}: {target}"
        if not dest.is_relative_to(ROOT) and path.is_relative_to(ROOT):
            bad.append(where + " (outside the repository)")
        elif not dest.exists():
            bad.append(where + " (no such file)")
        elif anchor:
            if dest.suffix == ".md":
                if unquote(anchor) not in anchors(parse(dest)[0]):
                    bad.append(where + " (no such heading)")
            elif not re.fullmatch(r"L\d+(-L\d+)?", anchor):
                bad.append(where + " (anchor into a file that is not markdown)")
    return bad


def test_slug_follows_githubs_rules():
    assert slug("Computational overhead (in the form of ReSA's Table 4)") == \
        "computational-overhead-in-the-form-of-resas-table-4"
    assert slug("ExCB: Explicit Cluster Balancing (`excb.py`)") == "excb-explicit-cluster-balancing-excbpy"
    assert slug("The `simclr_nscl.py` [page](x.md)") == "the-simclr_nsclpy-page"
    assert slug("a - b") == "a---b"
    assert anchors([(2, "Tests"), (3, "Tests"), (2, "Tests")]) == {"tests", "tests-1", "tests-2"}


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "b.md").write_text("# Present heading\n\n## Tests\n\n## Tests\n")
    (tmp_path / "a.md").write_text(
        "# A\n\n[ok](b.md#present-heading) [ok](b.md#tests-1) [ok](#a) ![ok](b.md) [web](https://x.org/y)\n"
        "[gone](c.md) [bad anchor](b.md#absent) ![gone](figures/x.png) [here](#nowhere)\n\n"
        "```\n[not a link](missing.md)\n```\n`[not a link](missing.md)`\n")
    bad = broken_links(tmp_path / "a.md")
    assert [b.split(": ", 1)[1] for b in bad] == [
        "c.md (no such file)", "b.md#absent (no such heading)", "figures/x.png (no such file)",
        "#nowhere (no such heading)"]


def test_every_relative_link_and_anchor_resolves():
    bad = [b for page in PAGES for b in broken_links(page)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_code_pointers_to_the_manual_resolve():
    bad, stale = [], []
    for f in POINTERS:
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            for target in re.findall(r"\bdocs/[\w.-]+\.md(?:#[\w-]+)?", line):
                page, _, anchor = target.partition("#")
                if not (ROOT / page).is_file() or (anchor and anchor not in anchors(parse(ROOT / page)[0])):
                    bad.append(f"{f.relative_to(ROOT)}:{i}: {target}")
            if re.search(r"\bREADME(\.md)?,? section\b|\bREADME \"", line):
                stale.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "pointers to missing docs pages or headings:\n" + "\n".join(bad)
    assert not stale, "point at the file's docs/<file>.md page, not at README sections:\n" + "\n".join(stale)


def test_readme_quick_start_is_setup_demo_and_the_ci_test_command():
    heading, code = parse(README)[3][0]  # the first fenced block of the README
    assert heading == "Quick start", f"the README's first command block sits under {heading!r}"
    commands = [re.sub(r"\s+#\s.*$", "", line).strip() for line in code.splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    assert INSTALL in commands[0], commands
    assert commands[1:-1] == DEMO, commands
    assert commands[-1] == TEST_COMMAND, commands
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == TEST_COMMAND, "the README's test command must be exactly what .ci/run runs"
    assert any("-r requirements.txt" in line for line in ci), ".ci/run must install requirements.txt"


def test_method_pages_share_headings_and_are_one_click_from_the_readme():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines: move details to the file's docs/ page"
    readme_links = {target for _, target in parse(README)[1]}
    for page in (ROOT / "docs").glob("*.md"):
        assert any(t.split("#")[0] == f"docs/{page.name}" for t in readme_links), f"README does not link {page.name}"
    for name in METHOD_PAGES:
        headings = parse(ROOT / "docs" / name)[0]
        assert [t for level, t in headings if level == 2] == METHOD_H2, name
        under, h3 = None, {}
        for level, text in headings:
            if level == 2:
                under = text
            elif level == 3:
                h3.setdefault(under, set()).add(text)
        for h2, wanted in METHOD_H3.items():
            assert wanted <= h3.get(h2, set()), f"{name}: {h2} lacks {wanted - h3.get(h2, set())}"
        for anchor in ("usage", "deviations"):  # commands + presets live under Usage
            assert f"docs/{name}#{anchor}" in readme_links, f"README does not link docs/{name}#{anchor}"


def test_no_paragraph_is_said_twice():
    """Prose paragraphs and list items (not tables, code, images or headings) of README.md and docs/*.md."""
    seen, repeats = {}, []
    for page in PAGES:
        for line, block in parse(page)[2]:
            if block[0].lstrip().startswith(("|", "![")) or block[0].startswith("    "):
                continue
            items, item = [], []
            for text in block:  # a list is one block; compare its items one by one
                if LIST_ITEM.match(text) and item:
                    items.append(item)
                    item = []
                item.append(text)
            items.append(item)
            for item in items:
                key = " ".join(" ".join(item).split())
                if len(key) < MIN_REPEAT:
                    continue
                where = f"{page.relative_to(ROOT)}:{line}"
                if key in seen:
                    repeats.append(f"{where} repeats {seen[key]}: {key[:90]}...")
                else:
                    seen[key] = where
    assert not repeats, "\n".join(repeats)
