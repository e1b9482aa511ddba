"""Transformers' own model test suites with ``act_torch`` forced, beside the same tests unforced.

What it runs: ``tests/models/{llama,mistral,qwen2,gemma3}/test_modeling_*.py`` of Transformers
(the Gemma 3 file holds the text model and the vision-language model,
``Gemma3ForConditionalGeneration``), with everything they import (``test_modeling_common.py``,
``generation/test_utils.py``, ``test_configuration_common.py``, ``test_pipeline_mixin.py``,
``causal_lm_tester.py``, ...), once per mode:

* ``act_torch``: every causal-LM text decoder that would get the default attention or
  ``"sdpa"`` gets ``act_torch`` instead, with no calibration profile (no head calibrated, as an
  empty profile); ``"eager"`` stays eager, so the eager-vs-sdpa parity tests compare eager with
  ACT; vision towers keep sdpa (``hf_model_tests_plugin.py``);
* ``sdpa``: Transformers unchanged, the baseline (failures there are not ACT's).

The test code is never copied into this repository: it is extracted at run time into a cache
directory (default ``~/.cache/act_kernels/hf_model_tests``) from a Transformers git directory
(``--git-dir``, ``--rev``) or a checkout (``--checkout``), and the top-level shared test files
are overlaid from the source distribution of the *installed* release (``pip download
transformers==<installed> --no-binary :all:``; the sdist ships ``tests/*.py`` but not
``tests/models`` nor ``tests/generation``). Once extracted, later runs reuse the tree.
Test-only dependencies the venv lacks (``parameterized``, ``httpx``) are installed into the
cache with ``pip --target``, not into the venv.

Output (``--out``): ``results-<mode>.jsonl`` (one line per test phase, from the plugin),
``pytest-<mode>.log``, and ``report.csv`` / ``report.md``: every test with both outcomes, and
each test that fails with ACT but not with sdpa in one cause: an ACT refusal (of a packed
batch, image blocks, a custom 4-D mask, another mask, another feature), the gradient refusal
(forward-only backends; gradient checkpointing counted apart), a test asserting the
implementation's name, or other.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hf_model_tests.py \\
        --git-dir /path/to/transformers/.git --rev v5.23.0
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CACHE = Path(os.environ.get("ACT_HF_TESTS_CACHE",
                                    Path.home() / ".cache" / "act_kernels" / "hf_model_tests"))
MODELS = ("llama", "mistral", "qwen2", "gemma3")
MODES = ("act_torch", "sdpa")
DIAGNOSIS = "act_torch_nograd_eval"     # opt-in: eval() forwards' ACT calls under no_grad
TEST_DEPS = ("parameterized", "httpx", "httpcore", "h11", "anyio", "idna", "certifi", "sniffio")
MARKERS = ("generate", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
           "all_flash_attn_test", "torch_compile_test", "torch_export_test", "bitsandbytes",
           "is_training_test", "is_tensor_parallel_test", "is_fsdp_test", "slow", "not_device_test")

# Test helpers that the installed release's shared files import and a snapshot may lack:
# distributed (multi-process) helpers. The shim skips any test that reaches one.
SHIMS = {
    "tests/distributed_testing_utils.py":
        '"""Shim written by act-kernels\' hf_model_tests.py: the distributed helpers of this\n'
        'Transformers release were not in the extracted tests; a test that needs one is skipped."""\n'
        "import unittest\n\n\n"
        "def __getattr__(name):\n"
        "    def helper(*args, **kwargs):\n"
        "        raise unittest.SkipTest(f'distributed test helper {name} not extracted')\n"
        "    return helper\n",
}

# -- the test tree ----------------------------------------------------------------------------


def installed_transformers():
    import transformers

    return transformers.__version__, Path(transformers.__file__).resolve().parent


