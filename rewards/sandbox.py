"""Running model-written Python where it cannot hurt the host: bubblewrap, resource limits, a hard deadline.

What holds, and where:
- kernel namespaces from bubblewrap: pid, net (no network at all), ipc, uts, mount; `--new-session` (no terminal
  injection) and `--die-with-parent`; a read-only view of /usr (the interpreter and its stdlib) and nothing else of
  the host: no home, no /etc, no project files, no GPU devices; the environment is cleared.
- a fresh private tmpfs as the working directory for every run; the harness is mounted read-only beside it, so
  files the candidate writes (conftest.py, sitecustomize.py, .pth) change nothing; Python runs isolated (`-I`).
- the candidate runs as uid 65534 (setpriv, no new privileges): RLIMIT_NPROC is enforced for it (it is not for
  root), and prlimit caps address space, CPU seconds, file size and open files.
- where cgroup v1 `pids` and `memory` controllers are writable (root on a plain Linux), the run gets its own
  cgroup: a process cap that holds for the whole tree, and a memory cap that also counts what it writes to tmpfs.
- the parent keeps a wall-clock deadline, kills the whole pid namespace (bwrap's init; children die with it,
  `setsid` or not), reads output with a byte cap, and decodes it leniently (invalid UTF-8 is replaced).
If bubblewrap cannot start, `SandboxUnavailable` is raised: code is never run unsandboxed behind your back. The
explicit opt-out `GRPO_UNSAFE_NO_SANDBOX=1` exists for machines without user namespaces; it is logged loudly.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

UNSAFE_ENV = "GRPO_UNSAFE_NO_SANDBOX"
NOBODY = 65534
CGROUP_ROOT = Path("/sys/fs/cgroup")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here; code rewards refuse to run."""


@dataclass
class Limits:
    wall_seconds: float = 5.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    max_processes: int = 32
    file_size_mb: int = 16
    tmp_mb: int = 64  # size of the sandbox's /tmp (a RAM tmpfs: unbounded, it could fill the host's memory)
    open_files: int = 64
    output_bytes: int = 1 << 20  # per stream; the rest is discarded (and flagged)


@dataclass
class RunResult:
    status: str  # "ok" (exited), "timeout", "killed" (signal), "error" (could not start)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    truncated: bool = False


def sandbox_python() -> str:
    """The interpreter the sandbox runs: Debian's /usr/bin/python3 (it lives under the read-only /usr)."""
    return os.environ.get("GRPO_SANDBOX_PYTHON", "/usr/bin/python3")


def check_available() -> None:
    """Raise SandboxUnavailable with the reason unless a trivial program runs inside the sandbox."""
    if os.environ.get(UNSAFE_ENV) == "1":
        return
    if shutil.which("bwrap") is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed: `apt-get install bubblewrap` "
                                 "(code rewards never run unsandboxed)")
    if not Path(sandbox_python()).is_file():
        raise SandboxUnavailable(f"{sandbox_python()} is missing: `apt-get install python3-minimal`, or set "
                                 "GRPO_SANDBOX_PYTHON to an interpreter under /usr")
    r = run_python("print(6 * 7)", limits=Limits(wall_seconds=20))
    if r.status != "ok" or r.stdout.strip() != "42":
        raise SandboxUnavailable(f"bubblewrap could not run a test program (status {r.status}, rc "
                                 f"{r.returncode}): {r.stderr.strip()[-500:]}")


def _bwrap_argv(harness_dir: Path, limits: Limits, argv: list[str]) -> list[str]:
    root = os.geteuid() == 0
    cmd = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
           "--unshare-uts", "--unshare-cgroup-try"]
    if not root:
        cmd.append("--unshare-user")
    cmd += ["--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(limits.tmp_mb * 2**20), "--tmpfs", "/tmp",
            "--perms", "0777", "--dir", "/tmp/work",
            "--ro-bind", str(harness_dir), "/harness", "--chdir", "/tmp/work", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp/work", "--setenv", "PYTHONNOUSERSITE", "1",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--setenv", "LANG", "C.UTF-8"]
    if root:
        # setpriv needs CAP_SETUID to switch, then the uid change and an empty bounding set leave no capability.
        cmd += ["/usr/bin/setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs",
                "--inh-caps=-all", "--bounding-set=-all"]
    mem = limits.memory_mb * 2**20
    cmd += ["/usr/bin/prlimit", f"--as={mem}", f"--cpu={limits.cpu_seconds}",
            f"--fsize={limits.file_size_mb * 2**20}", f"--nofile={limits.open_files}",
            f"--nproc={limits.max_processes}", "--core=0", "--"]
    return cmd + argv


