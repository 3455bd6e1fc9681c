"""The repository stands alone: a fresh clone holds everything its tests read, and no file names a
path of one particular machine (a home directory, the workplace it was written in, the directory
above the checkout)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ARI_API_DOCS

ROOT = Path(__file__).resolve().parent.parent

# Spelt in pieces, so this file does not match itself.
_MACHINE_PATHS = re.compile(
    "(?<![\\w.~-])/(?:" + "|".join(["home", "Users", "root", "work"]) + ")/[\\w.-]+"
    "|(?<![\\w.~-])/" + "tmp/pytest-of-")


def tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        if os.environ.get("CI"):
            pytest.fail(f"git ls-files failed in {ROOT}: {e}")
        pytest.skip(f"not a git checkout ({e}): clone the repository to run this check")
    files = []
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_no_file_names_a_path_of_one_machine() -> None:
    files = tracked_text_files()
    assert len(files) > 100  # the listing worked
    above = str(ROOT.parent)
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _MACHINE_PATHS.search(line) or (len(above) > 1 and above + "/" in line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "absolute paths of a machine in tracked files:\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    "API_DOCS = Path(\"/" + "work/shared/reference/ari-api-docs\")",
    "see /" + "home/alice/src/agent",
    "cp x /" + "root/.cache/thing",
    "failed at /" + "tmp/pytest-of-root/pytest-3/test_x0",
])
def test_the_check_sees_machine_paths(line: str) -> None:
    assert _MACHINE_PATHS.search(line)


@pytest.mark.parametrize("line", [
    "/opt/ai-agent/.venv/bin/ai-agent models install --models-dir /var/lib/ai-agent/models",
    "install -d /etc/ai-agent",
    "~/.cache/ai-agent/wheels",
    "../shared/asterisk/bin/asterisk-instance",
])
def test_the_check_leaves_product_paths_alone(line: str) -> None:
    assert not _MACHINE_PATHS.search(line)


def test_the_ari_docs_the_tests_check_against_are_in_the_repository() -> None:
    names = sorted(p.name for p in ARI_API_DOCS.glob("*.json"))
    assert {"channels.json", "bridges.json", "events.json", "resources.json"} <= set(names)
    tracked = subprocess.run(["git", "ls-files", str(ARI_API_DOCS.relative_to(ROOT))], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    if tracked:  # in a git checkout: the files are part of it, not left beside it
        assert len([t for t in tracked if t.endswith(".json")]) == len(names)
    notices = (ROOT / "THIRD_PARTY_NOTICES.md").read_text()
    assert "tests/data/ari-api-docs" in notices and "General Public License" in notices