def _git_tree(git_dir: Path, rev: str, dest: Path) -> str:
    """Extract tests/ and utils/test_module of ``rev`` into ``dest``; returns the full commit."""
    git = ["git", f"--git-dir={git_dir}"]
    commit = subprocess.run(git + ["rev-parse", f"{rev}^{{commit}}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(git + ["archive", commit, "tests", "utils/test_module"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return commit


def _sdist(cache: Path, version: str, given: Optional[str]) -> Optional[Path]:
    if given == "none":
        return None
    if given:
        return Path(given)
    found = sorted((cache / "sdist").glob(f"transformers-{version}.tar.gz"))
    if found:
        return found[0]
    (cache / "sdist").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"transformers=={version}",
                    "--no-binary", ":all:", "--no-deps", "-q",
                    "-d", str(cache / "sdist")], check=True)
    return cache / "sdist" / f"transformers-{version}.tar.gz"


def _overlay_sdist(sdist: Path, dest: Path) -> List[str]:
    """Copy the sdist's top-level ``tests/*.py`` (the installed release's shared test files)."""
    names = []
    pattern = re.compile(r"^[^/]+/tests/([^/]+\.py)$")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            m = pattern.match(member.name)
            if m and member.isfile():
                (dest / "tests" / m.group(1)).write_bytes(tar.extractfile(member).read())
                names.append(m.group(1))
    return sorted(names)


def prepare_tree(cache: Path, git_dir: Optional[str], rev: str, checkout: Optional[str],
                 sdist: Optional[str], rebuild: bool = False) -> Path:
    """The extracted test tree for the installed Transformers (built once, then reused)."""
    version, package = installed_transformers()
    tree = cache / f"tree-{version}"
    if (tree / "SOURCE.txt").exists() and not rebuild and not (git_dir or checkout):
        return tree
    if not (git_dir or checkout):
        raise SystemExit(f"no extracted tests in {tree}: give --git-dir (a Transformers git "
                         "directory, with --rev) or --checkout (a Transformers source tree)")
    tmp = cache / f"tree-{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if git_dir:
        commit = _git_tree(Path(git_dir), rev, tmp)
        source = [f"tests/, utils/test_module: git {git_dir} at {commit} (asked: {rev})"]
    else:
        for part in ("tests", "utils/test_module"):
            shutil.copytree(Path(checkout) / part, tmp / part)
        source = [f"tests/, utils/test_module: checkout {checkout}"]
    sdist_path = _sdist(cache, version, sdist)
    if sdist_path is not None:
        names = _overlay_sdist(sdist_path, tmp)
        source.append(f"tests/*.py ({len(names)} files) overlaid from {sdist_path.name}")
    for rel, text in SHIMS.items():
        if not (tmp / rel).exists():
            (tmp / rel).write_text(text)
            source.append(f"{rel}: shim (not in the source)")
    (tmp / "src").mkdir()
    (tmp / "src" / "transformers").symlink_to(package)   # test_pipeline_mixin reads src/
    (tmp / "pytest.ini").write_text("[pytest]\nmarkers =\n" +
                                    "".join(f"    {m}\n" for m in MARKERS))
    (tmp / "SOURCE.txt").write_text(f"transformers {version} installed at {package}\n" +
                                    "\n".join(source) + "\n")
    shutil.rmtree(tree, ignore_errors=True)
    tmp.rename(tree)
    return tree


def ensure_test_deps(cache: Path) -> Path:
    """Install into ``cache/deps`` the test-only modules the venv cannot import."""
    import importlib.util

    deps = cache / "deps"
    missing = [m for m in TEST_DEPS if importlib.util.find_spec(m) is None
               and not (deps / m).exists()]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(deps)] + missing, check=True)
    return deps


# -- running ----------------------------------------------------------------------------------


def test_files(tree: Path, models: Iterable[str]) -> List[str]:
    files = []
    for model in models:
        path = tree / "tests" / "models" / model / f"test_modeling_{model}.py"
        if not path.exists():
            raise SystemExit(f"{path} not in the extracted tests")
        files.append(str(path.relative_to(tree)))
    return files


