"""Model-written code against the sandbox: every attack contained within its limit, the host untouched."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from rewards.code import code_tests
from rewards.sandbox import Limits, check_available, run_python

# CI installs bubblewrap (scripts/system-deps.sh): there a missing sandbox is a failure, not a skip.
pytestmark = [pytest.mark.integration, pytest.mark.root,
              pytest.mark.skipif(shutil.which("bwrap") is None and not os.environ.get("CI"),
                                 reason="bubblewrap not installed")]
FAST = Limits(wall_seconds=3, cpu_seconds=3)
LEFTOVER_GRACE = 25.0


def _nobody_procs() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "status").read_text().split("Uid:")[1].split()[0] == "65534":
                    out.append(int(p.name))
            except (OSError, IndexError):
                pass
    return out


@pytest.fixture(autouse=True)
def no_leftovers():
    """No sandboxed process (uid nobody) outlives the test. Under xdist another worker's sandboxes come and go
    meanwhile, and uid is all they share with ours: one alive at the test's end may stay until LEFTOVER_GRACE,
    longer than any sandbox of the suite may live (wall limits of at most 20 s), while the leaks guarded against
    sleep for 1000 s."""
    before = set(_nobody_procs())
    yield
    time.sleep(0.2)
    left = set(_nobody_procs()) - before  # those alive at the test's end; ones that start later are not ours
    deadline = time.monotonic() + LEFTOVER_GRACE
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left &= set(_nobody_procs())
    assert not left, f"a sandboxed process outlived its run: {sorted(left)}"


def test_available():
    check_available()


def _timed(code: str, **kw):
    t0 = time.monotonic()
    r = run_python(code, limits=FAST, **kw)
    return r, time.monotonic() - t0


@pytest.fixture(scope="module")
def slack() -> float:
    """What a deadline may overrun by on this machine, measured here: twice the slowest of three sandboxed runs that
    do nothing (bubblewrap, the namespaces, python's start-up, and the kill and reaping after), plus 1 s of
    scheduling on a loaded 2-core machine, and never under the 2 s these tests allowed before. The failures they
    guard against overrun without bound."""
    worst = max(_timed("pass")[1] for _ in range(3))
    return max(2.0, 2 * worst + 1.0)


def test_infinite_loop_is_cut_at_the_deadline(slack):
    r, dt = _timed("while True: pass")
    assert r.status == "timeout" and dt < FAST.wall_seconds + slack


def test_fork_bomb_is_contained(slack):
    r, dt = _timed("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    # the kill walks every forked process (the pid limit caps them): one slack more
    assert r.status in ("timeout", "killed", "ok") and dt < FAST.wall_seconds + 2 * slack


def test_memory_bomb_fails_inside():
    r, _ = _timed("x = bytearray(8 * 1024**3)\nprint('allocated')")
    assert "allocated" not in r.stdout and r.returncode != 0


def test_filling_the_disk_is_contained(slack):
    free = shutil.disk_usage("/").free
    r, dt = _timed("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20)); i += 1")
    assert r.returncode != 0 and dt < FAST.wall_seconds + slack
    # unconfined, the loop writes several GiB into the page cache in its 3 s; 1 GiB leaves room for what another
    # xdist worker may write meanwhile (a checkpoint, or the embedded model's 0.5 GiB export)
    assert shutil.disk_usage("/").free > free - (1 << 30)


def test_no_network_even_to_localhost():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = []
    threading.Thread(target=lambda: got.append(srv.accept()), daemon=True).start()
    r, _ = _timed(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('CONNECTED')")
    srv.close()
    assert "CONNECTED" not in r.stdout and not got
    r, _ = _timed("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('CONNECTED')")
    assert "CONNECTED" not in r.stdout


def test_host_files_and_environment_are_invisible(tmp_path, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("GRPO_TEST_SECRET", secret)
    home_secret = Path.home() / f".grpo-secret-{secret[:8]}"
    home_secret.write_text(secret)
    try:
        code = (f"import os\nprint(dict(os.environ))\nfor p in [{str(home_secret)!r}, '/etc/passwd', "
                f"{str(Path.cwd() / 'pyproject.toml')!r}, '/proc/1/environ']:\n"
                "    try:\n        print(open(p).read())\n    except Exception as e:\n        print('denied', p)")
        r, _ = _timed(code)
        assert secret not in r.stdout and "GRPO_TEST_SECRET" not in r.stdout
        assert "root:" not in r.stdout and "[project]" not in r.stdout
    finally:
        home_secret.unlink()


def test_writes_outside_the_work_dir_do_not_reach_the_host():
    target = Path("/tmp") / f"grpo-escape-{uuid.uuid4().hex}"
    code = (f"import os\nfor p in [{str(target)!r}, '/harness/main.py', '/usr/evil', {str(Path.cwd() / 'evil')!r}]:\n"
            "    try:\n        open(p, 'w').write('x'); print('wrote', p)\n    except Exception as e:\n"
            "        print('refused', p)")
    r, _ = _timed(code)
    assert not target.exists() and not (Path.cwd() / "evil").exists()
    assert "wrote /harness/main.py" not in r.stdout and "wrote /usr/evil" not in r.stdout


def test_killing_the_parent_or_everyone_leaves_us_alive():
    r, _ = _timed("import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n"
                  "        os.kill(pid, signal.SIGKILL)\n    except Exception as e:\n        print(type(e).__name__)")
    assert r.status in ("ok", "killed")  # we are still here to assert


def test_ignoring_sigterm_and_background_children_are_killed(slack):
    r, dt = _timed("import os, signal, subprocess, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                   "if os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"
                   "subprocess.Popen(['sleep', '1000'], start_new_session=True)\ntime.sleep(1000)")
    assert r.status == "timeout" and dt < FAST.wall_seconds + slack  # and no_leftovers checks the children


def test_megabytes_of_output_are_capped(slack):
    r, dt = _timed("import sys\nfor _ in range(64):\n    sys.stdout.write('y' * (1 << 20))")
    assert r.truncated and len(r.stdout) <= FAST.output_bytes and dt < FAST.wall_seconds + slack


def test_invalid_utf8_output_is_decoded_leniently():
    r, _ = _timed("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\x80 ok')")
    assert r.stdout.endswith(" ok") and "\ufffd" in r.stdout


# ---------------------------------------------------------------- verdicts the candidate cannot forge

ASSERTS = json.dumps(["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(20, 22) == 42"])


def block(src: str) -> str:
    return f"Here is my solution.\n```python\n{src}\n```\n"


@pytest.mark.parametrize("name, src, expected", [
    ("correct", "def add(a, b):\n    return a + b", 1.0),
    ("partly", "def add(a, b):\n    return 3", 1 / 3),
    ("sys.exit(0) before the tests", "import sys\nsys.exit(0)", 0.0),
    ("os._exit(0) before the tests", "import os\nos._exit(0)", 0.0),
    ("atexit prints a pass", "import atexit\natexit.register(lambda: print('PASSED'))\ndef add(a,b): pass", 0.0),
    ("__eq__ always True", "class T:\n    def __eq__(s, o): return True\ndef add(a, b):\n    return T()", 0.0),
    ("redefining assert/builtins", "import builtins\nbuiltins.AssertionError = Exception\n"
                                   "builtins.eval = lambda *a, **k: 3\ndef add(a, b): return None", 0.0),
    ("writing a conftest and sitecustomize", "open('conftest.py','w').write('x')\n"
                                             "open('sitecustomize.py','w').write('x')\ndef add(a,b): return None", 0.0),
    ("forging the report lines", "import json, sys\nspec = json.load(open('/harness/tests.json'))\n"
                                 "for i in range(3):\n    print(spec['nonce'] + ' ' + json.dumps({'i': i, 'ok': True,"
                                 " 'v': 42}), flush=True)\ndef add(a, b): return 42", 0.0),
])
def test_assert_verdicts(name, src, expected, slack):
    t0 = time.monotonic()
    got = code_tests([block(src)], [ASSERTS], timeout=3)[0]
    assert got == pytest.approx(expected), name
    assert time.monotonic() - t0 < 3 + 3 * slack  # the timeout, and harness runs on each side of it


def test_infinite_loop_in_last_test_keeps_earlier_results():
    src = "def add(a, b):\n    while a == 20:\n        pass\n    return a + b"
    # the forged-duplicate rule does not apply; the first two tests reported before the hang
    assert code_tests([block(src)], [ASSERTS], timeout=3) == [pytest.approx(2 / 3)]


IO = {"inputs": ["1 2\n", "5 6\n", "10 -3\n"], "outputs": ["3\n", "11\n", "7\n"]}


@pytest.mark.parametrize("src, expected", [
    ("a, b = map(int, input().split())\nprint(a + b)", 1.0),
    ("print(3)", 1 / 3),  # printing an expected output without computing it
    ("a, b = map(int, input().split())\nprint(a + b)\nprint('extra line')", 0.0),  # every line compared
    ("import sys\nsys.stdout.write('y' * (4 << 20))", 0.0),
    ("import sys\nsys.stdout.buffer.write(b'\\xff\\n')", 0.0),
])
def test_stdin_stdout_verdicts(src, expected):
    assert code_tests([block(src)], [IO], timeout=3) == [pytest.approx(expected)]


def test_all_or_nothing_and_not_applicable():
    assert code_tests([block("def add(a, b):\n    return 3")], [ASSERTS], mode="all") == [0.0]
    assert code_tests([block("x = 1")], ["[]"]) == [None]
    assert code_tests([block("x = 1")], [None]) == [None]
    assert code_tests(["no code block at all"], [ASSERTS]) == [0.0]


INSIDE = """
import os, resource
print("uid", os.getuid())
print("pids", sum(p.isdigit() for p in os.listdir("/proc")))
print("nofile", resource.getrlimit(resource.RLIMIT_NOFILE)[1])
total, i = 0, 0
try:
    while True:
        with open(f"/tmp/work/f{i}", "wb") as f:
            for _ in range(4):
                f.write(b"x" * (1 << 20))
                f.flush()
                total += 1 << 20
        i += 1
except OSError as e:
    print("stopped", type(e).__name__, e.errno)
print("written", total)
"""


@pytest.mark.parametrize("cgroup", ["on", "off"])
def test_limits_seen_from_inside(cgroup, monkeypatch, tmp_path):
    """What the sandboxed program itself sees, with the per-run cgroup and without it (a host where cgroups are not
    writable): uid nobody, its own pid namespace (itself, bwrap's init and prlimit's exec at most), the open-file
    limit, and a /tmp that stops writes at its size cap (it is RAM: unbounded, 4 MB files up to the memory limit)."""
    from rewards import sandbox

    if cgroup == "off":
        monkeypatch.setattr(sandbox, "CGROUP_ROOT", tmp_path / "no-cgroups")
    else:
        probe = sandbox._Cgroup(FAST)
        made = bool(probe.dirs)
        probe.cleanup()
        assert made or not os.environ.get("CI"), "CI runs as root with writable cgroups"
    limits = Limits(wall_seconds=20, cpu_seconds=10, tmp_mb=24, open_files=40)
    r = run_python(INSIDE, limits=limits)
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert r.status == "ok", (r.status, r.stdout, r.stderr)
    assert out["uid"] == "65534"
    assert int(out["pids"]) <= 3, out
    assert out["nofile"] == "40"
    assert out["stopped"].split()[0] == "OSError" and out["stopped"].split()[1] == "28"  # ENOSPC
    assert 16 << 20 <= int(out["written"]) <= 24 << 20
