"""The `certbench` command: train, run, vnncomp, paradox, report, compare, list, show, zoo.

A user's mistake prints one line ``certbench: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from certbench.errors import UserError

EXAMPLES = {
    "train": "example: certbench train --dataset digits --arch mlp --recipe gloro "
    "--recipe-args '{\"eps\": 0.5}' --out checkpoints/mlp-gloro",
    "run": "example: certbench run --matrix quick --results results/quick --workers 2 "
    "--timeout 600\n         certbench run --matrix quick --executor ray --address "
    "HEAD_IP:6379",
    "list": "example: certbench list",
    "show": "example: certbench show results/quick",
    "report": "example: certbench report results/quick --out reports/quick",
    "vnncomp": "example: certbench vnncomp vnncomp2021/mnistfc/mnistfc_instances.csv "
    "--verifiers crown alpha-crown exact --timeout-scale 0.25 --workers 2",
    "paradox": "example: certbench paradox results/gls-paradox --matrix gls-paradox",
    "compare": "example: certbench compare results/baseline results/quick "
    "--max-slowdown 1.3 --max-acc-drop 0.0",
    "zoo": "example: certbench zoo\n         certbench zoo --build gloro-mnist-2c2f --device "
    "cuda\n         (in a matrix: checkpoint = \"zoo:gloro-mnist-2c2f\")",
}


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({exc.msg})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _checkpoint_dir(args: argparse.Namespace) -> Path:
    return Path(args.checkpoint_dir or os.environ.get("CERTBENCH_CHECKPOINTS", "checkpoints"))


def _executor(args: argparse.Namespace):
    """The executor that ``--executor``, ``--workers``, ``--memory-limit-gb`` and
    ``--address`` ask for."""
    from certbench.run.runner import make_executor

    if args.address is not None and args.executor != "ray":
        raise UserError("--address is for --executor ray")
    if args.memory_limit_gb is not None and args.memory_limit_gb <= 0:
        raise UserError("--memory-limit-gb must be positive (omit it for 85% of the "
                        "machine's memory)")
    return make_executor(args.executor, args.workers, args.address, args.memory_limit_gb)


def add_executor_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--executor``, ``--workers``, ``--memory-limit-gb``, ``--address`` for ``what``
    (cells, instances)."""
    parser.add_argument("--executor", choices=("process", "inline", "ray"), default="process",
                        help=f"process (default): each of the {what} in a fresh worker "
                        "process, with its time limit, crash containment and its own memory "
                        "measurement; inline: in this process (for debugging; no limits); "
                        "ray: on a Ray cluster")
    parser.add_argument("--workers", type=int, default=1,
                        help=f"{what} run side by side (process executor: worker processes, "
                        "the cores divided among them; ray: tasks in flight). Time with 1 "
                        "when timings are compared (default 1)")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="resident memory per task before it is stopped and recorded as "
                        "oom (default: 85%% of the machine's memory)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (with --executor ray; default: "
                        "$RAY_ADDRESS, else a local Ray instance)")