def run_mode(tree: Path, deps: Path, mode: str, files: List[str], out: Path,
             keyword: Optional[str], extra: List[str], timeout: Optional[float] = None
             ) -> float:
    """Run the suites in one mode; returns the seconds taken. Past ``timeout`` the run is
    stopped and what finished is reported (the log says so)."""
    results = out / f"results-{mode}.jsonl"
    results.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(ACT_HF_FORCE="" if mode == "sdpa" else "act_torch",
               ACT_HF_NOGRAD_EVAL="1" if mode == DIAGNOSIS else "", ACT_HF_RESULTS=str(results),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), str(deps),
                                           env.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "-p", "hf_model_tests_plugin", "-c", str(tree / "pytest.ini"),
           "--rootdir", str(tree), "-rN"] + (["-k", keyword] if keyword else []) + extra + files
    start = time.perf_counter()
    with open(out / f"pytest-{mode}.log", "w") as log:
        try:
            subprocess.run(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\nhf_model_tests: stopped after {timeout} s; the report covers the "
                      "tests that finished\n")
            print(f"{mode}: stopped after {timeout} s", flush=True)
    return time.perf_counter() - start


# -- reading and classifying ------------------------------------------------------------------

COUNTERS = ("mask_4d", "packed", "blocks", "overlay", "act_calls", "grad_calls", "train_calls")
_RANK = {"error": 4, "failed": 3, "passed": 2, "xfailed": 1, "skipped": 0}


def load_results(lines: Iterable[str]) -> Dict[str, dict]:
    """One record per test from the plugin's per-phase lines: the worst outcome (a failed
    subtest fails the test; an error in setup/teardown is ``error``), its message, and the
    evidence (counters summed over the phases)."""
    tests: Dict[str, dict] = {}
    for line in lines:
        if not line.strip():
            continue
        r = json.loads(line)
        outcome = r["outcome"]
        if outcome == "failed" and r["when"] != "call":
            outcome = "error"
        elif outcome == "skipped" and r.get("wasxfail"):
            outcome = "xfailed"
        cur = tests.get(r["nodeid"])
        if cur is None:
            cur = tests[r["nodeid"]] = {"nodeid": r["nodeid"], "outcome": outcome,
                                        "message": r["message"], "act_frames": False,
                                        "tail": r.get("tail", ""), "mask_4d": 0, "packed": 0,
                                        **{key: 0 for key in COUNTERS}}
        elif _RANK[outcome] > _RANK[cur["outcome"]]:
            cur.update(outcome=outcome, message=r["message"], tail=r.get("tail", ""))
        cur["act_frames"] |= bool(r.get("act_frames"))
        for key in COUNTERS:
            cur[key] = max(cur[key], int(r.get(key, 0)))
    return tests


GRADIENT = "forward-only, but gradients were asked for"
MASK_REFUSAL = "unsupported attention mask"


def failing_line(tail: str) -> str:
    """The source line pytest shows just above the first ``E`` line of a traceback."""
    lines = tail.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("E ") and i:
            return lines[i - 1].lstrip("> ").strip()
    return ""


def asserts_name(rec: dict) -> bool:
    """An assertion about which attention implementation the model has (``'sdpa'``)."""
    if not rec["message"].startswith("AssertionError") or rec["act_frames"]:
        return False
    return "act_torch" in rec["message"] or "attn_implementation" in failing_line(rec["tail"])


def classify(rec: dict) -> str:
    """The cause of a test that fails with ACT (and not with sdpa)."""
    text = rec["message"] + "\n" + rec.get("tail", "")
    name = rec["nodeid"].rsplit("::", 1)[-1]
    if GRADIENT in text:
        if "gradient_checkpointing" in name:
            return "gradient refusal: gradient checkpointing"
        if rec["train_calls"]:
            return "gradient refusal: training (model in train())"
        return "gradient refusal: eval() forward outside no_grad"
    if MASK_REFUSAL in text or "ACTMaskError" in text:
        if rec["mask_4d"]:
            return "refusal: custom 4-D mask"
        if rec["packed"]:
            return "refusal: packed sequences"
        if rec["blocks"]:
            return "refusal: image blocks"
        return "refusal: other mask"
    refused = rec["message"].startswith("NotImplementedError") and (
        rec["act_frames"] or "act" in rec["message"])
    if refused:
        return "refusal: other feature"
    if asserts_name(rec):
        return "asserts the implementation's name"
    return "other" + (" (through act_kernels)" if rec["act_frames"] else "")


