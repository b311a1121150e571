"""The reference pages under docs/ build, link and name only what exists (a few seconds).

`mkdocs build --strict` (mkdocs.yml) checks the links between the pages and their anchors, and
docs/hooks.py the links from a page to the repository's other files. The rest is checked here: the
links of the Markdown files mkdocs does not build (README.md, benchmarks/README.md, ...), that every
config key of conf/ is documented, that every code reference of the README and the pages exists,
and that the test list of docs/development.md is the list of test modules.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import ROOT

DOCS = ROOT / "docs"
README = ROOT / "README.md"
SRC = ROOT / "src"


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def tracked_markdown_outside_docs() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True)
    names = out.stdout.split() if out.returncode == 0 else ["README.md", "benchmarks/README.md"]
    return [ROOT / n for n in names if not n.startswith("docs/") and (ROOT / n).is_file()]


def test_the_docs_build_strict_without_a_broken_link(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' (make setup installs it with dev)")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    built = {p.stem for p in (tmp_path / "site").glob("*.html")}
    assert {p.stem for p in pages()} <= built


def test_the_markdown_files_outside_docs_link_to_what_exists():
    """mkdocs builds docs/ alone; README.md, benchmarks/README.md and the experiments' READMEs are
    read as files (on a forge, in a clone): their relative links and anchors are checked here."""
    files = tracked_markdown_outside_docs()
    assert README in files and ROOT / "benchmarks" / "README.md" in files
    broken = [p for f in files for p in hooks.problems(f, ROOT)]
    assert not broken, "\n".join(broken)


def test_a_broken_repository_link_stops_the_build(tmp_path, caplog):
    """What docs/hooks.py does with a page's links that leave docs/: checks them (a missing file or
    anchor is a warning, which `strict: true` turns into a failed build) and points the good ones
    at the repository's file in the built site."""
    docs = tmp_path / "repo" / "docs"
    docs.mkdir(parents=True)
    (tmp_path / "repo" / "NOTES.md").write_text("# Notes\n\n## Known heading\n")
    (docs / "other.md").write_text("# Other\n")
    page = docs / "page.md"
    text = (
        "[ok](../NOTES.md#known-heading) [gone](../MISSING.md) [bad anchor](../NOTES.md#nope) "
        "`[in code](../MISSING.md)` [between pages](other.md)\n"
    )
    page.write_text(text)
    assert [p.split(": ", 1)[1] for p in hooks.problems(page)] == [
        "../MISSING.md: no such file or folder",
        "../NOTES.md#nope: NOTES.md has no heading with the anchor #nope",
    ]
    config = {"docs_dir": str(docs), "config_file_path": str(tmp_path / "repo" / "mkdocs.yml")}
    fake = SimpleNamespace(file=SimpleNamespace(abs_src_path=str(page), src_uri="page.md"))
    with caplog.at_level("WARNING", logger="mkdocs.hooks.repo_links"):
        out = hooks.on_page_markdown(text, fake, config, None)
    assert len(caplog.records) == 2
    assert f"[ok]({hooks.PLACEHOLDER}NOTES.md#known-heading)" in out
    assert "[gone](../MISSING.md)" in out and "(other.md)" in out and "`[in code](../MISSING.md)`" in out
    html = hooks.on_page_content(
        f'<a href="{hooks.PLACEHOLDER}NOTES.md#known-heading">ok</a>',
        SimpleNamespace(file=SimpleNamespace(dest_uri="page.html")),
        {**config, "site_dir": str(tmp_path / "repo" / "site"), "repo_url": None},
        None,
    )
    assert html == '<a href="../NOTES.md#known-heading">ok</a>'


# -- every config key is documented ----------------------------------------------------------------

DICT_KEYS = {  # keys whose value is a mapping of the user's own names, documented as one key
    "eval.benchmarks.num_fewshot",
    "eval.benchmarks.main_metrics",
    "data.source.splits",
    "round_overrides",
    "model.lora",
    "generation.engine_kwargs",
    "hydra.launcher.additional_parameters",
}


