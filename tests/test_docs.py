"""The documentation runs: every ```python block of README.md and docs/guide.md, in order.

Each document gets its own empty working folder (conftest's autouse fixture chdirs into
``tmp_path`` and clears every ``TESSERA_*`` variable) and one namespace shared by its blocks, so
a block may use what an earlier one made. Each block is compiled under the name
``<doc>:block<n>`` (``n`` counts the document's python blocks from 1), so a traceback points at
the failing block. A block preceded by ``<!-- not-tested -->`` is skipped.

The guide must also cover the whole public surface: every name in ``tessera.__all__`` and every
command of the ``tessera`` CLI.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"
NOT_TESTED = "<!-- not-tested -->"

# A fenced block: the fence line (``` or longer, optional language) up to a matching fence.
_FENCE = re.compile(
    r"^(?P<fence>`{3,})(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(number, source, tested)`` for each ```python block; numbers count python blocks."""
    blocks = []
    for match in _FENCE.finditer(text):
        if match.group("lang").strip().lower() not in ("python", "py"):
            continue
        before = text[: match.start()].rstrip()
        tested = not before.endswith(NOT_TESTED)
        blocks.append((len(blocks) + 1, match.group("body"), tested))
    return blocks


def run_document(path: Path) -> int:
    """Execute a document's python blocks in order in one namespace; return how many ran."""
    name = path.relative_to(ROOT).as_posix()
    namespace: dict[str, object] = {"__name__": "__main__"}
    ran = 0
    for number, source, tested in python_blocks(path.read_text(encoding="utf-8")):
        if not tested:
            continue
        code = compile(source, f"{name}:block{number}", "exec")
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # a documented warning must not become an error
            exec(code, namespace)
        ran += 1
    return ran


def test_block_extraction() -> None:
    text = (
        "intro\n```python\na = 1\n```\n\n```bash\nls\n```\n"
        f"{NOT_TESTED}\n```python\nraise SystemExit\n```\n````python\nb = '```'\n````\n"
    )
    assert python_blocks(text) == [
        (1, "a = 1\n", True),
        (2, "raise SystemExit\n", False),
        (3, "b = '```'\n", True),
    ]


@pytest.mark.parametrize("doc", [README, GUIDE], ids=["README.md", "docs/guide.md"])
def test_document_runs(doc: Path, tmp_path: Path) -> None:
    assert Path.cwd() == tmp_path  # conftest: a fresh, empty folder with no TESSERA_* settings
    assert python_blocks(doc.read_text(encoding="utf-8")), f"{doc.name} has no python blocks"
    assert run_document(doc) > 0


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))


def test_guide_covers_every_public_name() -> None:
    import tessera

    words = _words(GUIDE.read_text(encoding="utf-8"))
    missing = [name for name in tessera.__all__ if name not in words]
    assert not missing, f"docs/guide.md never mentions these public names: {missing}"


def cli_commands() -> list[str]:
    """Every command path of the ``tessera`` CLI: ``ls``, ``token create``, …"""
    import typer.main

    from tessera.cli import app

    def walk(typer_app: typer.Typer, prefix: str) -> list[str]:
        found = []
        for command in typer_app.registered_commands:
            name = command.name or typer.main.get_command_name(command.callback.__name__)
            found.append(f"{prefix}{name}")
        for group in typer_app.registered_groups:
            found += walk(group.typer_instance, f"{prefix}{group.name} ")
            found.append(f"{prefix}{group.name}")
        return found

    return walk(app, "")


def test_guide_covers_every_cli_command() -> None:
    commands = cli_commands()
    assert {"ls", "server", "token create", "migrate-store"} <= set(commands)
    text = GUIDE.read_text(encoding="utf-8")
    missing = [c for c in commands if not re.search(rf"\btessera {re.escape(c)}(?![\w-])", text)]
    assert not missing, f"docs/guide.md never shows these commands as `tessera …`: {missing}"