def masks_seen(rec: Optional[dict]) -> str:
    """The mask structures a test's models built (recorded before any refusal)."""
    if not rec:
        return ""
    tags = [("custom 4-D", "mask_4d"), ("packed", "packed"), ("image blocks", "blocks")]
    return ", ".join(tag for tag, key in tags if rec.get(key))


def _first_line(rec: dict) -> str:
    lines = rec["message"].strip().splitlines()
    return lines[0][:300] if lines else ""


def compare(act: Dict[str, dict], base: Dict[str, dict], label: str = "act_torch"
            ) -> List[dict]:
    rows = []
    for nodeid in sorted(set(act) | set(base)):
        a, b = act.get(nodeid), base.get(nodeid)
        a_out = a["outcome"] if a else "not run"
        b_out = b["outcome"] if b else "not run"
        bad = ("failed", "error")
        if a_out in bad and b_out not in bad:
            cause = classify(a)
        elif a_out in bad:
            cause = "fails with sdpa too"
        elif b_out in bad:
            cause = "fails with sdpa only"
        else:
            cause = ""
        rows.append({"test": nodeid, "sdpa": b_out, label: a_out, "cause": cause,
                     "act_calls": a["act_calls"] if a else 0, "masks": masks_seen(a),
                     "message": _first_line(a) if a_out in bad else "",
                     "sdpa_message": _first_line(b) if b_out in bad else ""})
    return rows


