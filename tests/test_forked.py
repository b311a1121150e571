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
