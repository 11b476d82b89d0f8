"""The code's shape, as docs/code-layout.md states it: short functions, no import cycles, imports pointing one way,
one exception hierarchy."""
import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Dict, List, Set

import pytest

SRC = Path(__file__).resolve().parents[1] / 'src' / 't2tvit'
MAX_FUNCTION_LINES = 80
TORCH_FREE = ('t2tvit.errors', 't2tvit.options', 't2tvit.outputs')


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _trees() -> Dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(SRC.rglob('*.py'))}


def _imports(module: str, tree: ast.Module, is_package: bool) -> Set[str]:
    """Package modules this module imports anywhere, function-level imports included (`from .x import y` counts as
    both `x` and `x.y`, since `y` may be a submodule)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = module.split('.') if is_package else module.split('.')[:-1]
            base = base[:len(base) - node.level + 1]
            target = '.'.join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f'{target}.{alias.name}' for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('t2tvit'):
            found.add(node.module)
            found.update(f'{node.module}.{alias.name}' for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith('t2tvit'))
    return found


def _graph() -> Dict[str, Set[str]]:
    trees = _trees()
    packages = {_module_name(p) for p in SRC.rglob('__init__.py')}
    graph = {}
    for module, tree in trees.items():
        deps = _imports(module, tree, module in packages) & set(trees)
        # a module importing its own package's __init__ (or the top package) is not a cycle
        graph[module] = {d for d in deps if d != module and not module.startswith(d + '.') and d != 't2tvit'}
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_function_is_longer_than_one_screen():
    long = []
    for module, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f'{module}.{node.name} ({lines} lines)')
    assert not long, f'functions over {MAX_FUNCTION_LINES} lines: {long}'


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert _cycles({'a': {'b'}, 'b': set()}) == []


def test_models_import_nothing_above_them():
    graph = _graph()
    allowed = {'t2tvit.errors'}
    for module, deps in graph.items():
        if module.startswith('t2tvit.models'):
            outside = {d for d in deps if not d.startswith('t2tvit.models')} - allowed
            assert not outside, f'{module} imports {sorted(outside)}'


@pytest.mark.parametrize('module', TORCH_FREE)
def test_option_layer_imports_only_the_standard_library_and_yaml(module):
    tree = _trees()[module]
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ''] if isinstance(node, ast.ImportFrom) and not node.level else [])
        for name in names:
            assert name.split('.')[0] not in ('torch', 'timm', 'numpy', 'PIL'), f'{module} imports {name}'


def test_every_exception_class_derives_from_the_package_base():
    from t2tvit.errors import T2TViTError
    orphans = []
    for info in pkgutil.walk_packages([str(SRC)], 't2tvit.'):
        if info.name.endswith('__main__'):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name
                    and not issubclass(obj, T2TViTError)):
                orphans.append(f'{info.name}.{name}')
    assert not orphans, f'exception classes outside t2tvit.errors.T2TViTError: {orphans}'