def _cells(*cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _file_of(nodeid: str) -> str:
    return nodeid.split("::")[0].rsplit("/", 1)[-1]


def _class_of(nodeid: str) -> str:
    parts = nodeid.split("::")
    return parts[1] if len(parts) > 2 else parts[0]


_VARIANT = re.compile(r"_\d+(_[A-Za-z0-9_]*)?$")


def compact(rows: List[dict]) -> List[tuple]:
    """``(cause, test method, variants, classes)`` for the new failures: one line per test
    method (parameterized variants counted) with the classes it fails in."""
    groups: Dict[tuple, dict] = {}
    for r in rows:
        if not r["cause"] or r["cause"].startswith("fails with"):
            continue
        method = _VARIANT.sub("", r["test"].rsplit("::", 1)[-1])
        cls = re.sub(r"(Model)?Test$", "", _class_of(r["test"]))
        g = groups.setdefault((r["cause"], method), {"variants": set(), "classes": set()})
        g["variants"].add(r["test"].rsplit("::", 1)[-1])
        g["classes"].add(cls)
    return [(cause, method, len(g["variants"]), ", ".join(sorted(g["classes"])))
            for (cause, method), g in sorted(groups.items())]


def write_report(rows: List[dict], out: Path, header: List[str], label: str = "act_torch",
                 name: str = "report") -> str:
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["test"])
        writer.writeheader()
        writer.writerows(rows)
    md = list(header)
    md += ["", f"| test class | tests | sdpa: passed / failed / skipped | {label}: passed / "
           "failed / skipped | ran ACT attention |", "|---|---|---|---|---|"]
    by_class = defaultdict(list)
    for row in rows:
        by_class[_file_of(row["test"]) + "::" + _class_of(row["test"])].append(row)
    for cls, group in sorted(by_class.items()):
        def counts(mode):
            c = Counter(r[mode] for r in group)
            return (f"{c['passed']} / {c['failed'] + c['error']} / "
                    f"{c['skipped'] + c['xfailed'] + c['not run']}")
        ran = sum(1 for r in group if r["act_calls"])
        md.append(f"| `{cls}` | {len(group)} | {counts('sdpa')} | {counts(label)} | {ran} |")
    causes = Counter(r["cause"] for r in rows if r["cause"])
    md += ["", f"Tests that fail with `{label}` and not with sdpa, by cause:", "",
           "| cause | tests |", "|---|---|"]
    new = [r for r in rows if r["cause"] and not r["cause"].startswith("fails with")]
    for cause, n in sorted(causes.items()):
        if not cause.startswith("fails with"):
            md.append(f"| {cause} | {n} |")
    md.append(f"| **total** | **{len(new)}** |")
    for kind in ("fails with sdpa too", "fails with sdpa only"):
        md.append(f"\n{kind}: {causes.get(kind, 0)}")
    md += ["", "| cause | test | variants | classes |", "|---|---|---|---|"]
    md += [f"| {c} | `{m}` | {n} | {k} |" for c, m, n, k in compact(rows)]
    md += ["", "| test | cause | masks built (seen before any refusal) | first line of the "
           "error |", "|---|---|---|---|"]
    for r in sorted(new, key=lambda r: (r["cause"], r["test"])):
        md.append(_cells(f"`{r['test'].split('/')[-1]}`", r["cause"], r["masks"],
                         r["message"]))
    both = [r for r in rows if r["cause"].startswith("fails with")]
    if both:
        md += ["", "Failures that are not ACT's (sdpa fails too, or only sdpa fails):", "",
               f"| test | sdpa | {label} | sdpa's error | {label}'s error (if other) |",
               "|---|---|---|---|---|"]
        for r in both:
            mine = "" if r["message"] == r["sdpa_message"] else r["message"]
            md.append(_cells(f"`{r['test'].split('/')[-1]}`", r["sdpa"], r[label],
                             r["sdpa_message"], mine))
    text = "\n".join(md) + "\n"
    (out / f"{name}.md").write_text(text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--git-dir", help="a Transformers git directory (bare or .git)")
    p.add_argument("--rev", default="HEAD", help="its commit or tag (default HEAD)")
    p.add_argument("--checkout", help="or a Transformers source tree (with tests/ and utils/)")
    p.add_argument("--sdist", help="the installed release's sdist (default: pip download it; "
                   "'none': use the snapshot's shared test files)")
    p.add_argument("--rebuild", action="store_true", help="extract the tests again")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, help="report directory (default CACHE/report)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"of act_torch, sdpa (the baseline) and {DIAGNOSIS} (diagnosis: an "
                   "eval() model's ACT calls in grad mode run under no_grad, to show what the "
                   "forward-only refusal hides)")
    p.add_argument("--reuse", default="", help="modes whose results already in --out are read, "
                   "not run again (e.g. sdpa)")
    p.add_argument("--timeout", type=float, help="seconds each mode may run (default: no limit)")
    p.add_argument("-k", dest="keyword", help="pytest -k expression")
    p.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = p.parse_args(argv)

    cache = args.cache.resolve()
    tree = prepare_tree(cache, args.git_dir, args.rev, args.checkout, args.sdist, args.rebuild)
    deps = ensure_test_deps(cache)
    out = (args.out or cache / "report").resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = test_files(tree, args.models.split(","))
    modes = args.modes.split(",")
    seconds = {}
    reuse = set(filter(None, args.reuse.split(",")))
    for mode in modes:
        if mode in reuse and (out / f"results-{mode}.jsonl").exists():
            continue
        seconds[mode] = run_mode(tree, deps, mode, files, out, args.keyword, args.pytest_args,
                                 args.timeout)
        print(f"{mode}: {seconds[mode]:.0f} s (log {out / f'pytest-{mode}.log'})", flush=True)
    loaded = {}
    for mode in modes:
        path = out / f"results-{mode}.jsonl"
        loaded[mode] = load_results(path.read_text().splitlines() if path.exists() else [])
    import torch

    version, _ = installed_transformers()
    header = [f"Transformers {version} model tests ({', '.join(args.models.split(','))}); "
              f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}; "
              + ", ".join(f"{m} run {s:.0f} s" for m, s in seconds.items()) + ".",
              "", "Test source: " + "; ".join((tree / "SOURCE.txt").read_text().splitlines())]
    for mode in modes:
        if mode == "sdpa":
            continue
        name = "report" if mode == "act_torch" else f"report-{mode}"
        text = write_report(compare(loaded[mode], loaded.get("sdpa", {}), mode), out,
                            header, mode, name)
        print(text)
        print(f"report: {out / (name + '.md')}, {out / (name + '.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
