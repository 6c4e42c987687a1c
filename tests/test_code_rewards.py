import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

import rewards_code
import sandbox as sandbox_lib
from registry import SPECS
from rewards import resolve, score
from rewards_code import code_completeness, code_correctness, code_execution, code_quality, code_syntax, extract_code

TIMEOUT = 2.0
ADD = "def add(a, b):\n    return a + b\n"
MBPP = {"test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]}
PYTHON = sys.executable


def nobody_python():
    """For a root trainer, a Python that uid 65534 can run (this one, else the system's), or None."""
    for python in (PYTHON, "/usr/bin/python3") if os.geteuid() == 0 else ():
        try:
            if subprocess.run([python, "-I", "-c", "import json"], user=65534, group=65534, extra_groups=[], cwd="/",
                              capture_output=True).returncode == 0:
                return python
        except OSError:
            pass
    return None


NOBODY_PYTHON = nobody_python()


@pytest.fixture(params=[
    pytest.param("namespace", marks=pytest.mark.skipif(not sandbox_lib._works("namespace"),
                                                        reason="no unprivileged user namespaces here")),
    "process",
    pytest.param("nobody", marks=pytest.mark.skipif(NOBODY_PYTHON is None,
                                                     reason="not root, or no Python that uid 65534 can run"))])
def sandbox(request, monkeypatch):
    """The sandbox param of each kind to test here; "nobody" is "process" for a root trainer, as uid 65534."""
    if request.param != "nobody":
        yield request.param
        return
    monkeypatch.setattr(sys, "executable", NOBODY_PYTHON)
    sandbox_lib._works.cache_clear()
    yield "process"
    sandbox_lib._works.cache_clear()


# --- extraction and static rewards


def test_extract_code_joins_python_blocks_and_skips_others():
    text = ("Here is the function:\n```python\ndef f():\n    return 1\n```\nUsage:\n```\nprint(f())\n```\n"
            "Run it with:\n```bash\npython f.py\n```\n")
    assert extract_code(text) == "def f():\n    return 1\n\n\nprint(f())\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"  # no fence: the whole text
    assert extract_code("```bash\nls\n```") == ""  # fences, but no Python block
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off before its fence
    assert extract_code("") == ""


def test_code_syntax():
    assert code_syntax(f"```python\n{ADD}```") == 1.0
    assert code_syntax("```python\nx = 1\n```\n```python\nx = (\n```") == 0.5  # one block of two compiles
    assert code_syntax("return 1") == 0.0  # a compile-time error, not only a parse error
    assert code_syntax("```python\n\n```") == 0.0  # a block needs a statement
    assert code_syntax("") == 0.0
    assert code_syntax("(" * 10000) == 0.0  # too deep for the parser: refused, not a crash


def test_code_quality():
    good = 'def add(a, b):\n    """Sum of a and b."""\n    return a + b\n'
    assert code_quality(good) == 1.0
    bad = ("from math import *\ndef AddNums(X, y):\n    try:\n        for i in X:\n            for j in y:\n"
           "                for k in y:\n                    pass\n    except:\n        pass\n")
    # syntax 1; style: 4 of 6 names (AddNums, X), lines 1, bare except 0, import * 0; docstrings 0; three loops 2/3
    assert code_quality(bad) == pytest.approx((1 + (4 / 6 + 1) / 4 + 0 + 2 / 3) / 4)
    assert code_quality(bad, check_syntax=False, check_style=False, check_comments=False) == pytest.approx(2 / 3)
    assert code_quality("x = (") == 0.0
    assert code_quality("x = 1  # one\n", check_syntax=False, check_style=False, check_efficiency=False) == 1.0
    with pytest.raises(ValueError, match="language"):
        resolve([{"type": "code_quality", "params": {"language": "javascript"}}])
    with pytest.raises(ValueError, match="at least one"):
        resolve([{"type": "code", "params": {"check_syntax": False, "check_style": False, "check_comments": False,
                                             "check_efficiency": False}}])


def test_code_completeness():
    assert code_completeness(ADD) == 1.0
    assert code_completeness("def f():\n    pass\n") == pytest.approx(2 / 3)  # a stub
    assert code_completeness('def f():\n    """Later."""\n    ...\n') == pytest.approx(1 / 3)  # a stub and a `...`
    assert code_completeness("def f():\n    raise NotImplementedError\n") == pytest.approx(2 / 3)
    assert code_completeness(ADD + "# TODO: negative numbers\n") == pytest.approx(2 / 3)
    assert code_completeness("print(sum(map(int, input().split())))\n") == pytest.approx(2 / 3)  # no function
    assert code_completeness("def f(:\n") == 0.0


# --- running code


def test_correctness_scores_mbpp_and_stdin_cases(sandbox):
    p = {"timeout": TIMEOUT, "sandbox": sandbox}
    half = "```python\ndef add(a, b):\n    return 3\n```"
    reverse = "```python\nprint(input()[::-1])\n```"
    cases = {"test_cases": [{"input": "abc\n", "expected_output": "cba\n"}, {"input": "xy", "expected_output": "xy"}]}
    texts = [f"```python\n{ADD}```", half, "```python\ndef add(a, b):\n```", reverse, "no code here"]
    rows = [MBPP, MBPP, MBPP, cases, MBPP]
    assert rewards_code._correctness_batch(texts, [None] * 5, rows, **p) == [1.0, 0.5, 0.0, 0.5, 0.0]
    setup = {"test_list": ["assert area(2) == pytest_approx(4 * pi)"], "test_imports": ["from math import pi"],
             "test_setup_code": "pytest_approx = lambda x: round(x, 6)"}
    assert code_correctness("def area(r):\n    return round(pi * r * r, 6)\n", **setup, **p) == 1.0
    stdlib = ("import collections, dataclasses, enum, logging, os, tempfile, typing\n"
              "P = collections.namedtuple('P', 'x y')\nC = enum.Enum('C', 'A B')\nlogging.warning('hi')\n"
              "D = dataclasses.make_dataclass('D', ['x'])\nN = typing.NamedTuple('N', [('a', int)])\n"
              "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'f'), 'w').write('ok')\n"
              "open('mine.txt', 'w').write('ok')\nassert open('mine.txt').read() == 'ok'\n" + ADD)
    assert code_correctness(stdlib, **MBPP, **p) == 1.0  # the audit hook leaves ordinary code alone
    assert code_correctness(ADD, **p) == 0.0  # a row without tests (check_columns warns at start)


def test_execution(sandbox):
    p = {"timeout": TIMEOUT, "sandbox": sandbox}
    echo = {"test_cases": [{"input": "hi\n", "expected_output": "hi"}]}
    texts = [ADD, "raise ValueError('bad')", "print(input())", "print(input())", ""]
    rows = [{}, {}, echo, {}, {}]  # the last input() meets an empty stdin
    assert rewards_code._execution_batch(texts, [None] * 5, rows, **p) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert code_execution(ADD, **p) == 1.0


def test_score_uses_the_batched_path():
    rs = resolve([{"type": "code_correctness", "params": {"timeout": TIMEOUT}}, {"type": "code_execution"}])
    total, cols = score(rs, [ADD, "def add(a, b):\n    return 3\n"], [None, None], [MBPP, MBPP])
    assert cols == {"code_correctness": [1.0, 0.5], "code_execution": [1.0, 1.0]}
    assert total == [2.0, 1.5]


def test_check_rejects_bad_params():
    for params, match in (({"timeout": 0}, "timeout"), ({"memory_mb": 8}, "memory_mb"),
                          ({"max_workers": 0}, "max_workers"), ({"sandbox": "docker"}, "sandbox")):
        with pytest.raises(ValueError, match=match):
            resolve([{"type": "code_execution", "params": params}])


# --- hostile code: each snippet defines a correct add(), then does something hostile at load time that
# raises, dies or hangs when the sandbox holds (its last line asserts that the attack worked), so every score is 0.

HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "10 GB allocation": "x = bytearray(10 * 1024 ** 3)",
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "signal the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                         "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "SIGIO to another process": """
import fcntl, os, time
r, w = os.pipe()
fcntl.fcntl(r, fcntl.F_SETOWN, {victim})
fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC)
os.write(w, b'x')
time.sleep(0.2)""",
    "pidfd_send_signal to another process": "import os, signal\n"
                                             "signal.pidfd_send_signal(os.pidfd_open({victim}), signal.SIGKILL)",
    "write through a device node": "import os, stat\nos.mknod('n', stat.S_IFCHR | 0o600, os.makedev(1, 3))\n"
                                   "open('n', 'wb').write(b'x')",
    "open a socket": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')",
    "read an environment secret": """
import os
def leaks():
    found = os.environ.get('NMGRPO_TEST_SECRET', '')
    for path in ('/proc/self/environ', f'/proc/{{os.getppid()}}/environ', '/proc/1/environ'):
        try:
            found += open(path, errors='replace').read()
        except OSError:
            pass
    return found
assert 'hunter2' in leaks()""",
    "write outside its folder": """
import os, pathlib, shutil
def attempt(f):
    try:
        f()
    except Exception:
        pass
attempt(lambda: open({out!r} + '1', 'w').write('x'))
attempt(lambda: os.close(os.open({out!r} + '2', os.O_CREAT | os.O_WRONLY)))
attempt(lambda: pathlib.Path({out!r} + '3').write_text('x'))
attempt(lambda: os.mkdir({out!r} + '4'))
attempt(lambda: (open('mine', 'w').close(), os.rename('mine', {out!r} + '5')))
attempt(lambda: (open('mine', 'w').close(), shutil.copy('mine', {out!r} + '6')))
attempt(lambda: (os.symlink({out!r} + '7', 'link'), open('link', 'w').write('x')))
attempt(lambda: open('../' + os.path.basename({out!r}) + '8', 'w').write('x'))
attempt(lambda: os.system('touch ' + {out!r} + '9'))
assert any(os.path.exists({out!r} + str(i)) for i in range(1, 10))""",
    "run a process or native code": """
def attempt(f):
    try:
        return f() is not None
    except Exception:
        return False
import os
assert (attempt(lambda: __import__('subprocess').run(['true']))
        or attempt(lambda: __import__('ctypes').CDLL(None))
        or attempt(lambda: os.posix_spawn('/bin/true', ['true'], {{}})))""",
    "look at the runner's frames": """
import gc, sys
def attempt(f):
    try:
        return f() is not None
    except Exception:
        return False
def gen():
    yield 1
def caught():
    try:
        raise KeyError
    except KeyError as e:
        return e.__traceback__.tb_frame.f_back
assert (attempt(lambda: sys._getframe(1)) or attempt(caught) or attempt(lambda: gen().gi_frame)
        or attempt(lambda: gc.get_objects()) or attempt(lambda: gc.get_referrers(sys))
        or attempt(lambda: sys._current_frames()) or attempt(lambda: sys.settrace(lambda *a: None)))""",
    "print the pass markers": """
import os
for line in ('PASS', 'done', 'pass 0', '1', 'True', '{{"passed": 1}}'):
    print(line)
    for fd in range(1, 64):
        try:
            os.write(fd, (line + '\\n').encode())
        except OSError:
            pass
os._exit(0)""",
}


