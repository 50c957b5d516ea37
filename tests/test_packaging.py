"""The pack as the Comfy Registry and ComfyUI-Manager see it: pyproject.toml is valid for the
registry, its dependencies are requirements.txt, and the version is written in one place."""
from __future__ import annotations

import fnmatch
import importlib.util
import io
import json
import logging
import re
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
log = logging.getLogger(__name__)


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
    assert "comfyui" not in name.lower()  # the registry's naming guidance
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


def test_the_project_urls_comfy_cli_reads():
    urls = PROJECT["urls"]
    for key in ("Homepage", "Repository", "Documentation", "Issues"):
        assert urls[key].startswith(urls["Repository"]), key
    assert urls["Issues"] == urls["Repository"] + "/issues"


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


# --- what `comfy node pack` would publish ----------------------------------------------------

def ignore_patterns() -> list[str]:
    lines = (REPO / ".comfyignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ignored(path: str, pattern: str) -> bool:
    """gitwildmatch, for the pattern forms .comfyignore uses: '/' at the start anchors to the root,
    '/' at the end matches a folder (and so every file under it), a name without '/' matches at any
    depth. (fnmatch's '*' also crosses '/'; no pattern here relies on the difference.)"""
    anchored, folder = pattern.startswith("/"), pattern.endswith("/")
    body, parts = pattern.strip("/"), path.split("/")
    if folder:
        parts = parts[:-1]  # a folder pattern matches the folders a file lies in
    if not anchored and "/" not in body:
        return any(fnmatch.fnmatchcase(name, body) for name in parts)
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, body) for prefix in prefixes)


def shipped() -> list[str]:
    """What comfy-cli's packer puts in the archive: `git ls-files` minus the .comfyignore matches
    (minus nothing force-included: [tool.comfy] includes is empty)."""
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    assert COMFY["includes"] == []
    return sorted(p for p in tracked if not any(ignored(p, pat) for pat in ignore_patterns()))


def test_the_ignore_file_uses_only_the_pattern_forms_emulated_here():
    assert all(not p.startswith("!") and "**" not in p for p in ignore_patterns())
    assert ignored("tests/support/host.py", "/tests/") and not ignored("nodes/tests.py", "/tests/")
    assert ignored("tools/make_workflows.py", "/tools/make_*.py") and not ignored("tools/train_domain.py", "/tools/make_*.py")


def test_the_published_archive_holds_what_runs_and_nothing_else():
    files = shipped()
    top = {p.split("/")[0] for p in files}
    assert top <= {"__init__.py", "nodes", "guidance", "training", "cudagraph", "lora_hooks", "web", "example_workflows", "tools",
                   "requirements.txt", "pyproject.toml", "LICENSE", "README.md", "CHANGELOG.md"}, top
    assert {"__init__.py", "requirements.txt", "pyproject.toml", "LICENSE", "tools/train_domain.py"} <= set(files)
    assert {"nodes", "guidance", "training", "cudagraph", "lora_hooks"} <= top
    size = sum((REPO / p).stat().st_size for p in files)
    # (thirteen templates with their thumbnails are about 280 KB of it: SD1.5's five, SDXL's and Flux's two
    # each, Qwen-Image's, its Edit's, Flux.2's and Wan 2.2's one each; README and CHANGELOG about 40 KB; the
    # code the rest. The bound is there to catch a stray large file, e.g. an evidence image or a model,
    # not the code's growth: raised from 750 KB with the validation samples, at 763 KB.)
    assert size < 850_000, f"{len(files)} files, {size} bytes"
    log.info("the archive would hold %d files, %d bytes:\n%s", len(files), size, "\n".join(files))


def test_every_declared_dependency_is_imported_by_the_pack():
    """A requirement nothing imports is a needless install (einops was one)."""
    sources = "\n".join(p.read_text() for d in ("nodes", "guidance", "training", "cudagraph", "lora_hooks", "tools") for p in (REPO / d).rglob("*.py"))
    modules = {"pillow": "PIL"}
    for name in requirement_names(PROJECT["dependencies"]):
        module = modules.get(name, name)
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.MULTILINE), name


def test_the_changelog_has_a_section_for_this_version():
    changelog = (REPO / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (\d+\.\d+\.\d+)", changelog, re.MULTILINE)
    assert versions and versions[0] == PROJECT["version"], versions


# --- template thumbnails -----------------------------------------------------------------------

def test_every_template_has_a_small_thumbnail_of_its_current_graph():
    """example_workflows/<name>.jpg, as the Templates dialog asks for it, drawn by
    tools/make_thumbnails.py from the workflow as it is now (run the tool after changing a workflow)."""
    import numpy as np
    from PIL import Image

    spec = importlib.util.spec_from_file_location("make_thumbnails", REPO / "tools" / "make_thumbnails.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    workflows = sorted((REPO / "example_workflows").glob("*.json"))
    assert len(workflows) >= 5
    for path in workflows:
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file(), thumbnail.name
        assert 2_000 < thumbnail.stat().st_size < 60_000, (thumbnail.name, thumbnail.stat().st_size)
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and image.size == tool.SIZE
            stored = np.asarray(image.convert("RGB"), dtype=np.int16)
        # the current graph drawn and stored as the tool stores it (a JPEG of its quality): a busy graph's
        # JPEG differs from its drawing by about 2 levels on average, from this by 0; one node moved: 1.4
        buffer = io.BytesIO()
        tool.render(json.loads(path.read_text()), path.stem).save(buffer, "JPEG", quality=tool.QUALITY, optimize=True)
        fresh = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.int16)
        assert np.abs(fresh - stored).mean() < 0.5, f"{thumbnail.name} is not the current graph: run tools/make_thumbnails.py"
