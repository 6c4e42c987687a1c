"""scripts/gpu_check.sh runs where a CPU cannot (a GPU, rarely at hand, for a few minutes): these tests keep it
in step with the code, so that its one run is not lost to a renamed function, a changed signature or knob."""
import ast
import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys

import pytest

import configurator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
SNIPPETS = dict(re.findall(r'cat >"\$WORK/(\w+)\.py" <<\'EOF\'\n(.*?)\nEOF\n', SCRIPT, re.S))  # name -> Python
PROJECT = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}


def test_the_script_parses_and_holds_its_three_python_files():
    assert subprocess.run(["bash", "-n", "-c", SCRIPT]).returncode == 0
    assert sorted(SNIPPETS) == ["checks", "head", "nccl1"]


def _uses(tree):
    """(module, attribute, node) for each project-module attribute the snippet reads, calls or assigns."""
    modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} & PROJECT
    return [(importlib.import_module(n.value.id), n.attr, n) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules]


@pytest.mark.parametrize("name", ["checks", "head", "nccl1"])
def test_every_project_function_the_script_calls_exists_and_takes_its_arguments(name):
    tree = ast.parse(SNIPPETS[name])
    uses = _uses(tree)
    assert uses
    for module, attr, _ in uses:
        assert hasattr(module, attr), f"gpu_check.sh ({name}.py) uses {module.__name__}.{attr}, which is gone"
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
        fn = next((getattr(m, a) for m, a, node in uses if node is call.func), None)
        if not inspect.isfunction(fn) or any(isinstance(a, ast.Starred) for a in call.args):
            continue
        inspect.signature(fn).bind(*call.args, **{k.arg: k.value for k in call.keywords if k.arg})  # TypeError if not
    for node in (n for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Lambda)):
        for module, attr, target in uses:  # a function replaced by a lambda keeps its parameters
            if target in node.targets:
                want = list(inspect.signature(getattr(module, attr)).parameters)
                assert [a.arg for a in node.value.args.args] == want, f"{module.__name__}.{attr}{want}"


def test_every_training_command_of_the_script_loads(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "configs"))
    import coldstart
    monkeypatch.setattr(coldstart, "prepare", lambda *a, **k: "cold-start")  # the demo's model, not built here
    demo = re.search(r'^D="(.*)"$', SCRIPT, re.M).group(1)
    commands = [demo + line.split("$D", 1)[1].split(" --output_dir")[0].replace("$m", m)  # train.py's and nccl1.py's
                for line in SCRIPT.splitlines() if "$D " in line for m in (("ddp", "fsdp") if "$m" in line else ("",))]
    assert len(commands) == 5
    for argv in map(shlex.split, commands):
        cfg = configurator.load(argv)
        assert cfg.device == "cuda" and cfg.model_name == "cold-start" and cfg.max_steps in (3, 4, 6, 12)


def test_the_scripts_test_selection_picks_some_tests_of_each_file():
    line = next(line for line in SCRIPT.splitlines() if "-m pytest" in line)
    args = shlex.split(line.split("-m pytest", 1)[1].rstrip(" &"))
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=ROOT,
                         capture_output=True, text=True).stdout  # -q twice: "file: count" lines
    picked = {f: int(n) for f, n in re.findall(r"^(tests/\S+\.py): (\d+)$", out, re.M)}
    files = [a for a in args if a.startswith("tests/")]
    assert len(files) == 3 and sorted(picked) == sorted(files) and min(picked.values()) > 0, out[-2000:]
    whole = sum(1 for ln in open(os.path.join(ROOT, "tests", "test_gpu_ready.py")) if ln.startswith("def test_"))
    assert picked["tests/test_gpu_ready.py"] < whole  # -k picks by test, not the whole file through its name