def test_hostile_code_scores_zero_and_harms_nothing(sandbox, tmp_path, monkeypatch):
    monkeypatch.setenv("NMGRPO_TEST_SECRET", "hunter2")
    out = str(tmp_path / "escaped")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    victim = subprocess.Popen(["sleep", "60"])  # a process of the trainer's user, for the signals to aim at
    names = list(HOSTILE)
    texts = [ADD + HOSTILE[n].format(port=listener.getsockname()[1], out=out, victim=victim.pid) for n in names]
    before = set(os.listdir(tempfile.gettempdir()))
    p = {"timeout": TIMEOUT, "sandbox": sandbox, "max_workers": len(texts)}
    table = {}
    for batch, row in ((rewards_code._correctness_batch, MBPP), (rewards_code._execution_batch, {})):
        table[batch.__name__] = dict(zip(names, batch(texts, [None] * len(texts), [row] * len(texts), **p)))
    assert all(v == 0.0 for scores in table.values() for v in scores.values()), table
    assert os.listdir(tmp_path) == []  # nothing written outside
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected
    listener.close()
    left = {f for f in set(os.listdir(tempfile.gettempdir())) - before if f.startswith(("nmgrpo-code-", "escaped"))}
    assert not left  # the working directories are gone, and nothing escaped into the temp folder either
    assert os.environ["NMGRPO_TEST_SECRET"] == "hunter2"  # and this process is alive and unchanged
    assert victim.poll() is None  # and so is the other one
    victim.kill()
    victim.wait()


