"""The code's shape: no import cycles, short training loops, no block repeated between the two scripts,
checkpoint names and keys known in checkpoints.py only.

Each check is a small detector proven on synthetic files first, then asserted on the real tree.
"""
from __future__ import annotations

import ast
import io
import keyword
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folders holding the project's own modules ("" is the repository root).
MODULE_DIRS = ("", "data", "processors", "scripts", "bench")
# The training loop of each script: the function that steps the optimizer.
LOOPS = {"run_pretraining.py": "train", "run_glue.py": "train"}
MAX_LOOP_LINES = 80
SCRIPTS = ("run_pretraining.py", "run_glue.py")
MIN_REPEAT = 6
# The one home of checkpoint names and keys, and the only project modules it may import (everything
# that reads a checkpoint imports it, so it imports none of them).
CHECKPOINT_HOME = "checkpoints.py"
CHECKPOINT_HOME_IMPORTS = {"utils", "atomic_io"}
# A string literal that builds or parses a checkpoint file name: "ckpt_" closing a literal (what an
# f-string's or a concatenation's value is appended to) or followed by a format field or a regex /
# glob construct. Prose such as "ckpt_<step>.pt" is not one.
CHECKPOINT_NAME_LITERAL = re.compile(r"ckpt_($|[{%(\\\[*])")
# Files where a checkpoint key's literal names something else: (file, key) -> what it is there.
NOT_CHECKPOINT_ENTRIES = {
    ("pretraining_data.py", "epoch"): "a field of the data position's own state (under the checkpoint's DATA)",
    ("scripts/demo.py", "data"): "a dllogger record's data",
    ("scripts/plot_training.py", "data"): "a dllogger record's data",
    ("bench/bench_attention.py", "mask"): "a column of a result row",
}
# The mask's state on a model: only its home names the mask module in a string (how code matches
# state-dict names), and only the model that holds it reads the attribute.
MASK_MODULE_NAME = "sparse_mask"
MASK_STATE_HOME = "attention_masks"
MASK_HOLDER = "modeling"

Edge = tuple[str, int]  # (imported module, line of the import)


# ----------------------------------------------------------------------------- import graph


def project_modules(root: Path) -> dict[str, Path]:
    """{dotted name: file}: `modeling`, `data`, `data.sharding`, `scripts.stages`, ..."""
    modules = {}
    for folder in MODULE_DIRS:
        for path in sorted((root / folder).glob("*.py")):
            parts = [*Path(folder).parts, path.stem]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def resolve(name: str, importer: str, modules: dict[str, Path], root: Path) -> str | None:
    """The project module `import name` in `importer` loads (its longest project prefix), or None.

    A file in a folder that is not a package (scripts/, bench/) runs with that folder on sys.path,
    so its bare imports find its siblings first."""
    folder = Path(modules[importer].relative_to(root)).parent
    candidates = [name]
    if folder.parts and not (root / folder / "__init__.py").exists():
        candidates.insert(0, ".".join([*folder.parts, name]))
    for candidate in candidates:
        parts = candidate.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                return ".".join(parts[:end])
    return None


def with_packages(target: str, modules: dict[str, Path]) -> list[str]:
    """`target` and the packages above it, which Python imports first (data, then data.sharding)."""
    parts = target.split(".")
    return [name for end in range(1, len(parts) + 1) if (name := ".".join(parts[:end])) in modules]


def imports_of(module: str, modules: dict[str, Path], root: Path) -> list[Edge]:
    """Every project module `module` imports, at module level or inside a function."""
    tree = ast.parse(modules[module].read_text(encoding="utf-8"))
    package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
    found: list[Edge] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up from this module's package
                parts = package.split(".") if package else []
                base = ".".join([*parts[:len(parts) - node.level + 1], *([base] if base else [])])
            # `from data import sharding` loads data.sharding; `from data.sharding import f`, data.sharding
            names = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve(name, module, modules, root)
            for imported in with_packages(target, modules) if target else []:
                # not the module itself, nor its own packages (initialised before it runs)
                if not f"{module}.".startswith(f"{imported}."):
                    found.append((imported, node.lineno))
    return list(dict.fromkeys(found))


def import_graph(root: Path) -> dict[str, list[Edge]]:
    modules = project_modules(root)
    return {module: imports_of(module, modules, root) for module in modules}


