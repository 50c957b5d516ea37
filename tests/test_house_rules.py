"""The house rules (CONTRIBUTING.md, "Layout"), read from the source so a change that breaks one fails
here: the host-free packages never import ComfyUI; sampling imports nothing of training; no cycle
between the pack's packages; no file over 400 lines and no function over 80 outside tests/, bench/
and experiments/; the README at most 200 lines; docs without session wording; tooltips without
measurements."""
import ast
import os
import re
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_FREE = ("guidance", "training", "cudagraph", "lora_hooks")
HOST_MODULES = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "server", "execution",
                "comfy_execution", "comfyui_version", "latent_preview", "node_helpers"}
PACKAGES = HOST_FREE + ("nodes", "tools")
OUTSIDE_THE_RULES = ("tests", "bench", "experiments", "docs", "web", "example_workflows", "scripts")


def pack_files():
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        top = rel.split(os.sep)[0]
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        if top in OUTSIDE_THE_RULES:
            continue
        for f in files:
            if f.endswith(".py"):
                yield os.path.normpath(os.path.join(rel, f))


def module_of(path: str) -> list[str]:
    """A file's dotted module name as parts (a package's __init__.py: the package's)."""
    parts = path[:-3].split(os.sep)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(path: str) -> set[str]:
    """The dotted names `path` imports, relative imports resolved against the pack's root."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())
    package = module_of(path) if path.endswith("__init__.py") else module_of(path)[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]  # level 1: this package, 2: its parent
                name = ".".join(base + ([node.module] if node.module else []))
                out.update(f"{name}.{a.name}" if not node.module else name for a in node.names)
            else:
                out.add(node.module)
    return out


def unit(name: str) -> str | None:
    """The part of the pack a dotted name belongs to: a package, or in nodes/ its two runtimes
    (nodes.sampling, nodes.training), the node classes at its top (`nodes: node files`, *_node.py,
    *_nodes.py and __init__.py) and the shared host glue beside them (`nodes: glue`)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[0] == "nodes":
        if len(parts) > 1 and parts[1] in ("sampling", "training"):
            return f"nodes.{parts[1]}"
        return "nodes: node files" if len(parts) == 1 or parts[1].endswith(("_node", "_nodes")) else "nodes: glue"
    return parts[0]


FILES = sorted(pack_files())


def test_the_rules_read_the_pack():
    assert {"guidance/combine.py", "nodes/sampling/guider.py", "training/loop.py", "__init__.py"} <= set(FILES)


@pytest.mark.parametrize("package", HOST_FREE)
def test_the_host_free_packages_never_import_comfyui(package):
    found = {path: sorted(n for n in imports(path) if n.split(".")[0] in HOST_MODULES)
             for path in FILES if path.startswith(package + os.sep)}
    assert found and not {p: n for p, n in found.items() if n}


def test_sampling_imports_nothing_of_training():
    wrong = {path: sorted(n for n in imports(path) if unit(n) in ("training", "nodes.training"))
             for path in FILES if path.startswith(os.path.join("nodes", "sampling"))}
    assert not {p: n for p, n in wrong.items() if n}


def test_no_cycle_between_the_packs_packages():
    """The host-free packages at the bottom, nodes/' glue and its two runtimes over them, the node
    files and tools/ at the top: every import points down (e.g. the validation samples of training
    import the sampling runtime, never the sampler node's file)."""
    graph = defaultdict(set)
    for path in FILES:
        here = unit(".".join(module_of(path)))
        for name in imports(path):
            there = unit(name)
            if here and there and there != here:
                graph[here].add(there)
    for a in HOST_FREE:
        assert not {u for u in graph[a] if u.startswith(("nodes", "tools"))}, (a, graph[a])
    assert not graph["nodes: glue"] & {"nodes.sampling", "nodes.training", "nodes: node files"}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in graph[start])

    assert not [u for u in list(graph) if reaches(u, u)], dict(graph)


def test_no_file_over_400_lines_and_no_function_over_80():
    long_files, long_functions = [], []
    for path in FILES:
        source = open(os.path.join(ROOT, path), encoding="utf-8").read()
        if source.count("\n") > 400:
            long_files.append((path, source.count("\n")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append((path, node.name, node.end_lineno - node.lineno + 1))
    assert long_files == [] and long_functions == []


def test_the_readme_is_short_and_the_developer_docs_exist():
    assert open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().count("\n") <= 200
    assert os.path.isfile(os.path.join(ROOT, "CONTRIBUTING.md"))
    assert os.path.isfile(os.path.join(ROOT, "docs", "README.md"))


SESSION_WORDING = re.compile(r"\b(tonight|this session|lent machine|for the record|last night|this morning)\b", re.I)


def test_the_docs_hold_no_session_wording():
    docs = ["README.md", "CONTRIBUTING.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                                                if f.endswith(".md")]
    found = {d: SESSION_WORDING.findall(open(os.path.join(ROOT, d), encoding="utf-8").read()) for d in docs}
    assert not {d: w for d, w in found.items() if w}


MEASUREMENT = re.compile(r"\d+(\.\d+)?\s*(img/s|images/s|it/s|s/it|ms\b)|\bH100\b|\bH200\b|\d(\.\d+)?x (faster|slower)")


def test_no_tooltip_carries_a_measurement():
    tooltips = []
    for path in FILES:
        if not path.startswith("nodes" + os.sep):
            continue
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())):
            if isinstance(node, ast.keyword) and node.arg == "tooltip":
                text = "".join(c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str))
                tooltips.append((path, text))
    assert len(tooltips) > 50  # (the rule reads the tooltips)
    assert not [(p, t) for p, t in tooltips if MEASUREMENT.search(t)]
