"""tests/forked.py: a forked `python script.py` behaves as a fresh interpreter would, and shares
nothing with the test process that could block it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap

import pytest
from tqdm import tqdm

from tests import forked

BAR = textwrap.dedent(
    """
    import sys
    from tqdm import tqdm
    for _ in tqdm(range(int(sys.argv[1])), mininterval=0):
        pass
    print("drawn", flush=True)
    """
)


def script(tmp_path, text: str):
    path = tmp_path / "script.py"
    path.write_text(text)
    return [sys.executable, str(path)]


def parent_draws_a_bar() -> None:
    """This process gets tqdm's multiprocessing lock, as a test worker that ran a round has."""
    for _ in tqdm(range(2), file=sys.stderr):
        pass


def test_a_child_gets_its_arguments_directory_environment_and_exit_status(tmp_path):
    command = script(
        tmp_path,
        "import os, sys\nprint(sys.argv[1:], os.getcwd(), os.environ['ONLY_HERE'], __name__)\nsys.exit(3)\n",
    )
    (tmp_path / "cwd").mkdir()
    out = forked.run(
        [*command, "a", "b=1"], cwd=tmp_path / "cwd", env={"ONLY_HERE": "x"}, capture_output=True, text=True
    )
    assert (out.returncode, out.stdout) == (3, f"['a', 'b=1'] {tmp_path / 'cwd'} x __main__\n")


def test_a_progress_bar_lock_taken_by_another_process_does_not_block_a_child(tmp_path):
    """tqdm's lock is one semaphore for this process and its forks: while another of them holds it
    (or after it died holding it), a child sharing it would wait, here forever."""
    parent_draws_a_bar()
    taken, hold = os.pipe(), os.pipe()
    holder = os.fork()
    if holder == 0:  # takes the lock, says so, and keeps it until told
        lock = tqdm.get_lock()
        lock.acquire()
        os.write(taken[1], b"1")
        os.read(hold[0], 1)
        lock.release()
        os._exit(0)
    try:
        assert os.read(taken[0], 1) == b"1"
        out = forked.run([*script(tmp_path, BAR), "3"], capture_output=True, text=True, timeout=30)
    finally:
        os.write(hold[1], b"1")
        os.waitpid(holder, 0)
        for fd in (*taken, *hold):
            os.close(fd)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "drawn\n"
    assert "3/3" in out.stderr


def test_a_child_killed_while_drawing_leaves_this_process_and_the_next_child_free(tmp_path):
    parent_draws_a_bar()
    command = [*script(tmp_path, BAR.replace('print("drawn", flush=True)', "")), "1000000000"]
    for _ in range(5):  # several kills at arbitrary points of the bar's drawing
        child = forked.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        drawing, _, _ = select.select([child.stderr], [], [], 30)
        assert drawing, "the child never drew its bar: tqdm's lock is taken"
        child.stderr.read(64)  # it goes on drawing until the pipe is full: then it waits mid-bar
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
        assert child.returncode == -signal.SIGKILL
    lock = tqdm.get_lock()
    assert lock.locks[0].acquire(timeout=5), "a killed child left this process's tqdm lock taken"
    lock.locks[0].release()
    out = forked.run([*script(tmp_path, BAR), "2"], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "drawn\n")


RELAUNCH = textwrap.dedent(
    """
    import subprocess, sys
    fresh = b"again" in open("/proc/self/cmdline", "rb").read()  # a fork keeps its parent's command line
    if sys.argv[1:] == ["again"]:
        print(f"{sys.argv[0].rsplit('/', 1)[1]} fresh={fresh}", flush=True)
    else:
        subprocess.run([sys.executable, __file__, "again"], check=True)
        subprocess.run([sys.executable, sys.argv[1], "again"], check=True)
    """
)


@pytest.mark.parametrize("fresh_ranks", [False, True])
def test_a_script_starting_itself_again_is_forked_unless_fresh_ranks_is_asked(tmp_path, fresh_ranks):
    """What Lightning's launcher does for a run's other ranks: `python <the same script> ...`."""
    command = script(tmp_path, RELAUNCH)
    (tmp_path / "other.py").write_text(RELAUNCH)
    out = forked.run(
        [*command, str(tmp_path / "other.py")],
        capture_output=True,
        text=True,
        timeout=60,
        fresh_ranks=fresh_ranks,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"script.py fresh={fresh_ranks}\nother.py fresh=True\n"


@pytest.mark.parametrize("command", [["echo", "not python"], [sys.executable, "-c", "print(1)"]])
def test_other_commands_start_as_subprocess_starts_them(command):
    out = forked.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() in {"not python", "1"}


# -- the zygote: `python` commands a shell script starts ----------------------------------------------
COMMANDS = textwrap.dedent(
    """
    echo "bash $$"
    "$PYTHON" script.py a "b c"; echo "status $?"
    "$PYTHON" -c 'import sys; print(sys.argv[1:], "torch" in sys.modules, __name__)' x
    "$PYTHON" -S -c 'import sys; print("torch" in sys.modules)'
    """
)


@pytest.mark.parametrize("fresh", [False, True], ids=["fork of this process", "fresh interpreter"])
def test_a_shell_scripts_python_commands_are_forks_of_the_zygote(tmp_path, fresh):
    (tmp_path / "script.py").write_text(
        "import os, sys\nprint(sys.argv[1:], os.getcwd(), os.environ['ONLY_HERE'], 'torch' in sys.modules)\n"
        "print('parent', os.getppid())\nsys.exit(3)\n"
    )
    # A fresh zygote has what it preloads; a fork has what this process has.
    with forked.Zygote(preload=("torch",), python=sys.executable if fresh else None) as zygote:
        env = {**os.environ, "PYTHON": str(zygote.python), "ONLY_HERE": "x"}
        out = subprocess.run(
            ["bash", "-c", COMMANDS], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 0, out.stderr
    bash = out.stdout.splitlines()[0].split()[1]
    # a script and -c code: forks, torch already imported, the shell their parent; anything else:
    # the interpreter itself
    assert out.stdout.splitlines()[1:] == [
        f"['a', 'b c'] {tmp_path} x True",
        f"parent {bash}",
        "status 3",
        "['x'] True __main__",
        "False",
    ]


SLEEPER = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)\n"


# timeout's status when it sent the signal; with SIGKILL it kills itself too (its process group).
@pytest.mark.parametrize(("signal_name", "statuses"), [("TERM", {124}), ("KILL", {137, -9})])
def test_a_signal_to_the_shim_reaches_its_command(tmp_path, signal_name, statuses):
    """What gpu_check.sh's `timeout` does to a step: SIGTERM is passed on; after a SIGKILL of the
    shim, its command is killed too."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    pid_file = tmp_path / "pid"
    with forked.Zygote() as zygote:
        command = ["timeout", "-s", signal_name, "3", str(zygote.python), "sleeper.py", str(pid_file)]
        out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode in statuses, out.stderr
        pid = int(pid_file.read_text())
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            select.select([], [], [], 0.05)
        else:
            pytest.fail(f"the command (pid {pid}) outlived its shim's SIG{signal_name}")