def import_cycles(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] through each group of modules that import each other."""
    cycles = []
    for group in strongly_connected(graph):
        start = min(group)
        cycles.append(path_back(graph, start, group))
    return sorted(cycles)


def strongly_connected(graph: dict[str, list[Edge]]) -> list[set[str]]:
    """Groups of two or more modules each reachable from the others (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target, _ in graph.get(node, []):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def path_back(graph: dict[str, list[Edge]], start: str, group: set[str]) -> list[str]:
    """The shortest import path from `start` back to itself inside `group` (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target, _ in sorted(graph[node]):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if target in group and target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in a cycle but no path leads back to it")


def describe_cycle(cycle: list[str], graph: dict[str, list[Edge]]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        line = min(line for target, line in graph[a] if target == b)
        steps.append(f"{a} imports {b} (line {line})")
    return " -> ".join(cycle) + ": " + "; ".join(steps)


# ----------------------------------------------------------------------------- function length


def function_lines(path: Path, name: str) -> tuple[int, int]:
    """(first, last) line of function `name` ("f" or "Class.method") in `path`, decorators excluded."""
    scope: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    for part in name.split("."):
        matches = [node for parent in scope for node in ast.iter_child_nodes(parent)
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == part]
        if not matches:
            raise LookupError(f"{path.name} has no {name}: update LOOPS in tests/test_structure.py")
        scope = matches
    return scope[0].lineno, scope[0].end_lineno


# ----------------------------------------------------------------------------- repeated blocks


Line = tuple[tuple[str, ...], int, int]  # (normalised tokens, first physical line, last physical line)
SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING,
           tokenize.ENDMARKER, tokenize.NEWLINE}
FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python >= 3.12 splits f-strings up
FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def normalised_lines(source: str) -> list[Line]:
    """Logical lines with every identifier as ID and every literal as its type (NUM, STR).

    Comments, blank lines, docstrings (lines that are only a string) and imports (every script
    imports the same standard modules) are dropped."""
    lines: list[Line] = []
    tokens: list[str] = []
    first = 0
    depth = 0  # inside an f-string (3.12+), whose pieces count as one STR
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == FSTRING_START:
            depth += 1
            if depth == 1:
                first = first or tok.start[0]
                tokens.append("STR")
            continue
        if tok.type == FSTRING_END:
            depth -= 1
            continue
        if depth:
            continue
        if tok.type == tokenize.NEWLINE:
            if tokens and tokens != ["STR"] and tokens[0] not in ("import", "from"):
                lines.append((tuple(tokens), first, tok.start[0]))
            tokens, first = [], 0
            continue
        if tok.type in SKIPPED:
            continue
        first = first or tok.start[0]
        if tok.type == tokenize.NAME:
            tokens.append(tok.string if keyword.iskeyword(tok.string) else "ID")
        elif tok.type == tokenize.NUMBER:
            tokens.append("NUM")
        elif tok.type == tokenize.STRING:
            tokens.append("STR")
        else:
            tokens.append(tok.string)
    return lines


def repeated_blocks(a: list[Line], b: list[Line], size: int = MIN_REPEAT) -> list[tuple[int, int, int, int, int]]:
    """Maximal runs of >= `size` logical lines alike in `a` and `b`:
    (first line in a, last line in a, first line in b, last line in b, logical lines)."""
    found = []
    for i in range(len(a)):
        for j in range(len(b)):
            if a[i][0] != b[j][0] or (i and j and a[i - 1][0] == b[j - 1][0]):
                continue  # not the start of a run
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n][0] == b[j + n][0]:
                n += 1
            if n >= size:
                found.append((a[i][1], a[i + n - 1][2], b[j][1], b[j + n - 1][2], n))
    return found


def describe_blocks(blocks: list[tuple[int, int, int, int, int]], name_a: str, name_b: str,
                    source_a: str) -> str:
    text = source_a.splitlines()
    return "\n".join(f"{name_a}:{a0}-{a1} and {name_b}:{b0}-{b1} ({n} lines alike): {text[a0 - 1].strip()}"
                     for a0, a1, b0, b1, n in blocks)


def imports_of_test_modules(folder: Path) -> list[str]:
    """Every import of a test module or of conftest in `folder`'s test_*.py files."""
    found = []
    for path in sorted(folder.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            found += [f"{path.name}:{node.lineno} imports {name}" for name in names
                      if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest"]
    return found


# ----------------------------------------------------------------------------- checkpoint names and keys


def checkpoint_keys(home: Path) -> dict[str, str]:
    """{name: literal} of the key constants `KEYS = (...)` lists in the checkpoint home, read statically."""
    tree = ast.parse(home.read_text(encoding="utf-8"))
    constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}
    listed = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "KEYS" for t in node.targets))
    return {element.id: constants[element.id] for element in listed.elts}


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def checkpoint_key_uses(source: str, keys: set[str]) -> list[tuple[int, str]]:
    """(line, key) where a key's literal reads or tests an entry: `x["key"]`, `x.get("key")` /
    `.pop` / `.setdefault`, `"key" in x`. (Building a dict with such keys is not matched: results
    and log records share some of the names.)"""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript):
            key = _literal(node.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                and node.func.attr in ("get", "pop", "setdefault"):
            key = _literal(node.args[0])
        elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)):
            key = _literal(node.left)
        else:
            continue
        if key in keys:
            found.append((node.lineno, key))
    return sorted(found)