def config_keys() -> set[str]:
    """Every key conf/ sets (dotted), but those set to `${...}`, which repeat another key."""
    keys: set[str] = set()

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if key in ("_target_", "_partial_", "defaults"):
                continue
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and value and dotted not in DICT_KEYS:
                walk(value, dotted + ".")
            elif not (isinstance(value, str) and value.startswith("${")):
                keys.add(dotted)

    conf = ROOT / "conf"
    for path in sorted(conf.glob("*/*.yaml")) + sorted(conf.glob("hydra/launcher/*.yaml")):
        group = path.parent.name
        if group in ("experiment", "debug"):  # presets: they set the keys documented below
            continue
        text = path.read_text()
        node = yaml.safe_load(text) or {}
        if "@package _global_" in text:
            prefix = ""
        elif "@package hydra.launcher" in text:
            prefix = "hydra.launcher."
        else:
            prefix = f"{group}."
        walk(node, prefix)
    top = yaml.safe_load((conf / "train.yaml").read_text())
    top.pop("hydra")
    walk(top, "")
    return keys


def test_every_config_key_is_documented():
    keys = config_keys()
    assert {
        "lam",
        "module.on_nonfinite",
        "generation.top_p",
        "eval.benchmarks.tasks",
        "trainer.precision",
    } <= keys
    text = "\n".join(p.read_text() for p in pages())
    spans = set(re.findall(r"`([^`\n]+)`", text))
    named = {w for s in spans for w in re.findall(r"[\w./\[\]-]+", s)}
    missing = sorted(k for k in keys if k not in named)
    assert not missing, f"config keys no docs page names in backticks: {missing}"


# -- every code reference exists -------------------------------------------------------------------


def module_file(dotted: str) -> Path | None:
    base = SRC.joinpath(*dotted.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def defined_names(tree: ast.AST) -> dict[str, ast.AST]:
    names = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id: node for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0]: node for a in node.names}
    return names


def resolve(dotted: str) -> bool:
    """Whether `spinlab.x.y.Name.attr` is a module of src/ followed by names it defines."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:cut]))
        if path is None:
            continue
        node: ast.AST = ast.parse(path.read_text())
        for name in parts[cut:]:
            found = defined_names(node).get(name)
            if found is None:
                return False
            node = found
        return True
    return False


def classes() -> dict[str, ast.ClassDef]:
    found = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                found[node.name] = node
    return found


PATH = re.compile(
    r"^(?:src|tests|conf|benchmarks|experiments|notebooks|docs)/[\w./-]*$"
    r"|^(?:train\.py|mkdocs\.yml|pyproject\.toml|Makefile|\.pre-commit-config\.yaml)$"
)


def code_references(text: str) -> list[str]:
    """What code spans name: `spinlab.` dotted names, repository paths, `Class.method` of spinlab's classes."""
    refs = []
    for span in re.findall(r"`([^`\n]+)`", text):
        refs += [f"mod:{m}" for m in re.findall(r"(?<![\w.$/{:])spinlab(?:\.[A-Za-z_]\w*)+", span)]
        word = span.split("::")[0]
        if PATH.match(word) and not re.search(r"NNN|XXX|<", word):
            refs.append(f"path:{span}")
        elif re.fullmatch(r"[A-Z]\w+\.\w+", span):
            refs.append(f"attr:{span}")
    return refs


def test_every_code_reference_of_the_docs_exists():
    """A module, class, function, file or test renamed or moved shows here, not in a reader's search."""
    known = classes()
    broken = []
    for path in [README, *pages()]:
        for ref in code_references(path.read_text()):
            kind, _, what = ref.partition(":")
            if kind == "mod":
                ok = resolve(what)
            elif kind == "path":
                file, _, test = what.partition("::")
                ok = (ROOT / file).exists()
                if ok and test:
                    ok = test in defined_names(ast.parse((ROOT / file).read_text()))
            else:
                name, attr = what.split(".")
                ok = name not in known or attr in defined_names(known[name])
            if not ok:
                broken.append(f"{path.relative_to(ROOT)}: `{what}`")
    assert not broken, "code references that do not exist:\n" + "\n".join(broken)


# -- the test list of docs/development.md ----------------------------------------------------------


def test_every_test_module_has_its_line_in_the_development_page():
    text = (DOCS / "development.md").read_text()
    listed = re.findall(r"^- `tests/(test_\w+\.py)`: \S", text, flags=re.MULTILINE)
    modules = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert len(listed) == len(set(listed)), "a test module listed twice"
    assert sorted(listed) == modules, (
        f"docs/development.md, 'What each test module proves': missing {sorted(set(modules) - set(listed))}, "
        f"no such module {sorted(set(listed) - set(modules))}"
    )


# -- the README: short, the two commands first, every page linked ------------------------------------


def test_the_readme_starts_with_the_two_commands_and_links_every_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: reference material goes to docs/"
    head = "\n".join(lines[:40])
    assert "make demo" in head and "make test" in head
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README.read_text()))
    assert {p.name for p in pages()} - {"index.md"} <= linked
