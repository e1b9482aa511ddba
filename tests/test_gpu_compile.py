"""Every Triton kernel compiled for real GPU targets on a CPU-only machine (issue 11, item 1).

The interpreter accepts programs the real compiler rejects and ignores shared-memory and
register limits, so this test runs the real compiler: the backend's own Python path
(``act_attention_triton``) inside ``kernels.aot.compile_only(arch)``, which compiles, through
Triton's public ``warmup`` entry point, every kernel the call would launch, with the launcher's
exact arguments and every autotune config left after ``configs.prune_configs``, to PTX and cubin
(ptxas). Nothing runs; there is no GPU.

Asserted for every compiled kernel: it compiles; its shared memory (``metadata.shared``) is
within the target's per-block limit and within ``configs.smem_bytes`` (the estimate the pruning
rule uses, so every config the rule keeps fits); no register spills at any head dim
(``aot.resource_usage``: cuobjdump ``--dump-resource-usage``, and ``ptxas -v`` for the spill
bytes of the kernels that have a stack frame).

How the set is chosen (representative and complete, not the full product, to fit in 3 minutes
on 2 cores). What changes a compiled binary is: the kernel and its constexprs (block sizes,
stages, warps, ``BLOCK_D``, ``HAS_KPM``, ``TRACK``, ``IN_PREC``), the element type, the target,
and Triton's specialization of integer arguments (== 1, divisible by 16). The calibrated heads,
``beta``/``tau``
and lengths past those two classes do not. The head dim is a constexpr (``HEAD_DIM``): every D
is its own binary; only non-powers of two carry a lane mask. So:

* per target: prefill with calibrated heads and padding (forward, column and correction
  kernels, every config the pruning keeps) and decode with calibrated heads (the one-pass
  decode kernels), in bf16: on sm_90 (the main target) at D = 64, 128 and 256; on sm_80 (the
  smallest shared memory, 163 KiB) at D = 128 and 256; on sm_100 at D = 128;
* per dtype on sm_90: fp16 at D = 128 and 80 (80: a masked 128-lane block), fp32 at D = 128
  (tf32x3 dots, twice the bytes per element, its own pruning);
* the other head dims of common models on sm_90, bf16: D = 96 and 192 (masked blocks of 128 and
  256 lanes);
* decode with a group of 64 query heads per kv head (two chunks of ``BLOCK_G`` = 32 rows, 8
  warps; groups up to 16 use ``BLOCK_G`` = 16, ``group`` is a runtime argument);
* per path on sm_90: chunked prefill (Nq = 5, Nk = 77: no divisibility), prefill without
  padding or calibrated heads (forward only), decode without calibrated heads, and decode with
  statistics (the decode kernels' plain pass, then column and correction at Nq = 1);
* sliding windows: prefill at W = 17 on sm_80 and W = 1 on sm_90 (Triton specialises an
  argument equal to 1), decode and chunked prefill at W = 17 on sm_90;
* bidirectional blocks (the ``BLOCKS`` variants, issue 21): prefill on every target (bf16,
  D = 128), at D = 256 on sm_80 and sm_90, fp32 on sm_90, chunked prefill, decode and decode
  with statistics under a window (W = 17) on sm_90.

About 200 kernels; on 2 cores about 280 s of CPU, 18 minutes wall on the loaded machine (see the
figures printed by the first test, with the registers of every variant).

Compiled artefacts go to a per-session ``TRITON_CACHE_DIR`` (nothing from an earlier run is
reused); the cases run in parallel worker processes (one per core, at most 4). If ptxas,
ptxas-blackwell or cuobjdump is missing the test skips locally and fails with ``CI=true``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ARCHS = (80, 90, 100)
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def case_list():
    """The compile set described in the module docstring (dicts sent to the workers)."""
    cases = []

    def add(arch, path, dtype="bf16", dim=128, padded=True, heads="some", window=None,
            group=2, blocks=False):
        cases.append(dict(arch=arch, path=path, dtype=dtype, dim=dim, padded=padded, heads=heads,
                          window=window, group=group, blocks=blocks))

    for arch, dims in ((80, (128, 256)), (90, (64, 128, 256)), (100, (128,))):
        for dim in dims:
            add(arch, "prefill", dim=dim)
            add(arch, "decode", dim=dim)
    for dtype, dims in (("fp16", (128, 80)), ("fp32", (128,))):
        for dim in dims:
            add(90, "prefill", dtype=dtype, dim=dim)
            add(90, "decode", dtype=dtype, dim=dim)
    for dim in (96, 192):
        add(90, "prefill", dim=dim)
        add(90, "decode", dim=dim)
    add(90, "decode", group=64)
    add(90, "chunk", dim=80)
    add(90, "prefill", dim=128, padded=False, heads="none")
    add(90, "decode", dim=128, padded=False, heads="none")
    add(90, "decode_stats", dim=128)
    # sliding windows: a runtime argument, but W = 1 is specialised by Triton (its own binary)
    add(80, "prefill", window=17)
    add(90, "prefill", window=1)
    add(90, "decode", window=17)
    add(90, "chunk", dim=80, window=17)
    # bidirectional blocks (issue 21): the BLOCKS variants, where registers are tightest (sm_80,
    # D = 256, fp32), on every target; decode's variant needs a window (without one a block
    # changes nothing for the last row)
    for arch in ARCHS:
        add(arch, "prefill", blocks=True)
    add(80, "prefill", dim=256, blocks=True)
    add(90, "prefill", dim=256, blocks=True)
    add(90, "prefill", dtype="fp32", blocks=True)
    add(90, "chunk", dim=80, window=17, blocks=True)
    add(90, "decode", window=17, blocks=True)
    add(90, "decode_stats", window=17, blocks=True)
    return cases


# ---------------------------------------------------------------------------------------------
# worker: runs without the interpreter, in its own process
# ---------------------------------------------------------------------------------------------
def _compile_case(case, prune=True):
    import torch

    from act_kernels.kernels import aot, configs
    from act_kernels.triton_backend import act_attention_triton

    dtype = getattr(torch, DTYPES[case["dtype"]])
    bsz, hkv, dim = 2, 2, case["dim"]
    hq = hkv * case.get("group", 2)
    nq, nk = {"prefill": (64, 64), "chunk": (5, 77)}.get(case["path"], (1, 64))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(bsz, hq, nq, dim, generator=gen).to(dtype)
    k = torch.randn(bsz, hkv, nk, dim, generator=gen).to(dtype)
    v = torch.randn(bsz, hkv, nk, dim, generator=gen).to(dtype)
    kpm = None
    if case["padded"]:
        kpm = torch.ones(bsz, nk, dtype=torch.bool)
        kpm[1, :3] = False
    heads = None if case["heads"] == "none" else (torch.arange(hq) % 2 == 0).expand(bsz, hq)
    block_ids = None
    if case.get("blocks"):
        block_ids = torch.full((bsz, nk), -1, dtype=torch.long)
        block_ids[:, nk // 3: nk - 2] = 0
    if not prune:
        for kernel in configs.AUTOTUNED.values():
            kernel.early_config_prune = None
    start, cpu_start = time.time(), _cpu_seconds()
    with aot.compile_only(case["arch"]) as built:
        act_attention_triton(q, k, v, heads, 0.4, 0.1, dim ** -0.5, kpm,
                             case["path"] == "decode_stats", window=case.get("window"),
                             block_ids=block_ids)
    records = []
    for kernel, meta in built:
        usage = aot.resource_usage(kernel)
        meta = {key: val for key, val in meta.items() if isinstance(val, (int, str, bool))}
        records.append(dict(case, kernel=kernel.name, meta=meta, **usage,
                            smem_limit=configs.SMEM_LIMIT[case["arch"]],
                            elsize=q.element_size()))
    return records, time.time() - start, _cpu_seconds() - cpu_start


def _cpu_seconds():
    """CPU time of this process and its finished children (ptxas runs as a child)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _worker_main(argv):
    """``python test_gpu_compile.py --worker CASES_JSON [--no-prune]``: one JSON line per case."""
    cases = json.loads(argv[argv.index("--worker") + 1])
    for case in cases:
        records, seconds, cpu = _compile_case(case, prune="--no-prune" not in argv)
        print(json.dumps({"case": case, "records": records, "seconds": seconds, "cpu": cpu}),
              flush=True)


