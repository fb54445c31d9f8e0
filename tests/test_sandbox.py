"""The hostile-snippet suite: every attack fails (non-ok status), is contained, and the next run
works as usual. Runs on the isolation this machine supports (`namespaces` here and in CI)."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from data_recipes import sandbox
from data_recipes.sandbox import SandboxLimits, isolation, run_python

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=10, memory_mb=256)


def hostile(code: str, limits: SandboxLimits = FAST) -> sandbox.SandboxResult:
    """Run an attack: it must fail, and the sandbox must still work right after."""
    res = run_python(code, limits)
    assert not res.ok, res
    assert run_python("print(6 * 7)").stdout == "42\n"
    return res


def sandbox_processes(uid: int | None = None) -> list[int]:
    """Pids of processes running as a sandbox uid (or as this one), anywhere on the machine."""
    pids = []
    for name in os.listdir("/proc"):
        try:
            status = Path("/proc", name, "status").read_text() if name.isdigit() else ""
        except OSError:
            continue
        found = int(status.split("\nUid:\t", 1)[1].split("\t", 1)[0]) if "\nUid:" in status else 0
        if (found == uid if uid is not None else
                sandbox._UID_BASE <= found < sandbox._UID_BASE + sandbox._UID_SPAN):
            pids.append(int(name))
    return pids


def needs_namespaces():
    if isolation() == "plain":
        pytest.skip("no namespaces on this machine: the network is not isolated")


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("TOPSECRET-1234")
    path.chmod(0o600)
    return path


def test_normal_snippet_runs_with_stdin_and_exit_codes():
    res = run_python("import sys, math; print(math.isqrt(81), sys.stdin.read())", stdin="hi")
    assert (res.status, res.exit_code, res.stdout, res.stderr) == ("ok", 0, "9 hi\n", "")
    assert res.isolation == isolation() in sandbox.MODES
    if os.geteuid() == 0 and shutil.which("unshare"):  # as in CI: nothing less is acceptable
        assert isolation() == "namespaces"
    assert run_python("raise SystemExit(3)").exit_code == 3
    res = run_python("x = 1\n1 / 0\n")
    assert res.status == "error" and 'File "<sandbox>", line 2' in res.stderr
    assert "ZeroDivisionError" in res.stderr and "_boot" not in res.stderr  # no frames of ours


@pytest.mark.parametrize("what", ["tmp secret", "/root", "/etc/shadow", "our environ",
                                  "parent environ"])
def test_cannot_read_secrets(what, secret_file, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "tok-5678")
    if what == "/root":
        files = [p for p in Path("/root").iterdir() if p.is_file()]
        if not files:
            pytest.skip("/root has no files here")
        path = str(files[0])
    else:
        path = {"tmp secret": str(secret_file), "/etc/shadow": "/etc/shadow",
                "our environ": f"/proc/{os.getpid()}/environ"}.get(what, "")
    target = repr(path) if path else "f'/proc/{os.getppid()}/environ'"
    res = hostile(f"import os\nprint(open({target}, 'rb').read())")
    assert "TOPSECRET" not in res.stdout + res.stderr and "tok-5678" not in res.stdout
    assert "Error" in res.stderr  # PermissionError or FileNotFoundError (hidden by namespaces)


def test_environment_and_fds_are_not_inherited(secret_file, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "tok-5678")
    res = hostile("import os\nprint(sorted(os.environ))\nprint(os.environ['SECRET_TOKEN'])")
    assert "tok-5678" not in res.stdout and "KeyError" in res.stderr
    assert set(eval(res.stdout)) <= {"PATH", "LANG", "HOME", "LC_CTYPE"}

    fd = os.open(secret_file, os.O_RDONLY)
    os.set_inheritable(fd, True)  # even an fd we forgot to protect must not get through
    try:
        res = hostile("import os\nfound = []\nfor fd in range(3, 1024):\n"
                      "    try:\n        found.append(os.read(fd, 100))\n"
                      "    except OSError:\n        pass\nprint(found)\nassert found\n")
    finally:
        os.close(fd)
    assert res.stdout == "[]\n"


def test_cannot_write_outside_its_directory(tmp_path):
    tag = f"pwned-{os.getpid()}-{secrets.token_hex(4)}"
    targets = [tmp_path / tag, Path(__file__).parent / tag]
    shared = [Path("/var/tmp", tag), Path("/dev/shm", tag)]  # world-writable on the host
    code = "import os\n"
    for p in shared + targets[:1]:
        code += f"try:\n    open({str(p)!r}, 'w').write('x')\nexcept OSError:\n    pass\n"
    res = hostile(code + f"open({str(targets[1])!r}, 'w').write('x')\n")
    # refused, or not there at all when the checkout lies under /tmp (private in the sandbox)
    assert "PermissionError" in res.stderr or ("FileNotFoundError" in res.stderr
                                               and str(targets[1]).startswith("/tmp/"))
    assert not any(p.exists() for p in targets)
    if isolation() != "plain":  # there they are private tmpfs that vanished with the run
        assert not any(p.exists() for p in shared)
    for p in shared:
        p.unlink(missing_ok=True)


def test_no_network():
    needs_namespaces()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        res = hostile(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), 3)\n"
                      "s.sendall(b'exfiltrated')\n")
        assert "OSError" in res.stderr
        with pytest.raises(TimeoutError):
            server.accept()  # nobody ever connected
    res = hostile("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)\n")
    assert "unreachable" in res.stderr


def test_fork_bomb_is_stopped_and_leaves_nothing_behind():
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=2, max_processes=16)
    code = """
