"""README.md and docs/*.md stay true to the code: every relative link (and #anchor) leads somewhere, every
repository path named in backticks exists, and every command-line option they name is one the command
accepts — ``--section.field`` against lgrpo's config, the other CLIs' options against their own argparse
parsers (captured, not hard-coded), torchrun's against torch's, and the few options of foreign tools
(pip, pytest, SLURM) against a short list here."""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import re
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Options of tools that are not ours, as the pages use them. Checked by name only.
FOREIGN = {
    "pip": {"--no-build-isolation", "--no-deps", "--upgrade", "-e", "-q"},
    "pytest": {"--benchmark-only", "--benchmark-json", "-q", "-m", "-k"},
    "sbatch": {"--signal"},
}
# How the pages write the form of an option rather than one option.
PLACEHOLDERS = {"--section.field", "--SECTION.FIELD"}


# --- what the commands accept ---------------------------------------------------------------------------


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of its subcommands' parsers."""
    out = set()
    for action in parser._actions:
        out.update(s for s in action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _options(sub)
    return out


def _captured_parser(main, argv: list[str]) -> set[str]:
    """The options of the parser ``main(argv)`` builds: it is stopped at its first parse_args."""

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
        try:
            main(argv)
        except _Captured as got:
            return _options(got.parser)
    raise AssertionError(f"{main.__module__}.main({argv}) parsed no arguments")


def _train_options() -> set[str]:
    from lgrpo.config import option_names
    from lgrpo.plan import PLAN_FLAGS

    return {"--" + name for name in option_names()} | {"--preset", "--config", "--help", "-h", *PLAN_FLAGS}


def _module_main(module: str):
    return importlib.import_module(module).main


def _script_main(path: str):
    spec = importlib.util.spec_from_file_location(f"_docs_{Path(path).stem}", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@functools.cache
def accepted(command: str) -> frozenset[str]:
    """The options ``command`` accepts: a module (``lgrpo.eval``, ``lgrpo.judge eval-rank``), a script
    (``bench/bench_rollout.py``), ``torchrun``, or a foreign tool of FOREIGN."""
    if command in FOREIGN:
        return frozenset(FOREIGN[command])
    if command == "lgrpo.train":
        return frozenset(_train_options())
    if command == "torchrun":
        from torch.distributed.run import get_args_parser

        parser = get_args_parser()
        return frozenset(_options(parser) | {o.replace("_", "-") for o in _options(parser)}
                         | {o.replace("-", "_") for o in _options(parser)})
    module, _, sub = command.partition(" ")
    main = _script_main(module) if module.endswith(".py") else _module_main(module)
    return frozenset(_captured_parser(main, [sub] if sub else []))


COMMANDS = ["lgrpo.train", "lgrpo.eval", "lgrpo.data", "lgrpo.judge", "lgrpo.judge eval-rank",
            "lgrpo.experiments.listener"]


@functools.cache
def every_lgrpo_option() -> frozenset[str]:
    """Options named outside a command line (in prose) must belong to some lgrpo command or a benchmark."""
    names = set()
    for command in COMMANDS + [str(p.relative_to(ROOT)) for p in sorted((ROOT / "bench").glob("bench_*.py"))]:
        names |= accepted(command)
    return frozenset(names | accepted("torchrun") | set().union(*FOREIGN.values()))


# --- what the pages say ---------------------------------------------------------------------------------

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`\n]+)`")
OPTION = re.compile(r"(?<![\w/-])(--[a-zA-Z][\w-]*(?:\.[\w-]+)*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_PATH = re.compile(r"^(?:lgrpo|kernels|bench|tests|tools|csrc|docs)/(?:[\w.-]+/)*(?:[\w-]+\.\w+)?$")


def command_of(text: str) -> str | None:
    """The command a line of shell runs, as ``accepted`` names it (None: not one we check per command)."""
    words = text.replace("\\\n", " ").split()
    if words and words[0] == "torchrun":
        return "torchrun"
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            module = words[i + 1]
            if module == "pytest":
                return "pytest"
            if module == "pip":
                return "pip"
            if module.startswith("lgrpo"):
                if module == "lgrpo.judge" and i + 2 < len(words) and words[i + 2] == "eval-rank":
                    return "lgrpo.judge eval-rank"
                return module
        if re.fullmatch(r"(\./)?bench/bench_\w+\.py", word):
            return word.removeprefix("./")
        if word in ("pytest", "pip", "sbatch"):
            return word
    return None


def shell_lines(text: str) -> list[str]:
    """Lines of the fenced shell blocks (continuations joined) and inline code spans."""
    lines = []
    for block in FENCE.finditer(text):
        body = block.group(1)
        if block.group(0).startswith(("```python", "```json")):
            continue
        lines += [line.split("#")[0] for line in body.replace("\\\n", " ").splitlines()]
    prose = FENCE.sub("", text)
    lines += INLINE.findall(prose)
    return lines


def option_problems(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    rel = page.relative_to(ROOT)
    problems = []
    seen_in_commands = set()
    for line in shell_lines(text):
        command = command_of(line)
        if command is None:
            continue
        if command == "torchrun" and "-m lgrpo.train" in line:  # torchrun's options, then lgrpo.train's
            head, _, tail = line.partition("-m lgrpo.train")
            checks = [("torchrun", head), ("lgrpo.train", tail)]
        else:
            checks = [(command, line)]
        for cmd, part in checks:
            for option in OPTION.findall(part):
                seen_in_commands.add(option)
                if option not in accepted(cmd):
                    problems.append(f"{rel}: {option} is not an option of {cmd} (in: {line.strip()})")
    for option in OPTION.findall(FENCE.sub("", text)):  # prose: some command must accept it
        if option in seen_in_commands or option in PLACEHOLDERS:
            continue
        if "." in option and option not in accepted("lgrpo.train"):
            problems.append(f"{rel}: {option} is not an lgrpo.train option (python -m lgrpo.train --help)")
        elif "." not in option and option not in every_lgrpo_option():
            problems.append(f"{rel}: {option} is no option of any lgrpo command, benchmark or torchrun")
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    found, counts = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.MULTILINE):
        base = slug(heading)
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def link_problems(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    prose = FENCE.sub("", text)
    rel = page.relative_to(ROOT)
    problems = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{rel}: link to {target}: {path} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{rel}: link to {target}: {dest.name} has no heading #{anchor}")
    for span in INLINE.findall(prose):
        path = span.split("::")[0].rstrip(",.:;")
        if REPO_PATH.match(path) and not (ROOT / path).exists():
            problems.append(f"{rel}: `{span}` names {path}, which does not exist")
    return problems


# --- the tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links(page):
    assert link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_options(page):
    assert option_problems(page) == []


def test_checks_catch_mistakes(tmp_path):
    """A broken link, a missing anchor, a misspelt option, an option of the wrong command: each reported."""
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "bad.md"
    page.write_text("# Title\n\n[a](missing.md) [b](#no-such-heading) [c](#title)\n\n"
                    "```bash\npython -m lgrpo.train --loss.betta 0.1\npython -m lgrpo.eval --jobs 3\n```\n"
                    "Prose: `--rollout.group_sise 8`, `--no-such-flag`.\n", encoding="utf-8")
    with mock.patch(f"{__name__}.ROOT", tmp_path):
        links = link_problems(page)
        options = option_problems(page)
    assert len(links) == 2 and "missing.md" in links[0] and "#no-such-heading" in links[1]
    assert any("--loss.betta" in p for p in options)
    assert any("--jobs is not an option of lgrpo.eval" in p for p in options)
    assert any("--rollout.group_sise" in p for p in options)
    assert any("--no-such-flag" in p for p in options)
    assert len(options) == 4


def test_every_page_is_linked():
    """Each docs/ page is reachable from the README."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_file_map_names_every_module():
    """The README's file map has a line for every module of lgrpo/ (a package: its folder) and for kernels/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    mapped = set(LINK.findall(readme[readme.index("## Files"):]))
    modules = [p for p in sorted((ROOT / "lgrpo").iterdir()) if not p.name.startswith(("_", "."))
               and (p.suffix == ".py" or (p.is_dir() and any(p.iterdir())))]
    missing = [f"lgrpo/{p.name}" for p in modules if f"lgrpo/{p.name}" not in mapped]
    assert missing == [], f"README.md's file map has no line for {missing}"