def checkpoint_name_literals(source: str) -> list[int]:
    """Lines of string literals (f-string pieces included) that build or parse a checkpoint file name."""
    return sorted({node.lineno for node in ast.walk(ast.parse(source))
                   if (text := _literal(node)) is not None and CHECKPOINT_NAME_LITERAL.search(text)})


def imported_from(module: str, graph: dict[str, list[Edge]]) -> set[str]:
    """Every project module `module` imports, directly or through others."""
    seen: set[str] = set()
    frontier = [module]
    while frontier:
        for target, _ in graph.get(frontier.pop(), []):
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen
# ----------------------------------------------------------------------------- names of the mask's state


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (a statement that is only a string)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def strings_naming(source: str, word: str) -> list[int]:
    """Lines of the string literals (f-string pieces included, docstrings not) that contain `word`:
    where code matches names by substring (`"word" in key`, `key.endswith("word.x")`, ...)."""
    tree = ast.parse(source)
    skipped = docstrings(tree)
    return sorted({node.lineno for node in ast.walk(tree) if isinstance(node, ast.Constant)
                   and isinstance(node.value, str) and word in node.value and id(node) not in skipped})


def attribute_reads(source: str, word: str) -> list[int]:
    """Lines that use an attribute named `word` (`model.bert.word`)."""
    return sorted({node.lineno for node in ast.walk(ast.parse(source))
                   if isinstance(node, ast.Attribute) and node.attr == word})


# ----------------------------------------------------------------------------- the detectors, proven


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_a_function_level_import_closing_a_loop_is_a_cycle(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"masks.py": "import json\nimport model\n",
                                 "model.py": "import os\n\n\ndef build():\n    from masks import x\n",
                                 "leaf.py": "import model\n"})
    graph = import_graph(root)
    assert import_cycles(graph) == [["masks", "model", "masks"]]
    assert describe_cycle(["masks", "model", "masks"], graph) == (
        "masks -> model -> masks: masks imports model (line 2); model imports masks (line 5)")


def test_package_relative_and_sibling_imports_resolve(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {
        "data/__init__.py": "", "data/a.py": "from data import b\n", "data/b.py": "from . import c\n",
        "data/c.py": "from .a import thing\n", "scripts/run.py": "import stages\n", "scripts/stages.py": "",
        "top.py": "import data.a\nfrom processors.glue import TASKS\n", "processors/__init__.py": "",
        "processors/glue.py": "TASKS = {}\n"})
    graph = import_graph(root)
    assert graph["data.a"] == [("data.b", 1)] and graph["data.b"] == [("data.c", 1)]
    assert graph["data.c"] == [("data.a", 1)]
    assert graph["scripts.run"] == [("scripts.stages", 1)]
    assert graph["top"] == [("data", 1), ("data.a", 1), ("processors", 2), ("processors.glue", 2)]
    assert import_cycles(graph) == [["data.a", "data.b", "data.c", "data.a"]]


def test_an_acyclic_tree_has_no_cycle(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"a.py": "import b\nimport c\n", "b.py": "import c\n",
                                 "c.py": "def f():\n    import json\n"})
    assert import_cycles(import_graph(root)) == []


def test_function_lines_finds_functions_and_methods(tmp_path: Path) -> None:
    path = tmp_path / "s.py"
    path.write_text("import x\n\n\n@dec\ndef train(a):\n    b = a\n    return b\n\n\n"
                    "class Loop:\n    def train(self):\n        pass\n", encoding="utf-8")
    assert function_lines(path, "train") == (5, 7)
    assert function_lines(path, "Loop.train") == (11, 12)
    with pytest.raises(LookupError, match="s.py has no fit: update LOOPS"):
        function_lines(path, "fit")


