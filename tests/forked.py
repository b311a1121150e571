"""`python script.py args...` as a fork of the test process instead of a fresh interpreter.

A fresh `python train.py` spends 6-7 CPU-seconds importing torch, Lightning and transformers
before it reads its first argument; the test process has imported them already. `Popen` and
`run` here take the same arguments as subprocess's, and for a command `[sys.executable,
<file>.py, args...]` start a child of this process that runs the script as `__main__` with those
arguments, environment, working directory and file descriptors, then exits with its status, as
the interpreter would. The child is a real process: it has its own PID, takes signals (SIGKILL
included) and starts processes of its own (vLLM's engine) as a fresh interpreter would. Any other
command starts as subprocess starts it.

A run's other ranks are forks too: Lightning's launcher starts them as `python <the same script>
...` again, and in the child that command is forked from it (at the launcher, before any process
group exists), which saves each two-process run a second import of everything.
`fresh_ranks=True` starts them as fresh interpreters, as a user's run does (the README's commands).

Commands that a shell script, another thread or another process starts (a benchmark script's
`"$PYTHON" script.py`, vLLM's engine) are forked too, from a `Zygote`: a process that has imported
what they import and forks again for each command its `python` shim passes it. It is a fork of the
test process, made before the test starts threads, or a fresh process of another interpreter (vLLM's
environment). The shim runs a script or `-c` code that way and hands anything else to the
interpreter itself.

What a fork cannot give, and the tests that need it start a fresh interpreter instead: what
happens while the libraries are imported (their warnings, a module that fails to import, an
import blocked for the test), and environment variables read only at import time.

What a fork must not share: tqdm's write lock is a multiprocessing lock, one semaphore for a
process and every process forked from it. A child killed while drawing a progress bar (the tests
SIGKILL runs mid-round) would leave it taken for good, and every later bar in the test process and
in every later fork would wait on it forever. The child makes its own (`fresh_tqdm`).
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import faulthandler
import gc
import inspect
import json
import logging
import os
import random
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
import weakref
from pathlib import Path

# The interpreter's own warning filters, before pytest's are applied around each test.
STARTUP_WARNING_FILTERS = list(warnings.filters)
TORCH_INITIAL_SEED = 67280421310721  # torch.initial_seed() of a fresh interpreter
# Where start_new_session is among _execute_child's arguments after errwrite (3.11 adds process_group).
_PARAMETERS = list(inspect.signature(subprocess.Popen._execute_child).parameters)
NEW_SESSION = _PARAMETERS.index("start_new_session") - _PARAMETERS.index("errwrite") - 1


def forkable(args) -> bool:
    return (
        isinstance(args, list | tuple)
        and len(args) >= 2
        and args[0] == sys.executable
        and str(args[1]).endswith(".py")
    )


class Popen(subprocess.Popen):
    def __init__(self, *args, fresh_ranks: bool = False, **kwargs):
        self.fresh_ranks = fresh_ranks
        super().__init__(*args, **kwargs)

    def forks(self, args) -> bool:
        return forkable(args)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                       *rest):  # fmt: skip
        if shell or executable is not None or preexec_fn is not None or not self.forks(args):
            return super()._execute_child(
                args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo, creationflags,
                shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest,
            )  # fmt: skip
        start_new_session = rest[NEW_SESSION]
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = child(
                    [str(a) for a in args[1:]], cwd, env, (p2cread, c2pwrite, errwrite),
                    (p2cwrite, c2pread, errread), start_new_session, self.fresh_ranks,
                )  # fmt: skip
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        self.pid = pid
        self._child_created = True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)


class RankPopen(Popen):
    """subprocess.Popen in a forked run: the run's other ranks, which Lightning's launcher starts as
    `python <this script> ...` again, are forks of this process too; any other command starts as
    subprocess starts it."""

    script = ""

    def forks(self, args) -> bool:
        return forkable(args) and os.path.abspath(str(args[1])) == self.script


def child(argv, cwd, env, ours, parents, new_session, fresh_ranks=False, every_script=False) -> int:
    """In the forked process: become `python argv...` and run it; its exit status. The scripts it
    starts in turn: its own script again (a run's other ranks) forked unless `fresh_ranks`, every
    `python script.py` forked with `every_script`."""
    become(cwd, env, ours, parents, new_session)
    faulthandler.disable()  # pytest's, writing to the test's stderr
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # pytest-timeout's, in the test process
    warnings.filters[:] = STARTUP_WARNING_FILTERS
    warnings.showwarning = warnings._showwarning_orig
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    logging.disable(logging.NOTSET)
    atexit._clear()  # this process's own exit handlers run at its end, not the test process's
    fresh_tqdm()

    import torch
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    torch.manual_seed(TORCH_INITIAL_SEED)
    random.seed()
    if every_script:
        subprocess.Popen = Popen
    elif argv[0] != "-c" and not fresh_ranks:
        RankPopen.script = os.path.abspath(argv[0])
        subprocess.Popen = RankPopen
    return run_main(argv)


def become(cwd, env, ours, parents, new_session) -> None:
    """The process's session, standard streams, directory, environment and signals, as a fresh
    interpreter started with them has them."""
    if new_session:
        os.setsid()
    for fd, target in zip(ours, (0, 1, 2), strict=True):
        if fd != -1:
            os.dup2(fd, target)
    for fd in {*ours, *parents} - {-1, 0, 1, 2}:
        os.close(fd)
    if cwd is not None:
        os.chdir(cwd)
    if env is not None:
        os.environ.clear()
        os.environ.update({os.fsdecode(k): os.fsdecode(v) for k, v in env.items()})
    # As the interpreter opens them: stdout block-buffered into a pipe, stderr line by line.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def run_main(argv) -> int:
    """`python argv...` (a script or `-c` code) as `__main__`, its exit handlers run; its status."""
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if argv[0] == "-c":
        code = compile(argv[1], "<string>", "exec")
        sys.argv = ["-c", *argv[2:]]
        sys.path[:0] = ["", *path]

        def main() -> None:
            exec(code, {"__name__": "__main__", "__builtins__": builtins})
    else:
        script = os.path.abspath(argv[0])
        sys.argv = list(argv)
        sys.path[:0] = [os.path.dirname(script), *path]

        def main() -> None:
            runpy.run_path(script, run_name="__main__")

    gc.collect()
    status = 0
    try:
        main()
    except SystemExit as exit:
        status = exit_status(exit.code)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        status = 1
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
    return status


def fresh_tqdm() -> None:
    """tqdm as a fresh interpreter has it: locks of this process's own (the inherited ones may be
    held by a thread that did not survive the fork, or by a killed sibling), no bars, no monitor."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    lock = std.TqdmDefaultWriteLock
    lock.th_lock = std.TRLock()
    if "mp_lock" in vars(lock):
        del lock.mp_lock  # made again, for this process, by the next bar
    classes = [std.tqdm]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if "_lock" in vars(cls):
            delattr(cls, "_lock")
        if "monitor" in vars(cls):
            cls.monitor = None
        if "_instances" in vars(cls):
            cls._instances = weakref.WeakSet()


