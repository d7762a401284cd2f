"""Triton kernels for the CUDA path, each with the plain-torch reference it is tested against.

One file per kernel: `<name>.py` holds the `@triton.jit` kernel(s), the Python launcher, and
`<name>_ref` (torch, float32 math) beside it. Nothing here imports the model code: the kernels
take plain tensors (paged KV as a CSR of slot indices, see `paged.py`), so tests can drive them
on random inputs and the model can call them without a cycle.

On the CPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, which must be set
before the first `import triton` in the process); that is how the unit tests check them.
"""
