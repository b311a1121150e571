"""mkdocs hook (mkdocs.yml `hooks:`): links from a docs page to the repository's other files.

The pages link to code, configs and other READMEs by relative path (`../benchmarks/README.md`,
`../conf/train.yaml`), which works wherever the pages are read as files: on a forge, in an editor,
in a clone. mkdocs resolves only links between the pages of docs/, and under `strict: true` stops
on any other. This hook checks each link that leaves docs/ (the file or folder must exist in the
repository; a `#anchor` must be a heading of the Markdown file it names) and reports a broken one
as a warning, which stops a strict build. In the built site the link then points at the file:
under `repo_url` when mkdocs.yml sets one, else relative to the page, so that a site built inside
the clone (the default `site/`) opens the repository's own files.

`problems()` is the same check for any Markdown file; tests/test_docs.py runs it on README.md and
benchmarks/README.md, which mkdocs does not build.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.repo_links")

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
PLACEHOLDER = "spinlab-repo:"  # a scheme mkdocs leaves alone; replaced in the page's HTML


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def blank_code(line: str) -> str:
    """The line with its code spans blanked out (same length), where no link is read."""
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def links_in(line: str):
    """(start, end, target) of each Markdown link of a line outside its code spans."""
    for match in LINK.finditer(blank_code(line)):
        yield match.start(1), match.end(1), line[match.start(1) : match.end(1)]


def is_relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")))


def github_slug(heading: str) -> str:
    """A heading's anchor as GitHub (and mkdocs' toc, for the plain headings these pages use) makes it."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(text: str):
    """(line number, link target) of every relative link outside code: no scheme, not `#...` or `/...`."""
    for number, line in prose_lines(text):
        for _, _, target in links_in(line):
            if is_relative(target):
                yield number, target


def problem(source: Path, target: str) -> str | None:
    """What is wrong with a relative link from the file `source`, or None."""
    path, _, anchor = target.partition("#")
    resolved = Path(os.path.normpath(source.parent / path))
    if not resolved.exists():
        return f"{target}: no such file or folder"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"{target}: {resolved.name} has no heading with the anchor #{anchor}"
    return None


def problems(source: Path, repo: Path | None = None) -> list[str]:
    """Broken relative links of a Markdown file, as `file:line: target: why`. With `repo`, a link
    that leaves the repository is one too."""
    found = []
    for number, target in relative_links(source.read_text(encoding="utf-8")):
        why = problem(source, target)
        if why is None and repo is not None:
            resolved = Path(os.path.normpath(source.parent / target.partition("#")[0]))
            if not resolved.is_relative_to(repo):
                why = f"{target}: outside the repository"
        if why:
            found.append(f"{source}:{number}: {why}")
    return found


# -- mkdocs events ------------------------------------------------------------------------------


def _outside_docs(page, config, target: str) -> Path | None:
    """The repository path a relative link of `page` names when it leaves docs/, else None."""
    path = target.partition("#")[0]
    if not path:
        return None
    source = Path(page.file.abs_src_path)
    resolved = Path(os.path.normpath(source.parent / path))
    docs = Path(config["docs_dir"]).resolve()
    return None if resolved.is_relative_to(docs) else resolved


def on_page_markdown(markdown: str, page, config, files) -> str:
    repo = Path(config["config_file_path"]).resolve().parent
    source = Path(page.file.abs_src_path)

    def rewrite(target: str) -> str:
        if not is_relative(target):
            return target
        resolved = _outside_docs(page, config, target)
        if resolved is None:
            return target  # a link between pages: mkdocs checks it
        why = problem(source, target)
        if why is None and not resolved.is_relative_to(repo):
            why = f"{target}: outside the repository"
        if why:
            log.warning("Doc file '%s' links to %s", page.file.src_uri, why)
            return target
        anchor = target.partition("#")[2]
        return f"{PLACEHOLDER}{resolved.relative_to(repo).as_posix()}" + (f"#{anchor}" if anchor else "")

    lines = markdown.splitlines(keepends=True)
    prose = {number - 1 for number, _ in prose_lines(markdown)}
    for i in sorted(prose):
        line = lines[i]
        for start, end, target in reversed(list(links_in(line))):
            line = line[:start] + rewrite(target) + line[end:]
        lines[i] = line
    return "".join(lines)


def on_page_content(html: str, page, config, files) -> str:
    repo = Path(config["config_file_path"]).resolve().parent
    repo_url = (config.get("repo_url") or "").rstrip("/")
    page_dir = Path(config["site_dir"]).resolve() / Path(page.file.dest_uri).parent

    def href(match: re.Match) -> str:
        rel, _, anchor = match.group(1).partition("#")
        if repo_url:
            url = f"{repo_url}/blob/main/{rel}"
        else:
            url = Path(os.path.relpath(repo / rel, page_dir)).as_posix()
        return f'href="{url}{"#" + anchor if anchor else ""}"'

    return re.sub(rf'href="{re.escape(PLACEHOLDER)}([^"]*)"', href, html)