def cmd_train(args: argparse.Namespace) -> int:
    from certbench.data import load_dataset
    from certbench.run.executors import resolve_device
    from certbench.training.train import train_model

    dataset = load_dataset(args.dataset, args.data_dir, download=args.download)
    _, card = train_model(
        args.out, dataset, args.arch, args.arch_args, args.recipe, args.recipe_args,
        seed=args.seed, device=str(resolve_device(args.device)), progress=not args.quiet,
    )
    print(f"saved {args.out}.safetensors and {args.out}.json: clean accuracy "
          f"{card['clean_acc']:.4f}, {card['train_time_s']:.1f} s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from certbench.matrix import load_matrix
    from certbench.report.summary import format_summary
    from certbench.run.runner import run_matrix

    spec = load_matrix(args.matrix)
    if args.device:
        spec.device = args.device
    if args.timeout is not None:
        if args.timeout <= 0:
            raise UserError("--timeout must be positive (seconds per cell)")
        spec.timeout_s = args.timeout
    executor = _executor(args)
    if args.samples is not None:
        if args.samples <= 0:
            raise UserError("--samples must be positive")
        spec.samples = args.samples
    if args.seed is not None:
        spec = spec.with_seed(args.seed)
    default_results = spec.name if args.seed is None else f"{spec.name}-seed{args.seed}"
    results = Path(args.results or Path("results") / default_results)
    source = Path(args.matrix)
    matrix_file = str(source.resolve()) if source.exists() else f"packaged: {args.matrix}"
    cells = run_matrix(spec, results, _checkpoint_dir(args), args.data_dir, force=args.force,
                       progress=not args.quiet, matrix_file=matrix_file, executor=executor)
    print(format_summary(results))
    violations = cells.get("soundness_violations")
    if violations is not None and (violations.fillna(0) > 0).any():
        print("certbench: soundness violations found (see above): a verifier certified a "
              "sample that PGD flipped", file=sys.stderr)
        return 1
    unchecked = cells[(cells["status"] == "ok") & cells["attack_error"].notna()] \
        if "attack_error" in cells else cells.iloc[:0]
    if len(unchecked):
        print(f"certbench: {len(unchecked)} cell(s) ran without the PGD cross-check (see "
              "above); rerun to retry their attacks", file=sys.stderr)
        return 3
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from certbench.data import DATASETS
    from certbench.matrix import packaged_matrices
    from certbench.models import ARCHITECTURES
    from certbench.training.recipes import RECIPES
    from certbench.verifiers import verifier_names
    from certbench.verifiers.lirpa import lirpa_status

    print("datasets:      " + ", ".join(DATASETS))
    print("architectures: " + ", ".join(ARCHITECTURES))
    print("recipes:")
    for name, defaults in ((n, r.defaults) for n, r in RECIPES.items()):
        print(f"  {name:<10} {json.dumps(defaults)}")
    print("verifiers:")
    for name, summary in verifier_names().items():
        print(f"  {name:<18} {summary}")
    usable, detail = lirpa_status()
    print("auto_LiRPA:    " + (f"{detail} (lirpa:* verifiers usable)" if usable else
                               f"not usable, lirpa:* cells will fail: {detail}"))
    print("matrices:      " + ", ".join(packaged_matrices()))
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    import pandas as pd

    from certbench import zoo

    if args.build:
        from certbench.run.executors import resolve_device
        from certbench.zoo_build import build

        found = build(args.build, args.data_dir, str(resolve_device(args.device)),
                      progress=not args.quiet)
        measured = found["zoo"]["measured"]
        print(f"{args.build}: clean {measured['clean_acc']:.4f}, certified "
              f"{measured['certified_acc']:.4f} at {measured['norm']} eps {measured['eps']} "
              f"({measured['verifier']}, {measured['points']} points); card "
              f"{zoo.FOLDER / (args.build + '.json')}")
        return 0
    from certbench.zoo_build import status

    table = pd.DataFrame(zoo.listing())
    table.insert(1, "status", [status(row.network, row.epochs) for row in table.itertuples()])
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.drop(columns=["source"]).astype(object).fillna("-").to_string(index=False))
    print("paper and certbench: the paper's metric at its norm and eps (fractions); "
          "'-': not built yet (`certbench zoo --build NAME` builds one, going on from a "
          "resume point), or no paper figure")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from certbench.report.summary import format_summary, format_vnncomp
    from certbench.store import INSTANCES, ResultsStore

    folder = Path(args.results_dir)
    if ResultsStore(folder).path(INSTANCES).exists():
        print(format_vnncomp(folder))
        if not (folder / "cells.parquet").exists():
            return 0
    print(format_summary(folder))
    return 0


def _verifier_arg(text: str) -> tuple[str, dict]:
    """``name`` or ``name:{json options}``."""
    name, _, options = text.partition(":")
    if name == "lirpa":  # lirpa:crown is a name, not name:options
        head, _, options = options.partition(":")
        name = f"lirpa:{head}"
    return name, (_json_dict(options) if options else {})


def cmd_vnncomp(args: argparse.Namespace) -> int:
    from certbench.report.official import read_official, score_table, wrong_lines
    from certbench.report.summary import conflicts, format_vnncomp
    from certbench.store import INSTANCES, ResultsStore
    from certbench.vnncomp.pipeline import run_vnncomp

    csv_path = Path(args.instances_csv)
    results = Path(args.results or Path("results") / f"vnncomp-{csv_path.parent.name}")
    if args.timeout_scale <= 0:
        raise UserError("--timeout-scale must be positive")
    if args.overhead_s < 0:
        raise UserError("--overhead-s must be at least 0")
    for name, _ in args.verifiers:
        if "," in name:
            raise UserError(f"--verifiers {name}: separate names with spaces "
                            f"(--verifiers {' '.join(name.split(','))})")
    official = read_official(args.official) if args.official is not None else None
    executor = _executor(args)
    run_vnncomp(csv_path, results, args.verifiers, timeout_scale=args.timeout_scale,
                attack={"enabled": not args.no_attack}, force=args.force,
                progress=not args.quiet, limit=args.limit, executor=executor,
                overhead_s=args.overhead_s, imports=tuple(args.imports),
                device=str(executor.resolve_device(args.device)))
    print(format_vnncomp(results))
    table = ResultsStore(results).read(INSTANCES)
    wrong = []
    if official is not None:
        print(score_table(official, table).to_string(index=False, na_rep="-"))
        wrong = wrong_lines(official, table)
        print("\n".join(wrong))
    return 1 if len(conflicts(table)) or wrong else 0