import os, signal, time
print(os.getuid(), flush=True)  # this run's uid: other sandboxes may run on the machine meanwhile
n = 0
try:
    while True:
        if os.fork() == 0:  # children that try to escape and survive
            os.setsid()
            for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(s, signal.SIG_IGN)
            time.sleep(600)
        n += 1
except OSError:
    print(n, flush=True)
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
    ours = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    before = set(ours.read_text().split())  # e.g. multiprocessing helpers of earlier tests
    start = time.monotonic()
    res = hostile(code, limits)
    assert res.status == "timeout" and time.monotonic() - start < 8
    uid, forked = map(int, res.stdout.split())
    assert 0 < forked < limits.max_processes  # RLIMIT_NPROC held, although we are root
    deadline = time.monotonic() + 3
    while (os.geteuid() == 0 and sandbox_processes(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.geteuid() != 0 or sandbox_processes(uid) == []
    assert set(ours.read_text().split()) <= before


def test_memory_bomb():
    res = hostile("try:\n    x = bytearray(10 * 2**30)\nexcept MemoryError:\n"
                  "    print('10 GB no')\nchunks = []\nwhile True:\n"
                  "    chunks.append(bytearray(2**24))\n",
                  SandboxLimits(memory_mb=128, wall_seconds=10))
    assert res.stdout == "10 GB no\n" and "MemoryError" in res.stderr


def test_cpu_and_wall_timeouts():
    res = hostile("while True:\n    pass\n", SandboxLimits(cpu_seconds=1, wall_seconds=30))
    assert res.status == "timeout" and res.exit_code == -signal.SIGXCPU
    res = hostile("import time\ntime.sleep(600)\n", SandboxLimits(wall_seconds=1))
    assert res.status == "timeout" and res.exit_code is None and res.wall_seconds < 3


def test_cannot_kill_us():
    decoy = subprocess.Popen(["sleep", "60"])
    ours = (os.getpid(), decoy.pid)
    try:
        res = hostile(f"""
import os, signal
os.kill(os.getppid(), signal.SIGKILL)
try:
    os.kill(-1, signal.SIGKILL)
except OSError:
    pass
for p in os.listdir('/proc'):  # find us by name, too
    try:
        if p.isdigit() and b'pytest' in open(f'/proc/{{p}}/cmdline', 'rb').read():
            os.kill(int(p), signal.SIGKILL)
    except OSError:
        pass
for pid in {ours}:
    os.kill(pid, signal.SIGKILL)
""")
        assert "ProcessLookupError" in res.stderr or "PermissionError" in res.stderr
        assert decoy.poll() is None  # and we are obviously still here
    finally:
        decoy.kill()
        decoy.wait()


def test_cannot_raise_its_limits():
    res = hostile("""
import resource
raised = []
for name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_NPROC', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE'):
    try:
        inf = resource.RLIM_INFINITY
        resource.setrlimit(getattr(resource, name), (inf, inf))
        raised.append(name)
    except (ValueError, OSError):
        pass
print('raised', raised, flush=True)
x = bytearray(2 * 2**30)
""")
    assert res.stdout == "raised []\n" and "MemoryError" in res.stderr


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_is_bounded(stream):
    limits = SandboxLimits(output_bytes=10_000, wall_seconds=10)
    res = hostile(f"import sys\nwhile True:\n    sys.{stream}.write('x' * 1000)\n", limits)
    assert res.status == "output_limit" and res.wall_seconds < 5
    assert len(getattr(res, stream)) == limits.output_bytes


def test_working_directory_is_private_and_thrown_away():
    def mine():
        return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("sandbox-")}

    before = mine()
    code = "import os\nprint(os.getcwd(), os.listdir('.'))\nopen('marker', 'w').write('x')\n"
    first, second = run_python(code), run_python(code)
    assert first.ok and second.ok
    cwd = first.stdout.split()[0]
    assert first.stdout.endswith("[]\n") and second.stdout.endswith("[]\n")  # fresh each time
    assert not os.path.exists(os.path.join(cwd, "marker"))
    assert mine() <= before


def test_many_threads_at_once():
    jobs = [(f"print({i} * {i})", SandboxLimits()) for i in range(8)]
    jobs += [("import time\ntime.sleep(60)", SandboxLimits(wall_seconds=1)),
             ("x = bytearray(10 * 2**30)", SandboxLimits())]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: run_python(*job), jobs))
    assert [r.stdout for r in results[:8]] == [f"{i * i}\n" for i in range(8)]
    assert [r.status for r in results[8:]] == ["timeout", "error"]


def test_limits_are_validated():
    with pytest.raises(ValueError, match="cpu_seconds"):
        SandboxLimits(cpu_seconds=0)


def test_forking_does_not_multiply_the_memory_cap():
    """8 children each take just under the per-process cap (RLIMIT_AS, 256 MB) and hold it: that
    is 8 x 200 MB under rlimits alone, but the run as a whole is capped (256 MB), so the kernel
    kills the children past it and the run ends as `memory_limit`."""
    from data_recipes.sandbox_memory import cgroup_mode

    if cgroup_mode() == "none":
        pytest.skip("no cgroup memory controller can be used here: only rlimits cap memory")
    res = hostile("""
import os, time
kids = []
for i in range(8):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (200 << 20)  # touched: resident, not only reserved
        time.sleep(3)
        os._exit(0)
    kids.append(pid)
held = sum(os.waitpid(pid, 0)[1] == 0 for pid in kids)
print(held)
""", SandboxLimits(memory_mb=256, run_memory_mb=256, wall_seconds=30, max_processes=32))
    assert res.status == "memory_limit", res
    held = int(res.stdout) if res.stdout.strip() else 0
    assert held <= 1, f"{held} children held 200 MB each under a 256 MB run cap"
