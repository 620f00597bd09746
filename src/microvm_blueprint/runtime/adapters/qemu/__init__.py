"""The QEMU ``microvm`` driver, in three rooms: ``argv`` (settings, file names, the argv of one VM and
the TCG clock pinning), ``process`` (one VM's QEMU process with its QMP client, console and watcher),
``console`` (the console file QEMU writes and the operator caps) and ``driver`` (:class:`QemuDriver`,
the :class:`~microvm_blueprint.runtime.driver.VmmDriver` over them)."""

from .argv import (
    CONSOLE_LOG,
    PID_FILE,
    QMP_SOCK,
    QemuSettings,
    host_tsc_khz,
    kernel_cmdline,
    qemu_argv,
    tsc_khz_from_kernel_log,
)
from .driver import QemuDriver
from .process import QemuProcess, map_qmp_error

__all__ = [
    "CONSOLE_LOG",
    "PID_FILE",
    "QMP_SOCK",
    "QemuDriver",
    "QemuProcess",
    "QemuSettings",
    "host_tsc_khz",
    "kernel_cmdline",
    "map_qmp_error",
    "qemu_argv",
    "tsc_khz_from_kernel_log",
]