def test_the_code_sees_an_allow_listed_environment_and_no_secret(sandbox, monkeypatch):
    for name in ("HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "NMGRPO_PLANTED"):
        monkeypatch.setenv(name, "planted-secret")
    names = "```python\nimport os\nprint(*sorted(os.environ))\n```"  # exactly the allow-list
    assert code_correctness(names, sandbox=sandbox, test_cases=[{"input": "", "output": "HOME LANG PATH TMPDIR"}]) == 1
    leak = "```python\nimport os\nprint('clean' if 'planted-secret' not in str(os.environ) else 'leak')\n```"
    assert code_correctness(leak, sandbox=sandbox, test_cases=[{"input": "", "output": "clean"}]) == 1.0


def test_hijacked_report_pipe_forges_nothing(sandbox):
    """The code swaps its own pipe in for the report pipe, reads what the runner reports and replays it."""
    hijack = """
import os, stat
def is_pipe(fd):
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False
saved, (spy, w) = [], os.pipe()
for fd in [fd for fd in range(3, 64) if is_pipe(fd) and fd not in (spy, w)]:
    saved.append(os.dup(fd))
    os.dup2(w, fd)
os.set_blocking(spy, False)
def add(a, b):
    try:
        seen = os.read(spy, 1 << 16)
    except OSError:
        seen = b''
    for fd in saved:
        for line in seen.split():  # replay what it saw, and guesses at other passes
            for guess in (line, line.replace(b'0', b'1'), line.replace(b'0', b'2'), line + b' pass 1', b'pass 1'):
                os.write(fd, guess + b'\\n')
    return a + b if a == 1 else 0
"""
    rows = [{"test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(2, 3) == 5"]}]
    scores = rewards_code._correctness_batch([hijack], [None], rows, timeout=TIMEOUT, sandbox=sandbox)
    assert scores == [pytest.approx(1 / 3)]  # the replayed pass is real; no guess counts