if __name__ == "__main__":
    _worker_main(sys.argv)
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# the test (pytest side)
# ---------------------------------------------------------------------------------------------
def _tools_or_fail():
    import triton
    from triton import knobs

    missing = []
    for name in ("ptxas", "ptxas_blackwell", "cuobjdump"):
        try:
            tool = getattr(knobs.nvidia, name)
            if tool is None or not os.path.exists(tool.path):
                missing.append(name)
        except Exception:  # noqa: BLE001 - any failure to locate the tool means it is missing
            missing.append(name)
    if missing:
        reason = (f"{', '.join(missing)} not found (they ship in the triton wheel under "
                  f"{os.path.dirname(triton.__file__)}/backends/nvidia/bin)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)


def run_workers(cases, cache_dir, prune=True, n_workers=None):
    """Compile ``cases`` in parallel worker processes; returns (records, per-case seconds)."""
    n_workers = n_workers or max(1, min(4, os.cpu_count() or 1, len(cases)))
    # cases that build the same binaries (D = 80 and 128 share BLOCK_D = 128 and Triton's
    # "multiple of 16" specialization) go to one worker, one after the other, so that the second
    # is a cache hit; the costliest groups first, dealt round-robin
    groups = {}
    for case in cases:
        key = (case["arch"], case["path"], case["dtype"], case["padded"], case["heads"],
               case.get("blocks"),
               max(16, 1 << (case["dim"] - 1).bit_length()))
        groups.setdefault(key, []).append(case)
    order = sorted(groups.values(), key=lambda g: (g[0]["path"] != "prefill", -g[0]["dim"]))
    chunks = [sum(order[i::n_workers], []) for i in range(n_workers)]
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache_dir), TRITON_INTERPRET="0",
               TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    args = [] if prune else ["--no-prune"]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                               json.dumps(chunk), *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for chunk in chunks if chunk]
    records, seconds = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"compile worker failed:\n{err[-5000:]}"
        for line in out.splitlines():
            result = json.loads(line)
            records += result["records"]
            seconds.append((result["case"], result["seconds"], result["cpu"]))
    return records, seconds


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    _tools_or_fail()
    start = time.time()
    records, seconds = run_workers(case_list(), tmp_path_factory.mktemp("triton_cache"))
    return dict(records=records, seconds=seconds, wall=time.time() - start)


