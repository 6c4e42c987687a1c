"""
The host side of the sandbox that runs model-written code: a fresh `python -I -B` per job (the program of
sandbox_child.py), in new namespaces where this machine allows them, else as a plain process (as uid 65534 for a root
trainer), under rlimits and a wall-clock timeout. run() says what it stops and what it does not. Imports nothing of
ours but common.
"""
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import pathlib
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from common import did_you_mean

# the child's program, read once here and passed as text with -c: the child opens no file of ours, so uid 65534
# needs to read none, and nothing it writes can change what the next child runs
_CHILD = pathlib.Path(__file__).with_name("sandbox_child.py").read_text()

# Inside fresh user, mount, pid and network namespaces: mount a tmpfs of $3 MB on the working directory (and enter
# it, so that relative paths resolve there), remount every other mount read-only, then exec the rest of the command
# line (setpriv, which drops every capability).
_NS_SETUP = ('d=$1 m=$2 mb=$3; shift 3; "$m" -t tmpfs -o "size=${mb}m,mode=700" tmpfs "$d" && cd "$d" || exit 1; '
             'while read -r _ _ _ _ p _; do [ "$p" = "$d" ] || "$m" -o remount,bind,ro "$p" || exit 1; '
             'done < /proc/self/mountinfo; unset PWD OLDPWD; exec "$@"')


@functools.lru_cache(maxsize=None)
def _tools():
    """Absolute paths of unshare, mount, setpriv and sh, or None when one is missing."""
    paths = [shutil.which(t) for t in ("unshare", "mount", "setpriv", "sh")]
    return None if None in paths else paths


