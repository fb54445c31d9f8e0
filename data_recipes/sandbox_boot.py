"""The sandbox's child side: the bootstrap a sandboxed interpreter runs before the untrusted code.

data_recipes.sandbox starts `python -I -S -B -c <boot_source()>` (inside `unshare` in the
namespace modes), as root until `_boot` drops to the run's uid. `_boot` mounts the private tmpfs
dirs, hides the interpreter's unreadable ancestor, drops the uid, sets no_new_privs and the
rlimits, reads the code from stdin and runs it as `__main__`; a setup failure exits with 125
(sandbox._SETUP_FAILED) and never runs the code with less isolation. It is shipped as source, so
it may use only its own names and the modules it imports itself.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def boot_source() -> str:
    """The child's whole program: `_boot`'s source and a call to it."""
    return inspect.getsource(_boot) + "\n_boot()\n"


def _boot() -> None:
    import os
    import resource
    import sys

    mode, hide, prefix, *nums = sys.argv[1:]
    uid, cpu, mem, fsize, tmpfs_mb, nproc, nofile = map(int, nums)
    try:
        # ctypes' C core: 1 ms to import where ctypes takes 10, and we start thousands of these
        from _ctypes import call_function, dlopen, dlsym
        libc_handle = dlopen(None)

        def libc(name, *args):
            return call_function(dlsym(libc_handle, name), args)

        def mount(src, dst, fstype, flags, data=""):
            if libc("mount", src.encode(), dst.encode(), fstype.encode(), flags, data.encode()):
                raise OSError(f"mount {fstype} on {dst} failed")

        if mode != "plain":
            nosuid_nodev, noexec, bind, remount, rdonly, rec = 2 | 4, 8, 4096, 32, 1, 16384
            for d, mb in (("/tmp", tmpfs_mb), ("/var/tmp", 1), ("/dev/shm", 1)):
                if os.path.isdir(d):
                    mount("tmpfs", d, "tmpfs", nosuid_nodev | noexec, f"size={mb}m,mode=1777")
            if hide:  # the interpreter sits under a dir uid cannot enter: empty it, bind back
                fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
                mount("tmpfs", hide, "tmpfs", nosuid_nodev, "size=1m,mode=755")
                os.makedirs(prefix)
                mount(f"/proc/self/fd/{fd}", prefix, "", bind | rec)
                mount("", prefix, "", bind | remount | rdonly | nosuid_nodev)
                os.close(fd)
            os.mkdir("/tmp/work", 0o700)
            os.chdir("/tmp/work")
            if uid >= 0:
                os.chown("/tmp/work", uid, uid)
        if uid >= 0 and os.getuid() == 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        # PR_SET_NO_NEW_PRIVS (setuid binaries grant nothing), PR_SET_PDEATHSIG=SIGKILL (the
        # uid change cleared the one unshare set: if unshare dies, so does this namespace)
        if libc("prctl", 38, 1, 0, 0, 0) or libc("prctl", 1, 9, 0, 0, 0):
            raise OSError("prctl failed")
        for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                                (resource.RLIMIT_FSIZE, fsize, fsize),
                                (resource.RLIMIT_NPROC, nproc, nproc),
                                (resource.RLIMIT_NOFILE, nofile, nofile),
                                (resource.RLIMIT_CORE, 0, 0)):
            resource.setrlimit(res, (soft, hard))

        def read(n):
            buf = b""
            while len(buf) < n and (chunk := os.read(0, n - len(buf))):
                buf += chunk
            return buf

        code = read(int(read(16)))
    except Exception as e:  # a failed setup must never run the code with less isolation
        os.write(2, f"sandbox setup failed: {e!r}\n".encode())
        os._exit(125)  # _SETUP_FAILED (this function only sees its own names)
    if os.getpid() == 1:
        # pid 1 of a namespace ignores signals it has no handler for (even SIGKILL from inside),
        # which would defeat SIGXCPU: run the code in a child and only relay its exit status
        child = os.fork()
        if child:
            while True:
                pid, status = os.wait()
                if pid == child:
                    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status)
                             else 128 + os.WTERMSIG(status))
    try:
        os.setsid()
    except OSError:  # already a session leader (plain mode)
        pass
    sys.argv = ["<sandbox>"]
    try:
        exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__",
                                                  "__builtins__": __builtins__})
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        import linecache
        import traceback
        text = code.decode("utf-8", "replace")
        linecache.cache["<sandbox>"] = (len(text), None, text.splitlines(True), "<sandbox>")
        traceback.print_exception(e.with_traceback(e.__traceback__.tb_next))  # from the code on
        raise SystemExit(1)