def _config(r):
    keys = ("BLOCK_G", "BLOCK_M", "BLOCK_N", "BLOCK_S", "num_warps", "num_stages")
    return " ".join(f"{k.replace('BLOCK_', '').replace('num_', '')}{r['meta'][k]}"
                    for k in keys if k in r["meta"])


def describe(r):
    meta = {k: r["meta"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_S", "BLOCK_D", "num_warps",
                                       "num_stages") if k in r["meta"]}
    window = f" W={r['window']}" if r.get("window") else ""
    window += " blocks" if r.get("blocks") else ""
    return f"sm_{r['arch']} {r['kernel']} {r['dtype']} D={r['dim']}{window} {meta}"


AUTOTUNED = {"_flash_forward_kernel": "forward", "_column_scores_kernel": "column",
             "_sink_correction_kernel": "correction"}
EXPECTED = {  # path (heads calibrated) -> kernels the backend launches
    "prefill": {"_flash_forward_kernel", "_column_scores_kernel", "_sink_correction_kernel"},
    "chunk": {"_flash_forward_kernel", "_column_scores_kernel", "_sink_correction_kernel"},
    "decode": {"_decode_split_kernel", "_decode_epilogue_kernel"},
    "decode_stats": {"_decode_split_kernel", "_decode_epilogue_kernel", "_column_scores_kernel",
                     "_sink_correction_kernel"},
}


def estimate(r):
    from act_kernels.kernels import configs
    return configs.smem_bytes(AUTOTUNED[r["kernel"]], r["meta"], r["meta"]["BLOCK_D"],
                              r["elsize"], r["meta"]["num_stages"])


def test_every_kernel_compiles_for_every_target(compiled):
    by_case = {}
    for r in compiled["records"]:
        key = json.dumps({k: r[k] for k in ("arch", "path", "dtype", "dim", "padded", "heads",
                                             "window", "group", "blocks")})
        by_case.setdefault(key, []).append(r)
    cases = case_list()
    assert len(by_case) == len(cases), "a case compiled nothing"
    for case in cases:
        got = {r["kernel"] for r in by_case[json.dumps(case)]}
        want = ({"_flash_forward_kernel"} if case["path"] == "prefill" else
                {"_decode_split_kernel", "_decode_epilogue_kernel"}) if case["heads"] == "none" \
            else EXPECTED[case["path"]]
        assert got == want, case
    assert {r["arch"] for r in compiled["records"]} == set(ARCHS)
    assert {r["dtype"] for r in compiled["records"]} == set(DTYPES)
    print(f"\n{len(compiled['records'])} kernels compiled in {compiled['wall']:.0f} s wall, "
          f"{sum(s[2] for s in compiled['seconds']):.0f} s CPU")
    print("| target | kernel | dtype | D | group | config | regs | spill st/ld B | shared B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(compiled["records"], key=lambda r: (r["arch"], r["kernel"], r["dtype"],
                                                         r["dim"], r.get("group", 2),
                                                         bool(r.get("blocks")))):
        blocks = " (blocks)" if r.get("blocks") else ""
        print(f"| sm_{r['arch']} | {r['kernel'].strip('_')}{blocks} | {r['dtype']} | {r['dim']} | "
              f"{r.get('group', 2)} | {_config(r)} | {r['regs']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} |")


def test_shared_memory_fits_and_the_estimate_bounds_it(compiled):
    for r in compiled["records"]:
        assert r["shared"] <= r["smem_limit"], f"{describe(r)}: {r['shared']} B shared memory"
        if r["kernel"] in AUTOTUNED:
            est = estimate(r)
            assert r["shared"] <= est, f"{describe(r)}: {r['shared']} B > estimate {est} B"


def _spills(r):
    return r["spill_stores"] > 0 or r["spill_loads"] > 0


def test_no_register_spills(compiled):
    spilling = [f"{describe(r)}: {r['regs']} regs, spill stores {r['spill_stores']} B, loads "
                f"{r['spill_loads']} B (stack frame {r['stack']} B)"
                for r in compiled["records"] if _spills(r)]
    assert not spilling, "\n".join(spilling)
