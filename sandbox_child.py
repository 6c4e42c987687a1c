"""
The sandbox's child program. sandbox.py runs its text as `python -I -B -c <text>` (it is never imported there): it
reads its job (code, tests, key, limits) from stdin, sets its rlimits, removes the functions no audit event guards,
installs the audit hook and runs the code; it reports "done" and "pass <i>" to the parent, each signed with the job's
key. Everything it uses once user code has run is bound beforehand (default args, closures, locals of main), so user
code cannot patch it through builtins or modules. It imports nothing of ours.
"""
import builtins
import hashlib
import io
import json
import os
import resource
import signal
import sys

NATIVE = frozenset(("ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "_xxsubinterpreters",
                    "_xxinterpchannels", "_testcapi", "_testinternalcapi", "_sqlite3", "_dbm", "_gdbm", "syslog"))
# functions that signal or tune other processes, or make device nodes, fifos, roots and users, with no audit event
UNAUDITED = ("pidfd_open", "pidfd_send_signal", "mknod", "mkfifo", "chroot", "setuid", "seteuid", "setreuid",
             "setresuid", "setgid", "setegid", "setregid", "setresgid", "setgroups", "initgroups", "setpriority",
             "sched_setaffinity", "sched_setparam", "sched_setscheduler")


def strip():
    """Remove UNAUDITED from os, posix, signal and _signal. _imp.create_builtin would make posix or _signal afresh,
    with them (importlib.import_module raises no import event), so it goes too, once every builtin module is loaded."""
    for name in sys.builtin_module_names:
        if name not in NATIVE:
            __import__(name)
    del sys.modules["_imp"].create_builtin
    for module in (os, sys.modules["posix"], signal, sys.modules["_signal"]):
        for name in UNAUDITED:
            module.__dict__.pop(name, None)
    os.__all__[:] = [name for name in os.__all__ if name not in UNAUDITED]


def guard(tmp):
    """The audit hook. Writes go to tmp only (and /dev/null); nothing under /proc is opened, and no device but
    /dev/null, zero, random and urandom."""
    deny = frozenset((
        "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.kill", "os.killpg",
        "signal.pthread_kill", "os.chdir", "os.chmod", "os.chown", "os.utime", "os.setxattr", "os.removexattr",
        "os.chflags", "os.lchflags", "os.lchmod", "os.symlink", "os.link", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "sys.addaudithook", "cpython.PyInterpreterState_New", "resource.setrlimit", "resource.prlimit",
        "code.__new__", "pty.spawn", "fcntl.ioctl"))
    owner = frozenset((8, 10, 15))  # fcntl's F_SETOWN, F_SETSIG, F_SETOWN_EX (Linux): they aim SIGIO at a process
    devices = frozenset(("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"))
    frames = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
    moves = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.truncate": 1, "os.rename": 2}
    writes = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def text(p, type=type, str=str, bytes=bytes, PermissionError=PermissionError):  # a PathLike could lie
        if type(p) is str:
            return p
        if type(p) is bytes:
            return p.decode("utf-8", "surrogateescape")
        raise PermissionError("sandbox: a path must be str or bytes")

    def resolve(p, tmp=tmp, readlink=os.readlink, OSError=OSError, PermissionError=PermissionError):
        todo = (p if p.startswith("/") else tmp + "/" + p).split("/")[::-1]
        done, hops = [], 0
        while todo:
            part = todo.pop()
            if part == "..":
                if done:
                    done.pop()
            elif part not in ("", "."):
                done.append(part)
                try:
                    link = readlink("/" + "/".join(done))
                except OSError:
                    continue
                hops += 1
                if hops > 40:
                    raise PermissionError("sandbox: too many symbolic links")
                done.pop()
                if link.startswith("/"):
                    done.clear()
                todo.extend(link.split("/")[::-1])
        return "/" + "/".join(done)

    def inside(p, tmp=tmp, text=text, resolve=resolve):
        p = text(p)
        r = resolve(p)
        return r == "/dev/null" or (r == tmp or r.startswith(tmp + "/")) and ".." not in p.split("/")

    def kind(r, stat=os.stat, OSError=OSError):
        """The file type bits of r's mode (0 when it cannot be stat'ed)."""
        try:
            return stat(r).st_mode & 0o170000
        except OSError:
            return 0

    def hook(event, args, deny=deny, owner=owner, devices=devices, modules=NATIVE, frames=frames, moves=moves,
             writes=writes, text=text, resolve=resolve, inside=inside, kind=kind, type=type, int=int,
             ImportError=ImportError, PermissionError=PermissionError, ValueError=ValueError):
        if event in deny or event.startswith(("socket.", "subprocess.")):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "fcntl.fcntl" and args[1] in owner:
            raise PermissionError("sandbox: fcntl F_SETOWN, F_SETOWN_EX and F_SETSIG are not allowed")
        if event == "sys._getframe":  # ValueError, which namedtuple, enum and logging take for "no caller frame"
            raise ValueError("sandbox: frames are hidden")
        if (event == "object.__getattr__" and args[1] in frames
                or event == "object.__setattr__" and args[1] == "__code__"):
            raise PermissionError("sandbox: " + args[1] + " is hidden")
        if event == "import" and args[0].partition(".")[0] in modules:  # ImportError, which optional imports expect
            raise ImportError("sandbox: no module " + args[0])
        looks = event == "open" or event in ("os.listdir", "os.scandir") and args[0] is not None
        if looks and type(args[0]) is not int:
            r = resolve(text(args[0]))
            if r == "/proc" or r.startswith("/proc/"):
                raise PermissionError("sandbox: /proc is hidden")
            if event == "open":
                mode = kind(r)
                if mode in (0o020000, 0o060000) and r not in devices:  # a character or block device
                    raise PermissionError("sandbox: no device but /dev/null, zero, random and urandom")
                if (type(args[2]) is not int or args[2] & writes or mode == 0o040000) and not inside(args[0]):
                    raise PermissionError("sandbox: no writing (or opening folders) outside the working directory")
        for p in args[:moves.get(event, 0)]:
            if type(p) is not int and not inside(p):
                raise PermissionError("sandbox: no writing outside the working directory")

    return hook


