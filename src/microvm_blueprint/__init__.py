"""microvm-blueprint: a Tangle Network operator that runs microVMs (QEMU microvm, Firecracker)."""

__version__ = "0.1.0"
