"""The shape of the package (DESIGN.md "Layout"): rooms import only the rooms below them, no
import circles, presets.py imports no family, and no file imports another file's private
names. Read from the source with ast (every import, also those inside functions), so the rules
hold for code that has not run yet."""
import ast
import collections
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "poa_keras"

# What each room may import (besides itself). A room is a sub-package or a top-level module.
# Read downwards: the bottom rooms import nothing of ours; the CLI and the package root import
# everything. Deliberately missing: methods -> eval, backbones -> methods (a model must not
# import its trainers), presets -> backbones (classes resolve through Keras' registry),
# quantization -> anything (the elastic layers will import it).
ALLOWED = {
    "version": set(),
    "files": set(),
    "validation": set(),
    "quantization": set(),
    "losses": set(),
    "optimizers": {"validation"},
    "preprocessing": {"validation"},
    "presets": {"files", "preprocessing", "quantization", "version"},
    "elastic": {"files", "quantization", "validation"},
    "data": {"files", "validation"},
    "convert": {"backbones", "classifier", "elastic", "heads", "presets"},
    "backbones": {"elastic", "files", "preprocessing", "presets", "quantization", "validation",
                  "version"},
    "heads": {"elastic", "validation"},
    "classifier": {"backbones", "elastic", "optimizers", "preprocessing", "presets",
                   "quantization", "validation"},
    "methods": {"backbones", "data", "elastic", "files", "heads", "losses", "optimizers",
                "quantization", "validation"},
    "eval": {"backbones", "classifier", "data", "elastic", "files", "optimizers",
             "preprocessing", "quantization", "validation", "version"},
    "export": {"backbones", "eval", "files", "preprocessing", "quantization", "validation",
               "version"},
    "pretrain": {"backbones", "data", "elastic", "files", "heads", "methods", "preprocessing",
                 "presets",
                 "quantization", "recipes", "validation"},
    "finetune": {"backbones", "classifier", "data", "files", "methods", "preprocessing",
                 "presets", "pretrain", "validation"},
}
TOP = {"cli", "<root>", "recipes", "zoo"}   # may import any room


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name):
    relative = pathlib.Path(*name.split(".")[1:]) if "." in name else pathlib.Path()
    return (PACKAGE / relative).with_suffix(".py").is_file() or \
        (PACKAGE / relative / "__init__.py").is_file()


def _imports(path):
    """[(line, imported module, imported names)] of every poa_keras import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "poa_keras":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if _is_module(sub):   # from poa_keras import presets: the module itself
                    out.append((node.lineno, sub, ()))
                else:
                    out.append((node.lineno, node.module, (alias.name,)))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, ()) for a in node.names
                    if a.name.split(".")[0] == "poa_keras"]
    return out


def _room(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_room_is_listed():
    rooms = {_room(_module_name(p)) for p in SOURCES}
    assert rooms <= set(ALLOWED) | TOP, sorted(rooms - set(ALLOWED) - TOP)


def test_rooms_import_only_the_rooms_below_them():
    bad = []
    for path in SOURCES:
        room = _room(_module_name(path))
        if room in TOP:
            continue
        for line, module, _ in _imports(path):
            target = _room(module)
            if target != room and target not in ALLOWED[room]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({room}) imports {module} "
                           f"({target})")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = collections.defaultdict(set)
    for path in SOURCES:
        name = _module_name(path)
        for _, module, _ in _imports(path):
            if module != name:
                graph[name].add(module)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package __init__ imports its own modules; a module reaching back into its package's
    # __init__ (or any longer loop) is a circle.
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_presets_import_no_family():
    imported = {module for _, module, _ in _imports(PACKAGE / "presets.py")}
    assert not {m for m in imported if _room(m) == "backbones" or m == "poa_keras"}, imported


@pytest.mark.parametrize("folder", ["poa_keras", "tests", "benchmarks", "recipes"])
def test_no_private_name_is_imported_across_files(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private_module = [p for p in module.split(".") if p.startswith("_")
                              and not p.startswith("__")]
            if private or private_module:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} {private}")
    assert not bad, "\n".join(bad)


def test_every_sub_package_is_installed():
    # pyproject.toml lists the packages one by one (zoo/ and recipes/ live outside poa_keras/):
    # a new room missing there imports from a checkout but not from the installed package
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    rooms = {"poa_keras." + p.parent.relative_to(PACKAGE).as_posix().replace("/", ".")
             for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    assert rooms <= listed, sorted(rooms - listed)