def program(code, stdin, exec=exec, BaseException=BaseException, sys=sys, TextIOWrapper=io.TextIOWrapper,
            BytesIO=io.BytesIO):
    """Run code as __main__ with stdin as its input: its output, or None if it raised (SystemExit included)."""
    saved, raw = (sys.stdin, sys.stdout), BytesIO()
    out = TextIOWrapper(raw, encoding="utf-8")
    sys.stdin, sys.stdout = TextIOWrapper(BytesIO(stdin.encode()), encoding="utf-8"), out
    try:
        exec(code, {"__name__": "__main__"})
        out.flush()
        return raw.getvalue().decode("utf-8", "replace")
    except BaseException:
        return None
    finally:
        sys.stdin, sys.stdout = saved


def lines(s):
    return [line.rstrip() for line in s.rstrip().splitlines()]


def run(job, report, pristine, exec=exec, compile=compile, BaseException=BaseException, enumerate=enumerate,
        any=any, program=program, lines=lines):
    """
    Run the job. The code sees the tests' setup (as if the tests followed it in one file); asserts see the code's names
    but those that shadow builtins, the builtins as they were before the code ran, and the setup, run again for them.
    """
    try:
        code = compile(job["code"], "<solution>", "exec", dont_inherit=True)
    except BaseException:
        return
    if job["mode"] == "run":
        if program(code, job["stdin"]) is not None:
            report(b"done")
        return
    ns = None
    if any("assert" in t for t in job["tests"]):
        try:
            setup, solution = compile(job["setup"], "<setup>", "exec", dont_inherit=True), {"__name__": "solution"}
            exec(code, solution)
            exec(setup, solution)
            ns = {name: v for name, v in solution.items() if name not in pristine}
            ns["__builtins__"] = pristine
            exec(setup, ns)
        except BaseException:
            ns = None
    for i, t in enumerate(job["tests"]):
        if "assert" in t:
            if ns is None:
                continue
            try:
                exec(compile(t["assert"], "<test>", "exec", dont_inherit=True), ns)
            except BaseException:
                continue
            report(b"pass %d" % i)
        else:
            out = program(code, t["input"])
            if out is not None and lines(out) == lines(t["output"]):
                report(b"pass %d" % i)


def main():
    job = json.loads(sys.stdin.buffer.read())
    key = bytes.fromhex(job.pop("key"))
    out, null = os.dup(1), os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for res, n in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_CPU, job["cpu"]),
                   (resource.RLIMIT_FSIZE, 1 << 24), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 0),
                   (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (n, n))
    blake2b, write, exit = hashlib.blake2b, os.write, os._exit

    def report(msg):
        write(out, blake2b(msg, key=key, digest_size=16).hexdigest().encode() + b"\n")

    strip()
    pristine = dict(vars(builtins))
    sys.addaudithook(guard(job["tmp"]))
    run(job, report, pristine)
    exit(0)


if __name__ == "__main__":
    main()