NAMES_BY_SUBSTRING = '''
"""A docstring may mention sparse_mask."""
def drop(state, model, prefix):
    kept = {k: v for k, v in state.items() if "sparse_mask" not in k}  # a comment: sparse_mask
    logits = [k for k in state if k.endswith(f"{prefix}sparse_mask.mask_logits")]
    return kept, logits, model.bert.sparse_mask, getattr(model, "other")
'''
NAMES_BY_ACCESSOR = '''
def drop(state, model):
    return attention_masks.without_mask_state(state), attention_masks.mask_module(model)
'''


def test_names_matched_by_substring_and_attribute_reads_are_found() -> None:
    assert strings_naming(NAMES_BY_SUBSTRING, "sparse_mask") == [4, 5]
    assert attribute_reads(NAMES_BY_SUBSTRING, "sparse_mask") == [6]
    assert strings_naming(NAMES_BY_ACCESSOR, "sparse_mask") == attribute_reads(NAMES_BY_ACCESSOR, "sparse_mask") == []


BLOCK = '''
for step in range(max_steps):
    batch = next(data)  # a comment does not count
    loss = model(*batch) / accumulation

    loss.backward()
    if step % log_every == 0:
        """A docstring-like string does not count either."""
        log(step, loss.item(), "loss")
    optimizer.step()
'''
RENAMED = '''
for i in range(total):
    inputs = next(batches)
    out = net(*inputs) / scale

    out.backward()
    if i % every == 0:
        print(i, out.detach(), 'other text')
    opt.step()
'''


def test_a_six_line_block_is_found_under_other_names_and_literals() -> None:
    a = normalised_lines("import os\nx = 1\n" + BLOCK)
    b = normalised_lines("def f():\n    import sys\n" + RENAMED.replace("\n", "\n    ") + "\n    return 3\n")
    assert a[0] == (("ID", "=", "NUM"), 2, 2)  # imports dropped, literals as their type
    assert repeated_blocks(a, b) == [(4, 12, 4, 11, 7)]


def test_five_alike_lines_or_a_changed_shape_are_not_a_repeat() -> None:
    a = normalised_lines(BLOCK)
    assert len(repeated_blocks(a, normalised_lines(RENAMED)[1:7])) == 1
    assert repeated_blocks(a, normalised_lines(RENAMED)[1:6]) == []
    changed = normalised_lines(RENAMED.replace("out.backward()", "out.backward(retain_graph=True)"))
    assert repeated_blocks(a, changed) == []  # 3 + 3 lines alike around the change
    literal = normalised_lines(RENAMED.replace("/ scale", "/ 4"))
    assert repeated_blocks(a, literal) == []


def test_imports_of_test_modules_and_conftest_are_found(tmp_path: Path) -> None:
    write_tree(tmp_path, {"test_a.py": "import os\nfrom helpers import SEQ\n\n\ndef test_x():\n    import test_b\n",
                          "test_b.py": "from conftest import ROOT\nfrom test_a import test_x as t\n",
                          "test_c.py": "import testing_tools\n"})
    assert imports_of_test_modules(tmp_path) == ["test_a.py:6 imports test_b", "test_b.py:1 imports conftest",
                                                 "test_b.py:2 imports test_a"]


def test_checkpoint_key_reads_and_name_literals_are_found(tmp_path: Path) -> None:
    home = write_tree(tmp_path, {"home.py": 'MODEL = "model"\nSTEP = "global_step"\nOTHER = "x"\n'
                                            'KEYS = (MODEL, STEP)\n'})
    assert checkpoint_keys(home / "home.py") == {"MODEL": "model", "STEP": "global_step"}
    keys = {"model", "global_step"}
    source = ('w = state["model"]\nn = state.get("global_step", 0)\nif "model" in state:\n    pass\n'
              'results = {"global_step": 3}\nx = state[MODEL]\ny = row["loss"]\nz = d.pop("model")\n')
    assert checkpoint_key_uses(source, keys) == [(1, "model"), (2, "global_step"), (3, "model"), (8, "model")]
    source = ('a = out / f"ckpt_{step}.pt"\nb = re.compile(r"ckpt_(\\d+)\\.pt")\nc = "ckpt_%d.pt" % 3\n'
              'd = "ckpt_" + str(3)\ne = glob("ckpt_*.pt")\nf = "ckpt_{}.pt".format(3)\n'
              'help = "continue from a ckpt_<step>.pt"\ng = f"{out}/mask_{step}.safetensors"\n')
    assert checkpoint_name_literals(source) == [1, 2, 3, 4, 5, 6]


