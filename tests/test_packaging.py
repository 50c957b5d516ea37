"""The pack as the Comfy Registry and ComfyUI-Manager see it: pyproject.toml is valid for the
registry, its dependencies are requirements.txt, and the version is written in one place."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]


def requirement_names(lines) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower())
    return names


def test_registry_node_id_and_version():
    # registry rules: < 100 characters; letters, digits, '-', '_', '.'; no two specials in a row;
    # starts with a letter. Version: semantic X.Y.Z.
    name = PROJECT["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), PROJECT["version"]
    assert PROJECT["description"].strip() and PROJECT["license"] == {"file": "LICENSE"}
    assert (REPO / "LICENSE").is_file()


def test_registry_tool_comfy_section():
    assert re.fullmatch(r"[a-z][a-z0-9-]*", COMFY["PublisherId"]), COMFY["PublisherId"]
    assert COMFY["DisplayName"].strip()
    repository = PROJECT["urls"]["Repository"]
    assert repository.startswith("https://")
    # the icon is a file of this repository, addressed through its raw URL
    owner_repo = repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert COMFY["Icon"].startswith(prefix), COMFY["Icon"]
    assert (REPO / COMFY["Icon"].removeprefix(prefix)).is_file()
    assert re.fullmatch(r">=\d+\.\d+\.\d+", COMFY["requires-comfyui"])


def test_dependencies_are_the_requirements_file():
    assert requirement_names(PROJECT["dependencies"]) == requirement_names(
        (REPO / "requirements.txt").read_text().splitlines())


def test_the_version_is_written_in_one_place():
    # a second declaration (`__version__ = "..."`, `version = "..."`) anywhere in the pack's files
    pattern = re.compile(r"""^\s*(__version__|version)\s*[:=]\s*['"]\d""", re.MULTILINE)
    offenders = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.suffix in {".py", ".toml", ".cfg", ".json"} and p.is_file()
                 and not any(part.startswith(".") or part in {"_out", "__pycache__"} for part in p.relative_to(REPO).parts)
                 and p.name != "pyproject.toml" and pattern.search(p.read_text(errors="ignore"))]
    assert offenders == []
