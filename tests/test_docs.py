"""The front door stays true: every command example in the README and docs/ parses with the real
command line (a `make` line through what make would run), and every page the README links exists."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer

from mmaudio_lora.cli import app

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def command_examples() -> list[tuple[str, str]]:
    """(page, command) for every line of every ```bash block, continuation lines joined and
    comments dropped."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for command in block.replace("\\\n", " ").splitlines():
                command = command.split(" # ")[0].strip()
                if command and not command.startswith("#"):
                    found.append((page.name, command))
    return found


def parse(args: list[str]) -> None:
    """Parse `mmaudio-lora ARGS` as the CLI would, without running the command."""
    group = typer.main.get_command(app)
    context = group.make_context("mmaudio-lora", list(args))
    protected = getattr(context, "_protected_args", None) or getattr(context, "protected_args", [])
    pending = [*protected, *context.args]
    name, command, rest = group.resolve_command(context, pending)
    command.make_context(name, rest, parent=context)


def commands_of(line: str) -> list[list[str]]:
    """The mmaudio-lora argument lists a documented line runs (`make X ...` through `make -n`)."""
    words = shlex.split(line)
    if words[0].endswith("mmaudio-lora"):
        return [words[1:]]
    if words[0] == "make":
        if words[1:2] in (["setup"], ["test"], ["lock"]):
            return []
        dry = subprocess.run(["make", "-n", *words[1:]], capture_output=True, text=True, cwd=REPO, check=True)
        lines = dry.stdout.replace("\\\n", " ").splitlines()
        return [shlex.split(l)[1:] for l in lines if shlex.split(l)[:1] and shlex.split(l)[0].endswith("mmaudio-lora")]
    if words[0].endswith("python"):
        assert (REPO / words[1]).is_file(), f"{words[1]}: no such script"
        return []
    raise AssertionError(f"an example that is neither mmaudio-lora, make nor a bench script: {line}")


def test_every_documented_command_parses():
    examples = command_examples()
    assert len(examples) >= 15 and any(page == "README.md" for page, _ in examples)
    failures = []
    for page, line in examples:
        try:
            for args in commands_of(line):
                parse(args)
        except (Exception, SystemExit) as error:  # click raises UsageError, typer may exit
            failures.append(f"{page}: {line}: {type(error).__name__}: {error}")
    assert failures == []


def test_a_wrong_option_would_be_caught():
    with pytest.raises(Exception, match="No such option"):
        parse(["generate", "--no-adapter", "--video", "x.mp4", "--frobnicate"])
    parse(["generate", "--no-adapter", "--video", "x.mp4", "--long", "windows"])


def test_the_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).is_file(), link
    assert "make test" in (REPO / ".ci" / "run").read_text()
