"""Triton kernels for geomon's hot paths, imported lazily (``geomon.functional`` picks them via ``backend=``).

Each module opens with the math, the bytes and FLOPs it must move and do, and its numerical notes; then the kernel,
then the launcher. Every kernel is tested against the torch reference of ``geomon.functional``, on the CPU with
``TRITON_INTERPRET=1`` in CI and on a GPU where one is available.
"""