@pytest.mark.skipif(not sandbox_lib._works("namespace"), reason="no unprivileged user namespaces here")
def test_namespaces_hold_without_the_audit_hook(tmp_path):
    """The namespace layer alone (a plain python in place of the runner): no network, read-only mounts, no parent."""
    listener = socket.create_server(("127.0.0.1", 0))
    probe = f"""
import os, socket
def attempt(f):
    try:
        f()
        return 'yes'
    except OSError:
        return 'no'
print(attempt(lambda: socket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=1)),
      attempt(lambda: open({str(tmp_path / "escaped")!r}, 'w')), attempt(lambda: open('mine', 'w')),
      attempt(lambda: os.kill({os.getpid()}, 0)), os.getpid(), os.getppid())
"""
    with tempfile.TemporaryDirectory() as tmp:
        command = sandbox_lib._command(os.path.realpath(tmp), "namespace", 64)[:-1] + [probe]
        out = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=30).stdout
    assert out.split() == ["no", "no", "yes", "no", "1", "0"]  # network, outside, inside, this process; pid 1
    assert os.listdir(tmp_path) == []
    listener.close()
    fill = "for i in range(100):\n    open(f'f{i}', 'wb').write(b'x' * (10 << 20))\n"
    assert code_execution(fill, sandbox="namespace", memory_mb=64, timeout=TIMEOUT) == 0.0  # a 64 MB tmpfs is full


# --- the layers under the audit hook, each on its own: every assert holds when its layer does