def exit_status(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def run(*popenargs, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """subprocess.run, with Popen above."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with Popen(*popenargs, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        except BaseException:
            process.kill()
            raise
        retcode = process.poll()
        if check and retcode:
            raise subprocess.CalledProcessError(retcode, process.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(process.args, retcode, stdout, stderr)


# -- commands another program starts: the zygote and its `python` shim --------------------------------
SHIM = """#!{python} -IS
# `python` for the commands a shell script or another process starts: a script or `-c` code runs
# in a fork of the zygote at {address} (tests/forked.py), anything else in {python} itself.
import ctypes
import json
import os
import signal
import socket
import sys

PYTHON = {python!r}
args = sys.argv[1:]
zygote = socket.socket(socket.AF_UNIX)
try:
    if not (args[:1] and (args[0].endswith(".py") or (args[0] == "-c" and len(args) >= 2))):
        raise OSError("not for the zygote")
    zygote.connect({address!r})
except OSError:
    os.execv(PYTHON, [PYTHON, *args])
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: gone with its parent, as its command
job = {{"argv": args, "cwd": os.getcwd(), "env": dict(os.environ), "parent": os.getppid()}}
job = json.dumps(job).encode()
socket.send_fds(zygote, [len(job).to_bytes(8, "big")], [0, 1, 2])
zygote.sendall(job)
answers = zygote.makefile("rb")
pid = int(answers.readline())
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(signum, lambda signum, frame: os.kill(pid, signum))
status = int(answers.readline() or 1)
if status < 0:  # killed by a signal: this process too, so that its caller sees the same
    signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
sys.exit(status)
"""


class Zygote:
    """A process that forks for each command its shim (`self.python`, an executable) passes it:
    `python script.py ...` or `python -c code ...`, started by a shell script, by another thread of
    this process or by another process, runs with the shim's arguments, environment, working
    directory and standard streams, and sees the shim's parent as its own (`os.getppid`). The shim
    exits as the command did (killed by the same signal where it was killed) and passes its
    signals on; a command whose shim dies (SIGKILL, or its parent's death) is killed.

    By default the zygote is a fork of this process, made at once (before the caller starts threads),
    and its commands run as `Popen` above runs them, forking the python scripts they start in turn
    (a benchmark's `python train.py` runs). With `python` (another interpreter, e.g. vLLM's
    environment) it is a fresh process of that interpreter, and its commands run as that interpreter
    would run them. `preload`: what the commands import that the zygote may not have yet (`module`
    or `module:attribute`), imported once, by the zygote. Use it as a context manager, or `close` it."""

    def __init__(self, preload: tuple[str, ...] = (), python: str | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="zygote-"))  # short: a socket path has 107 bytes
        self.address = str(self.folder / "socket")
        self.python = self.folder / "bin" / "python"  # in a venv's layout: <folder>/bin/python
        self.python.parent.mkdir()
        self.python.write_text(SHIM.format(python=python or sys.executable, address=self.address))
        self.python.chmod(0o755)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(self.address)
        listener.listen(16)
        if python is not None:
            command = [python, __file__, "--zygote", str(listener.fileno()), *preload]
            self.process = subprocess.Popen(command, pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL)
            self.pid = self.process.pid
        else:
            sys.stdout.flush()
            sys.stderr.flush()
            self.process, self.pid = None, os.fork()
            if self.pid == 0:
                try:
                    serve(listener, preload, forked_command)
                finally:
                    os._exit(0)
        listener.close()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pid is None:
            return
        os.kill(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()
        else:
            os.waitpid(self.pid, 0)
        self.pid = None
        shutil.rmtree(self.folder, ignore_errors=True)


def forked_command(job: dict, fds: tuple[int, ...]) -> int:
    return child(job["argv"], job["cwd"], job["env"], fds, (), False, every_script=True)


def plain_command(job: dict, fds: tuple[int, ...]) -> int:
    become(job["cwd"], job["env"], fds, (), False)
    return run_main(job["argv"])


def serve(listener: socket.socket, preload, command) -> None:
    """The zygote: one command per connection, forked at once; its exit status written back."""
    import ctypes
    import importlib

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: gone with the test process
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    for name in preload:
        module, _, attribute = name.partition(":")
        loaded = importlib.import_module(module)
        if attribute:
            getattr(loaded, attribute)
    gc.collect()
    gc.freeze()  # what every command shares, skipped by their collections
    commands: dict[int, socket.socket] = {}
    while True:
        if select.select([listener], [], [], 0.05 if commands else None)[0]:
            shim, _ = listener.accept()
            pid = start(shim, listener, commands, command)
            shim.sendall(f"{pid}\n".encode())
            commands[pid] = shim
        while commands:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            shim = commands.pop(pid)
            with contextlib.suppress(OSError):  # the shim may be gone
                shim.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            shim.close()


def start(shim: socket.socket, listener: socket.socket, commands: dict, command) -> int:
    header, fds, _, _ = socket.recv_fds(shim, 8, 3)
    size, job = int.from_bytes(header, "big"), b""
    while len(job) < size:
        job += shim.recv(size - len(job))
    job = json.loads(job)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            listener.close()
            for other in commands.values():
                other.close()
            threading.Thread(target=die_with_shim, args=(shim,), daemon=True).start()
            os.getppid = lambda: job["parent"]
            status = command(job, tuple(fds))
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    for fd in fds:
        os.close(fd)
    return pid


def die_with_shim(shim: socket.socket) -> None:
    """The shim sends nothing after its command: the end of its connection is its death."""
    try:
        while shim.recv(1):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:  # Zygote(python=...): its process
    del sys.path[0]  # tests/: none of its modules may stand in for a package the commands import
    serve(socket.socket(fileno=int(sys.argv[2])), sys.argv[3:], plain_command)
