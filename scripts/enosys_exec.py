"""Run a command with a few newer path syscalls failing with ENOSYS (seccomp filter).

    python3 scripts/enosys_exec.py proot -q qemu-aarch64 -r SYSROOT ...

Debian's proot (5.1) rewrites the paths of the syscalls it knows, and statx,
faccessat2 and openat2 are newer: qemu-aarch64 passes a guest's statx /
faccessat2 on as the host's, proot leaves the path alone, and the guest sees
the host's file system there (CMake found no /src/CMakeLists.txt). With these
syscalls refused, qemu and glibc fall back to newfstatat / faccessat, which
proot translates. clone3 likewise falls back to clone, which proot follows.
The filter is inherited by every process below (proot, qemu, the guest).
Used by scripts/arm_emulated_install.sh.
"""
import ctypes
import os
import struct
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
ENOSYS = 38
REFUSED = [332, 435, 437, 439]  # x86-64: statx, clone3, openat2, faccessat2
# classic BPF: (code, jump if true, jump if false, k)
LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000


def insn(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)


def main():
    n = len(REFUSED)
    prog = [insn(LD_ABS, 0, 0, 4), insn(JEQ, 0, n + 1, AUDIT_ARCH_X86_64),  # another arch: allow
            insn(LD_ABS, 0, 0, 0)]                                           # the syscall number
    prog += [insn(JEQ, n - i, 0, nr) for i, nr in enumerate(REFUSED)]        # a refused one: to ERRNO
    prog += [insn(RET, 0, 0, ALLOW), insn(RET, 0, 0, ERRNO | ENOSYS)]
    code = ctypes.create_string_buffer(b"".join(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0):
        sys.exit(f"enosys_exec: seccomp filter refused: {os.strerror(ctypes.get_errno())}")
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    if len(sys.argv) < 2 or os.uname().machine != "x86_64":
        sys.exit("usage (x86-64 hosts): enosys_exec.py COMMAND [ARG...]")
    main()
