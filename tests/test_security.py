"""Security scan of src/: no shell, no eval/exec, no unpickling, remote code never switched on unconditionally.

A config value (a path, a hub id, a task name) must never reach a shell or an interpreter: processes are started
with argument lists (no ``shell=True``, no ``os.system`` / ``os.popen``, no command string), nothing is
``eval``'d or ``exec``'d, weights are never unpickled (``torch.load`` only with ``weights_only=True``, no
``pickle.load``), and ``trust_remote_code`` is never a literal True: it comes from the model config.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

SHELL_CALLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("os", "spawnl"),
               ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"), ("pty", "spawn")}  # fmt: skip
PROCESS_CALLS = {"run", "call", "check_call", "check_output", "Popen"}
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("dill", "load"), ("joblib", "load"), ("marshal", "loads")}


def _dotted(node: ast.AST) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe construct in `source`, as 'file:line: what'."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                    found.append(f"{filename}:{node.lineno}: trust_remote_code hard-coded True")
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        func = node.func
        dotted = _dotted(func)
        keywords = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        if "shell" in keywords and not (isinstance(keywords["shell"], ast.Constant) and keywords["shell"].value is False):
            found.append(f"{where}: shell= other than False")
        if dotted in SHELL_CALLS:
            found.append(f"{where}: {'.'.join(dotted)} runs a shell")
        if isinstance(func, ast.Name) and func.id in ("eval", "exec", "compile", "__import__"):
            found.append(f"{where}: {func.id}()")
        if dotted in UNPICKLERS:
            found.append(f"{where}: {'.'.join(dotted)} unpickles")
        if dotted == ("torch", "load") and not _is_true(keywords.get("weights_only", ast.Constant(None))):
            found.append(f"{where}: torch.load without weights_only=True")
        if "trust_remote_code" in keywords and _is_true(keywords["trust_remote_code"]):
            found.append(f"{where}: trust_remote_code=True hard-coded")
        if dotted and dotted[0] == "subprocess" and dotted[1] in PROCESS_CALLS and node.args:
            if isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                found.append(f"{where}: subprocess.{dotted[1]} with a command string")
    return found


def test_src_has_no_shell_eval_or_unpickling():
    found = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        found += violations(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "unsafe constructs in src/:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "subprocess.run(cmd, shell=True)",
    "subprocess.Popen(f'git -C {path} log')",
    "os.system('ls ' + path)",
    "os.popen(path)",
    "eval(cfg.method.expr)",
    "exec(code)",
    "torch.load(path)",
    "torch.load(path, weights_only=False)",
    "pickle.load(open(path, 'rb'))",
    "AutoModel.from_pretrained(path, trust_remote_code=True)",
    "kwargs = {'trust_remote_code': True}",
])  # fmt: skip
def test_scanner_catches(snippet):
    """The scan can fail: each unsafe construct is found."""
    assert violations(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here)",
    "torch.load(path, weights_only=True)",
    "model.eval()",
    "AutoModel.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)",
    "args = {'trust_remote_code': cfg.model.family == 'internvl_chat'}",
])  # fmt: skip
def test_scanner_allows_safe_code(snippet):
    assert not violations(snippet), snippet


def test_pickled_weights_are_never_loaded(tmp_path):
    """A `.bin`-only checkpoint is refused by name before anything reads it (the pickle would run code)."""
    import pickle

    from mmbench_merge import MergeError
    from mmbench_merge.checkpoints import SafetensorsCheckpoint

    marker = tmp_path / "UNPICKLED"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(MergeError, match=r"only pickled weights \(pytorch_model\.bin\), which are never loaded"):
        SafetensorsCheckpoint(tmp_path)
    assert not marker.exists()