class _Cgroup:
    """A per-run cgroup v1 (pids + memory) when the host lets us make one; a no-op otherwise."""

    def __init__(self, limits: Limits):
        self.dirs: list[Path] = []
        name = f"grpo-sandbox-{uuid.uuid4().hex[:12]}"
        try:
            for ctrl, knobs in (("pids", {"pids.max": str(limits.max_processes + 4)}),
                                ("memory", {"memory.limit_in_bytes": str(limits.memory_mb * 2**20 * 2),
                                            "memory.swappiness": "0"})):
                base = CGROUP_ROOT / ctrl
                if not (base / "cgroup.procs").exists() or not os.access(base, os.W_OK):
                    continue
                d = base / name
                d.mkdir()
                self.dirs.append(d)
                for k, v in knobs.items():
                    try:
                        (d / k).write_text(v)
                    except OSError:
                        pass
        except OSError:
            self.cleanup()

    def enter_cmd(self) -> list[str]:
        """A shell prefix that moves itself into the cgroups, then execs the sandbox (no preexec_fn)."""
        if not self.dirs:
            return []
        moves = "; ".join(f"echo $$ > {d}/cgroup.procs" for d in self.dirs)
        return ["/bin/sh", "-c", f'{moves}; exec "$@"', "sh"]

    def kill_all(self) -> None:
        for d in self.dirs:
            try:
                for pid in (d / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
            except OSError:
                pass

    def cleanup(self) -> None:
        for d in self.dirs:
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    self.kill_all()
                    time.sleep(0.02)
        self.dirs = []


def _reader(stream, cap: int, out: list[bytes], flag: list[bool]) -> None:
    got = 0
    while True:
        chunk = stream.read(65536)
        if not chunk:
            return
        if got < cap:
            out.append(chunk[: cap - got])
        if got + len(chunk) > cap:
            flag[0] = True
        got += len(chunk)


def run_python(code: str, stdin: str = "", limits: Limits | None = None,
               files: dict[str, str] | None = None) -> RunResult:
    """Run `code` as /harness/main.py in a fresh sandbox (plus read-only harness `files`), feeding `stdin`."""
    limits = limits or Limits()
    unsafe = os.environ.get(UNSAFE_ENV) == "1"
    with tempfile.TemporaryDirectory(prefix="grpo-sbx-") as tmp:
        h = Path(tmp) / "harness"
        h.mkdir()
        (h / "main.py").write_text(code, errors="replace")
        for name, text in (files or {}).items():
            (h / name).write_text(text, errors="replace")
        os.chmod(tmp, 0o755)
        for p in h.iterdir():
            os.chmod(p, 0o444)
        os.chmod(h, 0o555)
        argv = [sandbox_python(), "-I", "-S", "/harness/main.py"]
        if unsafe:
            log.warning("%s=1: running model-written code WITHOUT a sandbox", UNSAFE_ENV)
            cmd, cg = ["/usr/bin/prlimit", f"--as={limits.memory_mb * 2**20}", f"--cpu={limits.cpu_seconds}",
                       "--", sandbox_python(), "-I", str(h / "main.py")], None
        else:
            cg = _Cgroup(limits)
            cmd = cg.enter_cmd() + _bwrap_argv(h, limits, argv)
        return _execute(cmd, stdin, limits, cg, cwd=tmp)


def _execute(cmd: list[str], stdin: str, limits: Limits, cg: _Cgroup | None, cwd: str) -> RunResult:
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, cwd=cwd, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    except OSError as e:
        if cg:
            cg.cleanup()
        return RunResult("error", None, "", f"cannot start sandbox: {e}", 0.0)
    outs: list[bytes] = []
    errs: list[bytes] = []
    trunc = [False]
    readers = [threading.Thread(target=_reader, args=(proc.stdout, limits.output_bytes, outs, trunc), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, limits.output_bytes, errs, trunc), daemon=True)]
    for t in readers:
        t.start()

    def feed() -> None:
        try:
            proc.stdin.write(stdin.encode("utf-8", errors="replace"))
            proc.stdin.close()
        except OSError:
            pass  # the program exited or closed stdin early

    threading.Thread(target=feed, daemon=True).start()
    status = "ok"
    try:
        proc.wait(timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        status = "timeout"
    # Whatever happened, nothing of the run may outlive it: the session, the namespace, the cgroup.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if cg:
        cg.kill_all()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    for t in readers:
        t.join(timeout=2)  # the namespace is dead, so every writer is gone and the pipes reach EOF
    if cg:
        cg.cleanup()
    rc = proc.returncode
    if status == "ok" and rc is not None and rc < 0:
        status = "killed"
    return RunResult(status, rc, b"".join(outs).decode("utf-8", errors="replace"),
                     b"".join(errs).decode("utf-8", errors="replace"), time.monotonic() - t0, trunc[0])
