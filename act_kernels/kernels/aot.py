"""Compile-only mode: build every kernel a call would launch, for a chosen GPU, without a GPU.

Every launcher in this package starts its kernels through :func:`launch`. Inside
``with compile_only(arch):`` that function does not launch: it calls Triton's public
``warmup`` entry point instead (``JITFunction.warmup`` / ``Autotuner.warmup``), which
specializes the kernel on the real arguments exactly as a launch would, compiles it (all the
autotune configs left after ``configs.prune_configs`` for an autotuned kernel) and returns the
``CompiledKernel`` objects (PTX, cubin, ``metadata.shared``), which ``launch`` collects.

Triton asks its *active driver* for the target, the device and the stream before it compiles.
On a machine without a GPU there is no active driver, so ``compile_only`` installs a stand-in
(:class:`_TargetOnlyDriver`) that answers those three questions and nothing else; it cannot
launch, and a launch attempt fails. The device id it reports is the architecture number, so
that compiling for several targets in one process keeps one kernel cache per target (Triton
keys its caches by device).

Uses: CI (``tests/test_gpu_compile.py`` compiles every kernel for sm_80/90/100 on a CPU
machine), and warming the Triton cache for a GPU ahead of time.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
from typing import List, Optional

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

_state = {"target": None, "compiled": None}   # set only inside compile_only()


class _TargetOnlyDriver:
    """The part of Triton's driver interface that compiling needs: target, device, stream."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return int(self.target.arch)

    def get_current_stream(self, device=None) -> int:
        return 0


@contextlib.contextmanager
def compile_only(arch: int, backend: str = "cuda", warp_size: int = 32):
    """Inside the block, kernels are compiled for ``GPUTarget(backend, arch, warp_size)`` and
    collected instead of launched; yields the list they are appended to."""
    if _state["target"] is not None:
        raise RuntimeError("compile_only blocks do not nest")
    compiled: List = []
    previous = driver._active
    driver.set_active(_TargetOnlyDriver(GPUTarget(backend, arch, warp_size)))
    _state.update(target=GPUTarget(backend, arch, warp_size), compiled=compiled)
    try:
        yield compiled
    finally:
        _state.update(target=None, compiled=None)
        driver._active = previous


def target_arch() -> Optional[int]:
    """The architecture number (80, 90, ...) compile_only() builds for, or None."""
    target = _state["target"]
    return None if target is None else int(target.arch)


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``; while a graph is traced, through ``wrap_triton``; inside
    ``compile_only``, compile and collect.

    Traced (also inside ``compile_only``, whose stand-in driver lets Triton analyse the kernel;
    ``torch.library.triton_op`` under torch.compile, ``make_fx``, ...: the tensors are
    fake or functional stand-ins, or a proxy mode records a graph): ``wrap_triton(kernel)``
    records the launch as a triton kernel node (the first tensor argument tells: a trace's
    tensors are all stand-ins; the check costs about a microsecond per launch). An interpreted
    kernel cannot be recorded: on fake tensors alone (shape propagation) the launch is skipped,
    as there is nothing to compute, and a graph being recorded is refused rather than left
    without the kernel.

    Collected entries are ``(compiled_kernel, meta)`` with ``meta`` the meta-parameters it was
    built with (the launcher's keyword arguments plus the autotune config: block sizes,
    ``num_warps``, ``num_stages``). An autotuned kernel yields one entry per config left after
    its ``early_config_prune`` (what ``Autotuner.warmup`` compiles, in the same way).
    """
    recording = _recording_graph()
    if recording or is_stand_in(next((a for a in args if isinstance(a, torch.Tensor)), None)):
        if not is_interpreted(kernel):
            return torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
        if recording:
            raise RuntimeError(
                "act_attention: a Triton kernel running in the interpreter (TRITON_INTERPRET=1) "
                "cannot be traced into a graph; trace with compiled kernels (a GPU or "
                "kernels.aot.compile_only)")
        return None
    if _state["target"] is None:
        return kernel[grid](*args, **kwargs)
    if hasattr(kernel, "prune_configs"):          # triton.autotune wrapper
        kernel.nargs = dict(zip(kernel.arg_names, args))
        try:
            choices = [c.all_kwargs() for c in kernel.prune_configs(kwargs)]
        finally:
            kernel.nargs = None
        jit_fn = kernel.fn
    else:
        choices, jit_fn = [{}], kernel
    for config in choices:
        built = jit_fn.warmup(*args, grid=grid, **kwargs, **config)
        meta = {"num_warps": built.metadata.num_warps, "num_stages": built.metadata.num_stages,
                **kwargs, **config}
        _state["compiled"].append((built, meta))
    return None


def _recording_graph() -> bool:
    """Is a proxy mode (make_fx, AOTAutograd) recording the torch calls into a graph?"""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None


def is_stand_in(arg) -> bool:
    """A fake or functional tensor: the stand-in of a tensor while a graph is traced."""
    return isinstance(arg, torch.Tensor) and type(arg) is not torch.Tensor \
        and isinstance(arg, _stand_in_types())


@functools.lru_cache(maxsize=None)
def _stand_in_types() -> tuple:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return FakeTensor, FunctionalTensor


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a jit function, possibly autotuned) runs through the interpreter."""
    fn = kernel
    while hasattr(fn, "fn"):
        if type(fn).__name__ == "InterpretedFunction":
            return True
        fn = fn.fn
    return type(fn).__name__ == "InterpretedFunction"


def _nvidia_tool(name: str) -> str:
    from triton import knobs
    tool = getattr(knobs.nvidia, name)
    return tool.path


def resource_usage(compiled) -> dict:
    """Registers, stack and local memory of a compiled CUDA kernel, read from its cubin with
    ``cuobjdump --dump-resource-usage`` (shipped in the triton wheel), the dynamic shared memory
    Triton allocates (``metadata.shared``), and, when there is a stack frame or local memory,
    the bytes of register spill stores and loads (``ptxas -v``)."""
    cubin = compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", path],
                              check=True, capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text))
    if "REG" not in found:
        raise RuntimeError(f"cannot read the resource usage of {compiled.name}:\n{text}")
    usage = {"regs": int(found["REG"]), "stack": int(found.get("STACK", 0)),
             "local": int(found.get("LOCAL", 0)), "shared": int(compiled.metadata.shared),
             "spill_stores": 0, "spill_loads": 0}
    if usage["stack"] or usage["local"]:     # a stack frame is not always a spill: ask ptxas
        usage.update(_ptxas_spills(compiled))
    return usage


def _ptxas_spills(compiled) -> dict:
    """Spill stores / loads in bytes, from ``ptxas -v`` on the kernel's PTX."""
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\s*\.target\s+(\w+)", ptx, flags=re.MULTILINE).group(1)
    # the newer of the two ptxas binaries in the wheel reads every PTX version Triton emits
    tool = "ptxas_blackwell"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_nvidia_tool(tool), "-v", f"--gpu-name={arch}", path, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas -v failed on {compiled.name} ({arch}):\n{log[-2000:]}")
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if stores is None or loads is None:
        raise RuntimeError(f"cannot read spills of {compiled.name} from ptxas -v:\n{log}")
    return {"spill_stores": int(stores.group(1)), "spill_loads": int(loads.group(1))}