LAYERS_CODE = """
import _imp, _signal, fcntl, importlib, os, posix, signal, sys
r, w = os.pipe()
GONE = ('pidfd_open', 'pidfd_send_signal', 'mknod', 'mkfifo', 'chroot', 'setuid', 'setresgid', 'setgroups',
        'setpriority', 'sched_setaffinity')
def refused(f):
    try:
        f()
    except PermissionError as e:
        return str(e).startswith('sandbox:')
    return False
def fresh(name):
    saved = sys.modules.pop(name)
    try:
        return importlib.import_module(name)
    except Exception:
        return None
    finally:
        sys.modules[name] = saved
"""
LAYERS = {
    "fcntl F_SETOWN": "assert refused(lambda: fcntl.fcntl(r, fcntl.F_SETOWN, os.getpid()))",
    "fcntl F_SETOWN_EX": "assert refused(lambda: fcntl.fcntl(r, 15, bytes(8)))",
    "fcntl F_SETSIG": "assert refused(lambda: fcntl.fcntl(r, fcntl.F_SETSIG, 0))",
    "ioctl FIOSETOWN": "assert refused(lambda: fcntl.ioctl(r, 0x8901, bytes(4)))",
    "functions without an audit event are gone":
        "assert not [(m, n) for m in (os, posix, signal, _signal) for n in GONE if hasattr(m, n)]",
    "no fresh posix or _signal brings them back":
        "assert not hasattr(_imp, 'create_builtin') and fresh('posix') is fresh('_signal') is None",
    "from os import * still works": "assert exec('from os import *', {}) is None",
    "a device": "assert refused(lambda: open(DEVICE, 'rb'))",
    "null, zero and urandom": "assert open('/dev/null', 'wb').write(b'x') == 1 and open('/dev/zero', 'rb').read(1) "
                              "== bytes(1) and len(open('/dev/urandom', 'rb').read(2)) == 2",
}


def test_each_layer_holds(sandbox):
    device = next((d for d in ("/dev/full", "/dev/tty", "/dev/ptmx")
                   if os.path.exists(d) and stat.S_ISCHR(os.stat(d).st_mode)), None)
    layers = {n: t for n, t in LAYERS.items() if device or n != "a device"}
    if sandbox_lib._kind(sandbox) == "nobody":  # the process sandbox of a root trainer
        layers["uid 65534"] = "assert (os.getuid(), os.getgid(), os.getgroups()) == (65534, 65534, [])"
    code = LAYERS_CODE + f"DEVICE = {device!r}\n"
    scores = rewards_code._correctness_batch([code] * len(layers), [None] * len(layers),
                                             [{"test_list": [t]} for t in layers.values()], timeout=TIMEOUT,
                                             sandbox=sandbox, max_workers=len(layers))
    assert dict(zip(layers, scores)) == dict.fromkeys(layers, 1.0)


def test_auto_warns_once_when_it_falls_back_to_the_process_sandbox(monkeypatch, caplog):
    sandbox_lib._warn.cache_clear()
    monkeypatch.setattr(sandbox_lib, "_works", lambda kind: False)
    try:
        with caplog.at_level(logging.WARNING, logger="sandbox"):
            sandbox_lib.check(sandbox="process")
            assert not [r for r in caplog.records if "falls back" in r.getMessage()]
            for _ in range(2):
                sandbox_lib.check(sandbox="auto")
        assert len([r for r in caplog.records if "falls back to the weaker process sandbox" in r.getMessage()]) == 1
        assert sandbox_lib._kind("auto") == "process"
        assert any("runs code as root" in r.getMessage() for r in caplog.records) == (os.geteuid() == 0)
        monkeypatch.setattr(sandbox_lib, "_works", lambda kind: kind == "nobody")
        kind = "nobody" if os.geteuid() == 0 else "process"
        assert sandbox_lib._kind("auto") == sandbox_lib._kind("process") == kind
    finally:
        sandbox_lib._warn.cache_clear()


def test_code_runners_need_linux():
    assert SPECS["code_execution"].extra == SPECS["code_correctness"].extra == "Linux"


# a stand-in trainer: one run of code that sleeps; the test kills it with SIGKILL
TRAINER = """
import sys
import sandbox
sys.executable = sys.argv[2]
sandbox.run({"mode": "run", "code": "import time\\ntime.sleep(60)", "stdin": ""}, 60.0, 256, sys.argv[1])
"""


def state(pid):
    """(state letter, parent pid) of a process, or None once it is gone."""
    try:
        letter, ppid = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[:2]
        return letter, int(ppid)
    except OSError:
        return None