def cmd_paradox(args: argparse.Namespace) -> int:
    from certbench.run.paradox import write_study

    for path in write_study(args.results_dir, args.matrix, _checkpoint_dir(args), args.model):
        print(f"wrote {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from certbench.report.build import build_report

    results = Path(args.results_dir)
    out = Path(args.out or Path("reports") / results.name)
    page = build_report(results, out, args.official)
    print(f"wrote {page} and {out / 'report.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from certbench.report.compare import compare, format_comparison

    result = compare(args.baseline, args.candidate, args.max_slowdown, args.max_acc_drop,
                     args.fail_on_missing, args.time_floor_s, args.rule, args.confidence,
                     args.clock)
    print(format_comparison(result))
    return 0 if result.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certbench",
        description="Comparative benchmark of certified-robustness verifiers.",
        epilog="example: certbench run   (the quick matrix on scikit-learn's digits)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text,
                              epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    data_dir = {"default": None, "help": "dataset folder (default: $CERTBENCH_DATA or ./data)"}
    train = add("train", "Train one model and save it as safetensors plus a JSON card.")
    train.add_argument("--dataset", default="digits")
    train.add_argument("--arch", default="mlp")
    train.add_argument("--arch-args", type=_json_dict, default={}, help="JSON object")
    train.add_argument("--recipe", default="standard")
    train.add_argument("--recipe-args", type=_json_dict, default={}, help="JSON object")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--out", required=True, help="checkpoint stem (writes STEM.safetensors "
                       "and STEM.json)")
    train.add_argument("--data-dir", **data_dir)
    train.add_argument("--download", action="store_true", help="download missing data files")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    run = add("run", "Run a benchmark matrix and print its summary table. Exits with code 1 "
              "if a certified sample was flipped by the attack (a soundness violation), 3 if "
              "some cells ran without the attack's cross-check (rerun to retry).")
    run.add_argument("--matrix", default="quick", help="TOML file or packaged matrix name "
                     "(default: quick)")
    run.add_argument("--results", default=None, help="results folder (default: results/NAME)")
    run.add_argument("--checkpoint-dir", default=None,
                     help="where trained models go (default: $CERTBENCH_CHECKPOINTS or "
                     "./checkpoints)")
    run.add_argument("--data-dir", **data_dir)
    run.add_argument("--device", default=None, help="override the matrix device")
    run.add_argument("--samples", type=int, default=None,
                     help="override the matrix's number of samples (a seeded subset of the "
                     "same points, e.g. for a first look at a long matrix)")
    run.add_argument("--seed", type=int, default=None,
                     help="set every seed of the matrix to SEED: the evaluation points, the "
                     "attacks, each recipe model (trained anew) and each verifier that takes "
                     "one and does not set it (smoothing's noise); for seed studies (default "
                     "results folder: results/NAME-seedSEED)")
    run.add_argument("--force", action="store_true", help="recompute finished cells")
    add_executor_options(run, "cells")
    run.add_argument("--timeout", type=float, default=None,
                     help="seconds of wall clock per cell (overrides the matrix's timeout_s; "
                     "a verifier's own timeout_s still wins); an overrun cell is recorded "
                     "as timeout")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    add("list", "List datasets, architectures, recipes, verifiers and matrices.").set_defaults(
        func=cmd_list
    )

    vnn = add("vnncomp", "Answer VNN-COMP instances (ONNX network, VNN-LIB property, timeout) "
              "with each verifier: unsat (proved), sat (counterexample accepted by the "
              "competition's judge: onnxruntime, tolerance 1e-4), unknown, timeout or error. "
              "Writes instances.parquet and the competition's result files; a rerun skips "
              "answered instances. Exits with code 1 when one verifier's sat meets another's "
              "unsat on an instance (a soundness conflict) or, with --official, an answer "
              "contradicts the participants' consensus.")
    vnn.add_argument("instances_csv", help="the benchmark's instances.csv (onnx,vnnlib,timeout)")
    vnn.add_argument("--verifiers", nargs="+", type=_verifier_arg,
                     default=[("crown", {}), ("alpha-crown", {}), ("exact", {})],
                     help="verifier names, each optionally name:'{\"option\": value}' "
                     "(default: crown alpha-crown exact)")
    vnn.add_argument("--results", default=None,
                     help="results folder (default: results/vnncomp-BENCHMARK)")
    vnn.add_argument("--timeout-scale", type=float, default=1.0,
                     help="multiply every instance's timeout (e.g. 2 on a slow machine)")
    vnn.add_argument("--limit", type=int, default=None, help="only the first N instances")
    vnn.add_argument("--no-attack", action="store_true",
                     help="skip the PGD falsification before verification")
    vnn.add_argument("--force", action="store_true", help="recompute answered instances")
    vnn.add_argument("--device", default="cpu",
                     help="cpu (default), cuda[:N] or auto: where networks and verifiers run")
    # 60: vnncomp.judge.KILL_ALLOWANCE_S, written out so that --help imports no torch
    vnn.add_argument("--overhead-s", type=float, default=60.0,
                     help="seconds an instance's worker may run beyond its (scaled) timeout "
                     "for loading, parsing and prepare before it is stopped and recorded as "
                     "timeout (default 60, the competition's allowance)")
    vnn.add_argument("--official", default=None, metavar="DIR",
                     help="the competition's results (<tool>.csv or <tool>/results.csv): "
                     "print the competition's score of each participant and of certbench on "
                     "the same instances; an answer against their consensus exits 1")
    vnn.add_argument("--import", dest="imports", action="append", default=[],
                     metavar="MODULE", help="a module that registers your own verifier "
                     "(repeatable), as a matrix's `imports`")
    add_executor_options(vnn, "instances")
    vnn.add_argument("--quiet", action="store_true", help="no progress bars")
    vnn.set_defaults(func=cmd_vnncomp)

    paradox = add("paradox", "Write the paradox study's data next to a run's results: each "
                  "model's training optimiser, relaxation and cost (training.parquet) and the "
                  "certified loss along a random direction in weight space, raw and "
                  "Gaussian-smoothed (landscape.parquet); `certbench report` draws them.")
    paradox.add_argument("results_dir", help="the run's results folder")
    paradox.add_argument("--matrix", required=True, help="the matrix the run used")
    paradox.add_argument("--checkpoint-dir", default=None,
                         help="where the run's models are (default: $CERTBENCH_CHECKPOINTS "
                         "or ./checkpoints)")
    paradox.add_argument("--model", default=None,
                         help="model for the landscape (default: the GRAD + CROWN model)")
    paradox.set_defaults(func=cmd_paradox)

    zoo = add("zoo", "List the zoo: networks trained to their papers' settings, each "
              "certbench's certified figure beside the paper's; use one in a matrix as "
              "checkpoint = \"zoo:NAME\". --build trains (resumably) and certifies one.")
    zoo.add_argument("--build", default=None, metavar="NAME",
                     help="train (resuming an interrupted run) and certify this network, "
                     "writing its weights and card into the zoo folder")
    zoo.add_argument("--device", default="auto", help="where --build trains (default auto)")
    zoo.add_argument("--data-dir", **data_dir)
    zoo.add_argument("--quiet", action="store_true", help="no progress bars")
    zoo.set_defaults(func=cmd_zoo)

    show = add("show", "Print the summary table of a results folder.")
    show.add_argument("results_dir")
    show.set_defaults(func=cmd_show)

    report = add("report", "Write an HTML report and its Markdown twin (tables, figures, "
                 "provenance) from a results folder.")
    report.add_argument("results_dir")
    report.add_argument("--out", default=None, help="report folder (default: reports/NAME, "
                        "NAME the results folder's name)")
    report.add_argument("--official", default=None, metavar="DIR",
                        help="the competition's results (<tool>.csv or <tool>/results.csv, "
                        "as in vnncomp2022_results): scores and cactus curves beside "
                        "certbench's VNN-COMP answers")
    report.set_defaults(func=cmd_report)

    comp = add("compare", "Compare two results folders cell by cell; exit 1 when a "
               "threshold is crossed (for CI gates).")
    comp.add_argument("baseline")
    comp.add_argument("candidate")
    comp.add_argument("--max-slowdown", type=float, default=None,
                      help="fail a cell whose candidate / baseline time ratio is, by the "
                      "rule, above this (e.g. 1.3)")
    comp.add_argument("--rule", choices=("interval", "ratio"), default="interval",
                      help="interval (default): fail only when the whole bootstrap interval "
                      "of the ratio (over timing rounds where the matrix has them, else "
                      "over passes) lies above --max-slowdown; ratio: the point ratio alone")
    comp.add_argument("--confidence", type=float, default=0.95,
                      help="confidence of the ratio's interval (default 0.95)")
    comp.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                      help="judge wall-clock (default) or CPU time")
    comp.add_argument("--max-acc-drop", type=float, default=None,
                      help="fail if certified accuracy at any epsilon drops by more than this")
    comp.add_argument("--time-floor-s", type=float, default=0.0,
                      help="cells whose median pass took less than this (seconds, both "
                      "sides) are not judged on time (default 0: every cell is judged)")
    comp.add_argument("--fail-on-missing", action="store_true",
                      help="fail if a baseline cell is missing from the candidate")
    comp.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"certbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("certbench: interrupted; rerun the same command to finish the missing cells",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
