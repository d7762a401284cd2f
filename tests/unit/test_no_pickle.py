"""No code path may deserialize with pickle or evaluate strings: the source tree is checked with `ast`.

Walks every .py file under services/ and shared/ and fails on imports of pickle-like modules,
calls to eval/exec, torch.load without weights_only=True, yaml.load without a SafeLoader, and
numpy.load with allow_pickle=True.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "cloudpickle", "dill", "shelve", "joblib"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def problems(source: str, filename: str = "<src>") -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            out.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("eval", "exec", "builtins.eval", "builtins.exec", "__import__"):
                out.append(f"{where} calls {name}")
            elif name == "torch.load":
                weights_only = _kw(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    out.append(f"{where} calls torch.load without weights_only=True")
            elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                safe = loader is not None and _dotted(loader).rsplit(".", 1)[-1] in SAFE_YAML_LOADERS
                if last not in ("load", "load_all") or not safe:
                    out.append(f"{where} calls {name} without a SafeLoader")
            elif name in ("np.load", "numpy.load"):
                allow = _kw(node, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    out.append(f"{where} calls {name} with allow_pickle")
    return out


def test_source_tree_has_no_pickle_or_eval() -> None:
    files = sorted(p for d in ("services", "shared") for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 30  # the walk really sees the tree
    found = [p for f in files for p in problems(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from marshal import loads",
        "import dill.settings",
        "import shelve",
        "eval('1')",
        "exec(code)",
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "import yaml\nyaml.load(s)",
        "import yaml\nyaml.load(s, Loader=yaml.FullLoader)",
        "import yaml\nyaml.unsafe_load(s)",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
    ],
)
def test_checker_catches(source: str) -> None:
    assert problems(source)


@pytest.mark.parametrize(
    "source",
    [
        "import json\njson.loads(s)",
        "import torch\ntorch.load('x.pt', weights_only=True)",
        "import yaml\nyaml.safe_load(s)",
        "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
        "import numpy as np\nnp.load('a.npy')",
        "model.eval()",
    ],
)
def test_checker_allows(source: str) -> None:
    assert problems(source) == []