@functools.lru_cache(maxsize=None)
def _orphan_kill():
    """`setpriv --pdeathsig KILL`, a command prefix that kills the child when the thread that started it dies, or []
    where setpriv is missing or lacks --pdeathsig."""
    prefix = [shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL"]
    try:
        works = subprocess.run([*prefix, sys.executable, "-c", ""], stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        works = False
    return prefix if works else []


def _command(tmp, kind, memory_mb):
    python = [sys.executable, "-I", "-B", "-c", _CHILD]
    if kind != "namespace":
        return [*_orphan_kill(), *python]
    unshare, mount, setpriv, sh = _tools()  # unshare's --kill-child takes the namespace down when unshare dies
    return [*_orphan_kill(), unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount",
            "--mount-proc", "--kill-child", sh, "-c", _NS_SETUP, "sh", tmp, mount, str(memory_mb),
            setpriv, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", *python]


def _write(stream, data, deadline):
    """Write data to a child's stream and close it; give up when the deadline passes or the child closes its end."""
    fd, poller, data = stream.fileno(), select.poll(), memoryview(data)
    os.set_blocking(fd, False)
    poller.register(fd, select.POLLOUT)
    while data:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            break
        try:
            data = data[os.write(fd, data):]
        except BrokenPipeError:
            break
    stream.close()


def _read(stream, deadline, limit=1 << 20):
    """What a child writes to stream until it closes it, the deadline passes or `limit` bytes have come."""
    poller, fd, data = select.poll(), stream.fileno(), b""
    poller.register(fd, select.POLLIN)
    while len(data) < limit:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return data


def _kill(proc):
    """SIGKILL the child's process group and the child itself (should it have left the group), reap it."""
    for kill in (os.killpg, os.kill):
        try:
            kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass


def _sign(key, msg):
    return hashlib.blake2b(msg.encode(), key=key, digest_size=16).hexdigest().encode()


_NOBODY = 65534  # the uid and gid of the "nobody" sandbox


def run(job, timeout, memory_mb, kind):
    """
    Run one job in a fresh process: (whether the program ran to completion, how many of job["tests"] passed).
    kind: "namespace", "process", or "nobody" (process, as uid and gid 65534, for a root trainer).

    What it does: the code runs only in a child `python -I -B` (never in this process), with a minimal environment
    (PATH, LANG, and HOME = TMPDIR = its working directory, a private temporary directory deleted afterwards), so none
    of the trainer's environment variables reach it. Limits: `timeout` seconds of wall clock for the whole run (the
    job's write to its stdin included), after which its process group is killed; RLIMIT_CPU ceil(timeout) + 1 s,
    RLIMIT_AS memory_mb, RLIMIT_FSIZE 16 MB, RLIMIT_NOFILE 64, RLIMIT_NPROC 0 (no threads or processes), RLIMIT_CORE 0;
    at most 1 MB of its output is read. Where setpriv has --pdeathsig, the child is killed when the trainer dies, even
    by SIGKILL. "namespace": new user, pid, mount and network namespaces (unshare): no network (its own loopback is
    down), the trainer is invisible and cannot be signalled, every process in it dies with it, every mount is read-only
    but its working directory, a tmpfs of memory_mb, and it holds no capabilities (setpriv, no_new_privs). "nobody":
    no supplementary groups, its directory is chowned to it, and it can signal no process of the trainer's and write
    none of its files (a root trainer without namespaces gets it where uid 65534 can run Python in TMPDIR; else its
    code runs as root, with a warning). In every kind, before the code runs, the child removes from os, posix,
    signal and _signal the functions that no audit event guards and that signal or tune other processes or make
    nodes, roots and users (pidfd_open, pidfd_send_signal, mknod, mkfifo, chroot, the setuid family, setpriority,
    sched_setaffinity/setparam/setscheduler), and _imp.create_builtin, which would make those modules afresh. Then an
    audit hook refuses: sockets and name lookups; subprocess, os.system, exec, fork, posix_spawn; os.kill, killpg,
    pthread_kill; fcntl F_SETOWN, F_SETOWN_EX, F_SETSIG and every ioctl (which aim SIGIO at a process); ctypes, cffi
    and other native-call modules; subinterpreters; opening anything under /proc, or a device but /dev/null, zero,
    random and urandom; writing, creating, removing or renaming outside its directory (and /dev/null); chdir, chmod,
    chown, utime, xattrs, links; setrlimit; more audit hooks; and the ways to the child's memory:
    gc.get_objects/get_referrers/get_referents, sys._getframe/_current_frames, the frames of tracebacks and generators,
    settrace/setprofile, code.__new__ and replacing a function's __code__. A pass counts only when signed with a MAC
    keyed by a random key the child reads from stdin, so printing markers, or replaying and hijacking its report pipe,
    forges nothing; sys.exit and os._exit only end the run.

    What it does NOT stop: native code (an installed C extension, a shared library it writes and loads through
    importlib, a hand-made code object from marshal.loads, an interpreter bug) can do whatever its process may do,
    including reading the key, forging passes and calling the removed functions: the audit hook only sees Python-level
    calls. Except as "nobody", the code runs as the trainer's user ("namespace" maps root to root, whom RLIMIT_NPROC
    exempts), so it can read whatever that user can read, and through native code reach Unix sockets in the file
    system. Timing and cache side channels. Tests as weak as their asserts: an object whose __eq__ always returns True
    passes `assert f(x) == y`, and code that patches a module the tests use (`math.isclose = ...`, an entry of
    sys.modules) changes what they check: asserts get the builtins of before the code, not fresh modules. Without
    namespaces ("process" and "nobody": sandbox="process", or "auto" where they do not work, which it logs once) the
    disk fills at 16 MB a file, and native code has the network and, except as "nobody", can signal the trainer. With
    namespaces the tmpfs lives in RAM on top of RLIMIT_AS: up to 2 x memory_mb per run, times the parallel runs. A
    trainer that is killed leaves its runs' directories behind (nmgrpo-code-* under TMPDIR).
    """
    key = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="nmgrpo-code-", ignore_cleanup_errors=True) as tmp:
        tmp = os.path.realpath(tmp)
        payload = json.dumps({**job, "key": key.hex(), "tmp": tmp, "cpu": math.ceil(timeout) + 1,
                              "memory": memory_mb << 20}).encode()
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}  # an allow-list: no secrets
        user = {}
        if kind == "nobody":
            os.chown(tmp, _NOBODY, _NOBODY)
            user = {"user": _NOBODY, "group": _NOBODY, "extra_groups": []}
        deadline = time.monotonic() + timeout
        # The parent-death signal fires when the thread that started the child exits: this thread outlives the
        # child, as it reaps it (_kill) before it returns.
        proc = subprocess.Popen(_command(tmp, kind, memory_mb), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd=tmp, env=env, start_new_session=True, **user)
        try:
            _write(proc.stdin, payload, deadline)
            signed = set(_read(proc.stdout, deadline).split())
        finally:
            _kill(proc)
    passed = sum(_sign(key, f"pass {i}") in signed for i in range(len(job.get("tests", ()))))
    return _sign(key, "done") in signed, passed


@functools.lru_cache(maxsize=None)
def _works(kind):
    """Whether a kind of sandbox works here: probed once by running an empty program in it."""
    if kind == "namespace" and _tools() is None:
        return False
    try:
        return run({"mode": "run", "code": "", "stdin": ""}, 10.0, 256, kind)[0]
    except OSError:  # Python cannot be run (by uid 65534, say)
        return False


def _kind(sandbox):
    """The kind of sandbox that runs code for a sandbox param, here (see run)."""
    if sandbox != "process" and _works("namespace"):
        return "namespace"
    return "nobody" if os.geteuid() == 0 and _works("nobody") else "process"


@functools.lru_cache(maxsize=None)
def _warn(message):
    """Log a warning, once."""
    logging.getLogger(__name__).warning("code sandbox: %s", message)


SANDBOXES = ("auto", "namespace", "process")


def check(timeout=5.0, memory_mb=512, max_workers=None, sandbox="auto"):
    """ValueError on bad params, or sandbox='namespace' where namespaces do not work; probes the kind once."""
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or not 0 < timeout < math.inf:
        raise ValueError(f"code sandbox: timeout must be a number of seconds > 0, got {timeout!r}")
    for name, v, least in (("memory_mb", memory_mb, 64), ("max_workers", max_workers, 1)):
        if (v is not None or name == "memory_mb") and (not isinstance(v, int) or isinstance(v, bool) or v < least):
            raise ValueError(f"code sandbox: {name} must be an integer >= {least}, got {v!r}")
    if sandbox not in SANDBOXES:
        raise ValueError(f"code sandbox: sandbox must be one of {SANDBOXES}, got {sandbox!r}"
                         f"{did_you_mean(sandbox, SANDBOXES)}")
    kind = _kind(sandbox)  # probed once, here at start-up
    if sandbox == "namespace" and kind != "namespace":
        raise ValueError("code sandbox: sandbox='namespace' needs working unprivileged user namespaces and "
                         "util-linux (unshare, mount, setpriv), which this machine lacks; use 'auto' or 'process'")
    if sandbox == "auto" and kind != "namespace":
        _warn("sandbox='auto' falls back to the weaker process sandbox (audit hook and rlimits; see sandbox.run), "
              "as " + ("util-linux's unshare, mount or setpriv is missing" if _tools() is None else
                       "a test run in new user, mount, pid and network namespaces failed (unprivileged user namespaces "
                       "are off under Docker's default seccomp profile and AppArmor on Ubuntu >= 23.10)")
              + "; set sandbox='process' to silence this")
    if kind == "process" and os.geteuid() == 0:
        _warn(f"the process sandbox runs code as root, as uid 65534 cannot run {sys.executable} in a folder of "
              f"{tempfile.gettempdir()}; make both readable and searchable by others to run it as uid 65534")


def run_all(jobs, timeout, memory_mb, max_workers, sandbox):
    """(done, passed) of each job (None: nothing to run), in parallel, each in its own sandboxed process."""
    kind = _kind(sandbox)

    def one(job):
        return (False, 0) if job is None else run(job, timeout, memory_mb, kind)

    with ThreadPoolExecutor(max(1, min(len(jobs), max_workers or os.cpu_count() or 1))) as pool:
        return list(pool.map(one, jobs))