def family(pid):
    """{pid: argv[0]} of the processes below pid."""
    parents = {int(p): s[1] for p in filter(str.isdigit, os.listdir("/proc")) if (s := state(p))}
    below, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for p in [p for p, ppid in parents.items() if ppid == parent]:
            try:
                below[p] = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0].decode()
            except OSError:
                continue
            todo.append(p)
    return below


def test_children_die_with_the_trainer(sandbox, tmp_path):
    tmp_path.chmod(0o755)  # for uid 65534
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    root = os.path.dirname(os.path.abspath(sandbox_lib.__file__))
    trainer = subprocess.Popen([PYTHON, "-c", TRAINER, sandbox_lib._kind(sandbox), sys.executable], cwd=root, env=env)
    deadline = time.monotonic() + 20
    while sys.executable not in family(trainer.pid).values():  # the runner has started
        assert time.monotonic() < deadline and trainer.poll() is None
        time.sleep(0.05)
    below = family(trainer.pid)
    trainer.kill()
    trainer.wait()
    while any((state(p) or "Z")[0] != "Z" for p in below):  # gone, or a zombie
        assert time.monotonic() < deadline, below
        time.sleep(0.05)


# a child that reads its job only after 5 s, then reports a signed "done": a run that outlived its 1 s timeout
# would return (True, 0)
LATE = ("import hashlib, json, sys, time\ntime.sleep(5)\n"
        "key = bytes.fromhex(json.loads(sys.stdin.buffer.read())['key'])\n"
        "print(hashlib.blake2b(b'done', key=key, digest_size=16).hexdigest())")


def test_a_child_that_never_reads_its_job_times_out(monkeypatch):
    monkeypatch.setattr(sandbox_lib, "_command", lambda tmp, kind, memory_mb: [sys.executable, "-c", LATE])
    assert sandbox_lib.run({"mode": "run", "code": "", "stdin": "x" * (1 << 20)}, 1.0, 256, "process") == (False, 0)


def test_tests_must_be_asserts_and_test_cases_may_be_json():
    assert rewards_code._tests({"test_cases": '[{"input": "1 2", "output": "3"}, "assert add(1, 2) == 3"]'}) == [
        {"input": "1 2", "output": "3"}, {"assert": "assert add(1, 2) == 3"}]
    two_lines = "x = add(1, 2)\nassert x == 3"
    assert rewards_code._tests({"test_list": [two_lines]}) == [{"assert": two_lines}]
    for row, match in (({"test_list": ["add(1, 2) == 3"]}, r"test_list .*'add\(1, 2\) == 3'"),
                       ({"test_list": ["print(add(1, 2))"]}, "test_list .*assert"),
                       ({"test_cases": ["assert add(1, 2) =="]}, "test_cases .*assert"),
                       ({"test_cases": "assert add(1, 2) == 3"}, "test_cases is a string, but not the JSON"),
                       ({"test_cases": "3"}, "test_cases is a string, but not the JSON")):
        with pytest.raises(ValueError, match=match):
            rewards_code._tests(row)
    wrong, right = "def add(a, b):\n    return 0\n", "a, b = map(int, input().split())\nprint(a + b)\n"
    cases = {"test_cases": '[{"input": "1 2", "output": "3"}]'}
    assert rewards_code._correctness_batch([wrong, right], [None] * 2, [cases] * 2, timeout=TIMEOUT) == [0.0, 1.0]


def test_asserts_see_the_builtins_of_before_the_code():
    shadow = "def similar(a, b):\n    return None\ndef set(*a):\n    return 1\n"
    patch = "import builtins\nbuiltins.sorted = lambda *a, **k: [1]\ndef f(x):\n    return [3, 2]\n"
    own = "def sum(xs):\n    return 0\ndef total(xs):\n    return len(xs) + sum(xs)\n"  # a helper for itself alone
    rows = [{"test_list": ["assert set(similar((3, 4), (4, 5))) == set((4,))"]},
            {"test_list": ["assert sorted(f(1)) == [1]"]},
            {"test_list": ["assert total([1, 2]) == 2", "assert sum([1, 2]) == 3"]}]
    assert rewards_code._correctness_batch([shadow, patch, own], [None] * 3, rows, timeout=TIMEOUT) == [0.0, 0.0, 1.0]