def test_everything_a_module_imports_is_found_through_others(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"home.py": "import utils\n", "utils.py": "def f():\n    import entry\n",
                                 "entry.py": "import json\n"})
    assert imported_from("home", import_graph(root)) == {"utils", "entry"}


# ----------------------------------------------------------------------------- the real tree


def test_no_module_imports_another_in_a_cycle() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 20  # the detector saw the project
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(c, graph) for c in cycles)


@pytest.mark.parametrize("script", sorted(LOOPS))
def test_training_loop_is_short(script: str) -> None:
    first, last = function_lines(ROOT / script, LOOPS[script])
    length = last - first + 1
    assert length <= MAX_LOOP_LINES, (f"{script}: {LOOPS[script]} is {length} lines (lines {first}-{last}), "
                                      f"at most {MAX_LOOP_LINES}")


def test_only_the_mask_home_names_the_mask_state() -> None:
    """The mask's state is reached through attention_masks' accessors (`mask_module`, `mask_state`,
    `without_mask_state`, `mask_logits_key`), never by matching parameter names elsewhere; only the
    model that holds the mask module reads it as an attribute."""
    modules = project_modules(ROOT)
    assert strings_naming(modules[MASK_STATE_HOME].read_text(encoding="utf-8"), MASK_MODULE_NAME)  # the home is seen
    found = []
    for module, path in modules.items():
        source = path.read_text(encoding="utf-8")
        if module != MASK_STATE_HOME:
            found += [f"{module}:{line} names '{MASK_MODULE_NAME}' in a string"
                      for line in strings_naming(source, MASK_MODULE_NAME)]
        if module != MASK_HOLDER:
            found += [f"{module}:{line} reads .{MASK_MODULE_NAME}" for line in attribute_reads(source, MASK_MODULE_NAME)]
    assert not found, f"use the accessors of {MASK_STATE_HOME}.py:\n" + "\n".join(found)


def test_no_block_is_repeated_between_the_two_scripts() -> None:
    a, b = (ROOT / name for name in SCRIPTS)
    source_a = a.read_text(encoding="utf-8")
    blocks = repeated_blocks(normalised_lines(source_a), normalised_lines(b.read_text(encoding="utf-8")))
    assert not blocks, "blocks alike in both scripts:\n" + describe_blocks(blocks, a.name, b.name, source_a)



def test_no_test_module_imports_another_or_conftest() -> None:
    """Shared test code is a conftest fixture (or a constant of tests/helpers.py), never a test module's."""
    found = imports_of_test_modules(Path(__file__).resolve().parent)
    assert not found, "\n".join(found)


def test_checkpoint_home_imports_only_the_low_level_modules() -> None:
    """checkpoints.py never reaches the scripts, the model or the training loop: they all import it."""
    imported = imported_from(Path(CHECKPOINT_HOME).stem, import_graph(ROOT))
    extra = sorted(imported - CHECKPOINT_HOME_IMPORTS)
    assert not extra, f"{CHECKPOINT_HOME} imports {extra}, which would close a cycle or invert the layers"


def test_only_the_checkpoint_home_names_checkpoint_files_and_keys() -> None:
    """Outside checkpoints.py (tests aside) no literal builds or parses a ckpt_<N>.pt name, and no
    literal of a key in its KEYS reads a loaded checkpoint's entry: the constants do
    (`state[checkpoints.MODEL]`), so a key or a name changes in one place."""
    keys = set(checkpoint_keys(ROOT / CHECKPOINT_HOME).values())
    assert {"model", "optimizer", "global_step", "phase2", "rng"} <= keys  # the detector read the home
    problems, exempt = [], set(NOT_CHECKPOINT_ENTRIES)
    for path in project_modules(ROOT).values():
        name = path.relative_to(ROOT).as_posix()
        if name == CHECKPOINT_HOME:
            continue
        source = path.read_text(encoding="utf-8")
        problems += [f"{name}:{line}: builds or parses a checkpoint file name (use checkpoints.checkpoint_path / "
                     f"step_in_name)" for line in checkpoint_name_literals(source)]
        uses = checkpoint_key_uses(source, keys)
        problems += [f"{name}:{line}: reads checkpoint entry {key!r} by its literal (use the checkpoints constant)"
                     for line, key in uses if (name, key) not in NOT_CHECKPOINT_ENTRIES]
        exempt -= {(name, key) for _, key in uses}
    assert not problems, "\n".join(problems)
    assert not exempt, f"NOT_CHECKPOINT_ENTRIES lists uses that no longer exist: {sorted(exempt)}"
