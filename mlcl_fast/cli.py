"""`mlcl-fast`: train, study, bench, run.

  mlcl-fast run                                  the main job: several methods on the bundled dataset
  mlcl-fast train --dataset emotions --loss reg --protocol probe
  mlcl-fast study --datasets emotions yeast --seeds 0 1 2 --out runs/study
  mlcl-fast bench [args of python -m bench.sweep]
  mlcl-fast data synth --preset eurlex4k --scale 0.1 --out data/eurlex4k-synth
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from .presets import PRESETS

BASELINES = ("bce", "zlpr", "asl")  # = train.protocols.BASELINES, which is not imported here (it loads scipy)

# The main job: a synthetic EURLex-4K-like set (mlcl_fast.data_synth, generated in seconds, no
# download) at a tenth of its rows, four methods, then the loss alone at a large label space.
RUN_DATASET = "synth:eurlex4k?scale=0.1"
RUN_METHODS = ("bce", "zlpr", "reg/probe", "reg/joint")
RUN_LOSS_LABELS = (1_000, 100_000)  # the reference fits at the first, not at the second (~550 GB predicted)


def _common(p: argparse.ArgumentParser, epochs: int = 30) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="most epochs per stage (early stopping on validation)")
    g.add_argument("--probe-epochs", type=int, default=40, help="most epochs of the linear probe")
    g.add_argument("--patience", type=int, default=5, help="epochs without validation gain before stopping")
    g.add_argument("--min-steps", type=int, default=300,
                   help="small sets get more epochs so that each stage takes at least this many steps")
    g.add_argument("--warmup-steps", type=int, default=100,
                   help="classifier stages: epochs before this many steps are not selected by early stopping")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--finetune-lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--hidden", type=int, default=256, help="width of the MLP backbone")
    g.add_argument("--layers", type=int, default=2, help="hidden layers of the MLP backbone")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--proj-dim", type=int, default=128, help="output size of the projection head")
    g.add_argument("--temperature", type=float, default=0.1)
    g.add_argument("--joint-lambda", type=float, default=0.1, help="weight of the contrastive term (protocol joint)")
    g.add_argument("--views", type=int, default=1,
                   help="contrastive views per sample; >1 adds feature-dropout/noise augmentation")
    g.add_argument("--queue", type=int, default=0,
                   help="MoCo-style pre-training: a queue of this many keys from a momentum encoder (0: in-batch)")
    g.add_argument("--momentum", type=float, default=0.999, help="the key encoder's momentum (with --queue)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", default="auto", help="loss backend: auto, reference, cpp, triton, cuda")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default=None, help="folder of NAME.npz files (default: $MLCL_FAST_DATA, then ../shared/data)")
    d.add_argument("--val-fraction", type=float, default=0.15, help="share of train held out for validation")
    d.add_argument("--max-train", type=int, default=None, help="subsample the training rows to at most this many")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _val_split(p: argparse.ArgumentParser) -> None:
    # train and run only: the study keeps random splits (train/study.py says why)
    p.add_argument("--val-split", default="auto", choices=("auto", "stratified", "random"),
                   help="validation split: iterative stratification above 50 labels (auto), always, or never")


TRAIN_KEYS = ("epochs", "probe_epochs", "patience", "min_steps", "warmup_steps", "batch_size", "lr", "finetune_lr", "weight_decay",
              "hidden", "layers", "dropout", "proj_dim", "temperature", "joint_lambda", "views", "queue", "momentum",
              "seed", "backend",
              "device")


def _options(args) -> dict:
    return {k: getattr(args, k) for k in TRAIN_KEYS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlcl-fast", description="Multi-label contrastive training and study")
    sub = parser.add_subparsers(dest="command", required=True)
    losses = sorted(PRESETS) + list(BASELINES)

    t = sub.add_parser("train", help="train one method on one dataset, print and save its metrics")
    t.add_argument("--dataset", default="emotions",
                   help="NAME (bundled or in --data-dir) or PATH (.npz, .arff, svmlight/XMC); at most 10 million "
                        "features and labels each, unless $MLCL_FAST_MAX_DIM allows more")
    t.add_argument("--test-file", default=None, help="test split for .arff / svmlight files")
    t.add_argument("--labels", default=None, help="ARFF: label count (the last N attributes) or a MULAN .xml label file")
    t.add_argument("--test-size", type=float, default=0.25, help="test share drawn when a file has no test split")
    t.add_argument("--loss", default="reg", choices=losses)
    t.add_argument("--protocol", default=None, choices=("probe", "finetune", "joint", "end2end"),
                   help="contrastive presets: linear probe (default), BCE fine-tuning, or BCE + λ·contrastive; "
                        "bce/zlpr/asl: end2end (default) or probe (a linear probe refitted on the trained backbone); "
                        "asl is the asymmetric loss with the paper's gamma_pos=0, gamma_neg=4, clip=0.05")
    t.add_argument("--out", default=None, help="output folder (default runs/<dataset>-<method>-s<seed>)")
    t.add_argument("--propensity-a", type=float, default=0.55,
                   help="constant A of Jain et al.'s propensity model behind PSP@k (Wikipedia 0.5, Amazon 0.6)")
    t.add_argument("--propensity-b", type=float, default=1.5, help="constant B (Wikipedia 0.4, Amazon 2.6)")
    _val_split(t)
    _common(t)

    r = sub.add_parser("run", help="the main job: bce, zlpr and REG on a many-label set, then the loss alone at large L")
    r.add_argument("--dataset", default=RUN_DATASET, help=f"default {RUN_DATASET} (synthetic, generated here)")
    r.add_argument("--methods", nargs="+", default=list(RUN_METHODS))
    r.add_argument("--loss-labels", nargs="*", type=int, default=list(RUN_LOSS_LABELS),
                   help="label-space sizes of the loss-alone table (none: skip it)")
    r.add_argument("--loss-budget-gb", type=float, default=None,
                   help="the reference runs in that table only where its predicted need is below this "
                        "(default: half the memory available)")
    r.add_argument("--out", default="runs/default")
    _val_split(r)
    _common(r)

    s = sub.add_parser("study", help="grid of datasets × methods × seeds (resumable), tables and plots")
    s.add_argument("--datasets", nargs="+", default=None, help="default: the eight study datasets")
    s.add_argument("--methods", nargs="+", default=None,
                   help="bce, zlpr, asl or PRESET/PROTOCOL (default: the study grid; see docs/STUDY.md)")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    s.add_argument("--out", default="runs/study")
    s.add_argument("--summary-only", action="store_true", help="only rebuild tables and plots from finished cells")
    s.add_argument("--tune", action="store_true",
                   help="choose each method's learning rate / temperature / λ per dataset on validation first "
                        "(mlcl_fast/train/tuning.py); use a separate --out from untuned studies")
    _common(s, epochs=40)

    _data_parser(sub)

    b = sub.add_parser("bench", help="forward the remaining arguments to python -m bench.sweep", add_help=False)
    b.add_argument("argv", nargs=argparse.REMAINDER)
    return parser


def _data_parser(sub) -> None:
    from .data_synth import NOISE, PRESETS, TOPIC_TERMS, VALUES

    dp = sub.add_parser("data", help="data utilities: synthetic XMC-like data sets")
    dsub = dp.add_subparsers(dest="data_command", required=True)
    dsub.add_parser("presets", help="the published statistics each synthetic preset matches")
    sy = dsub.add_parser("synth", help="write a synthetic train/test pair shaped like a published XMC data set",
                         description="Writes OUT/train.txt and OUT/test.txt in the XMC text format and "
                                     "OUT/stats.json (targets and realised statistics). The data are synthetic: "
                                     "sizes and label statistics follow the preset, features and labels mean "
                                     "nothing (docs/TRAINING.md, 'Synthetic XMC-like data').")
    sy.add_argument("--preset", required=True, help=f"one of {', '.join(PRESETS)}")
    sy.add_argument("--out", required=True, help="output folder")
    sy.add_argument("--scale", type=float, default=None,
                    help="rows as a share of the published train and test rows (default 1: full size)")
    sy.add_argument("--train", type=int, default=None, help="training rows (overrides --scale for train)")
    sy.add_argument("--test", type=int, default=None, help="test rows (overrides --scale for test)")
    sy.add_argument("--labels", type=int, default=None, help="number of labels (default: the preset's)")
    sy.add_argument("--features", type=int, default=None, help="number of features (default: the preset's)")
    sy.add_argument("--labels-per-point", type=float, default=None, help="mean labels per row (default: the preset's)")
    sy.add_argument("--features-per-point", type=float, default=None,
                    help="mean stored features per row (default: the preset's assumed value)")
    sy.add_argument("--alpha", type=float, default=None,
                    help="exponent of the power-law label frequencies (default: the preset's assumed value)")
    sy.add_argument("--topic-terms", type=int, default=TOPIC_TERMS, help="words in each label's topic")
    sy.add_argument("--noise", type=float, default=NOISE,
                    help="share of background words, unrelated to the labels (higher: harder to learn)")
    sy.add_argument("--values", default="tfidf", choices=VALUES,
                    help="feature values: unit-length tf-idf rows (default) or raw term counts")
    sy.add_argument("--seed", type=int, default=0)


SYNTH_OPTIONS = ("scale", "train", "test", "labels", "features", "labels_per_point", "features_per_point", "alpha",
                 "topic_terms", "noise", "values", "seed")


def cmd_data(args) -> int:
    from .data_synth import describe_presets, make_config, write_synth

    if args.data_command == "presets":
        print(describe_presets())
        return 0
    cfg = make_config(args.preset, **{k: getattr(args, k) for k in SYNTH_OPTIONS},
                      name=lambda arg: "--" + arg.replace("_", "-"))
    start = time.perf_counter()
    st = write_synth(args.out, cfg)
    print(f"synthetic {st['stands_in_for']}-like data (preset {cfg.preset}, seed {cfg.seed}, "
          f"scale {st['config']['scale']:g}); {time.perf_counter() - start:.1f}s")
    for part in ("train", "test"):
        p = st[part]
        fit = p["power_law_exponent_fit"]
        print(f"  {part}: {p['rows']} rows, {p['features']} features ({p['features_per_point']:g} per row), "
              f"{p['labels']} labels ({p['labels_used']} used), {p['labels_per_point']:g} labels per row, "
              f"{p['points_per_label_used']:g} rows per used label, top label in {p['top_label_share']:.1%} of rows, "
              f"power-law exponent {'n/a' if fit is None else f'{fit:g}'} (nominal {cfg.alpha:g})")
    print(f"wrote {st['files']['train']}, {st['files']['test']}, {Path(args.out) / 'stats.json'}")
    return 0


def _setup(args) -> None:
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    # the auto backend warns once when it falls back to the reference implementation; show it once
    warnings.filterwarnings("once", category=RuntimeWarning, module="mlcl_fast")


def cmd_train(args) -> int:
    from .train.api import train
    from .train.protocols import TrainConfig
    from .train.report import metrics_table, training_log

    method = TrainConfig(loss=args.loss, protocol=args.protocol).method
    out = args.out or f"runs/{Path(args.dataset).stem}-{method.replace('/', '-')}-s{args.seed}"
    result = train(args.dataset, out=out, data_dir=args.data_dir, test_file=args.test_file, labels=args.labels,
                   test_size=args.test_size, val_fraction=args.val_fraction, max_train=args.max_train,
                   val_split=args.val_split, propensity_a=args.propensity_a, propensity_b=args.propensity_b,
                   quiet=args.quiet, loss=args.loss, protocol=args.protocol, **_options(args))
    rec = result.to_json()
    t = rec["test"]
    print(training_log(rec))
    print(metrics_table([rec]))
    print(f"Micro-F1 {t['micro_f1']:.4f}  Macro-F1 {t['macro_f1']:.4f}  Hamming {t['hamming']:.4f}  "
          f"mAP {t['map']:.4f}  (per-label thresholds: Macro-F1 {t['macro_f1_tuned']:.4f})")
    print(f"wrote {out}/metrics.json, model.pt, curves.png")
    return 0


def cmd_run(args) -> int:
    from .train.api import config_from, progress_bar, save, seed_everything
    from .train.data import load_dataset, prepare_split
    from .train.files import ensure_output_folder, write_json
    from .train.protocols import run
    from .train.metrics import METRIC_LABELS
    from .train.report import metrics_table, table_metrics
    from .train.study import parse_method

    start = time.perf_counter()
    ensure_output_folder(args.out)
    ds = load_dataset(args.dataset, args.data_dir)
    print(ds.describe())
    print(f"test metrics; thresholds 0.5 unless noted; validation = {args.val_fraction:.0%} of train; seed {args.seed}")
    # every method trains on the same split (the seed is the run's)
    split = prepare_split(ds, args.val_fraction, args.seed, args.max_train, val_split=args.val_split)
    records = []
    for method in args.methods:
        loss, protocol = parse_method(method)
        cfg = config_from(loss=loss, protocol=protocol, **_options(args))
        seed_everything(cfg.seed)
        bar = progress_bar(args.quiet, method)
        try:
            result = run(split, cfg, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        records.append(save(result, Path(args.out) / method.replace("/", "__"), ds, extra={"val_split": split.val_split}))
    metrics, headline = table_metrics(ds.num_labels)
    print(metrics_table(records, metrics))
    best = max(records, key=lambda r: r["test"][headline])
    print(f"best {METRIC_LABELS[headline]}: {best['method']} {best['test'][headline]:.4f}; results in {args.out}/ "
          f"({time.perf_counter() - start:.0f}s)")
    write_json(Path(args.out) / "summary.json", records)
    if args.loss_labels:
        from .train import loss_scale

        t0 = time.perf_counter()
        print()
        print(loss_scale.describe() + f"; device {args.device}")
        budget = None if args.loss_budget_gb is None else int(args.loss_budget_gb * 2**30)
        steps = loss_scale.loss_steps(args.loss_labels, device=args.device, backend=args.backend, seed=args.seed,
                                      budget_bytes=budget)
        print(loss_scale.loss_steps_table(steps))
        print(f"({time.perf_counter() - t0:.0f}s; the reference's need is predicted by mlcl_fast.memory.reference_bytes, "
              "an upper estimate: compare the measured row)")
        write_json(Path(args.out) / "loss_scale.json", [asdict(r) for r in steps])
    return 0


def cmd_study(args) -> int:
    from .train.study import STUDY_DATASETS, STUDY_METHODS, run_study, summarise

    datasets = args.datasets or list(STUDY_DATASETS)
    methods = args.methods or list(STUDY_METHODS)
    if args.summary_only:
        summary = summarise(args.out, datasets, methods, args.seeds)
    else:
        options = _options(args)
        options.pop("seed")  # the grid sets it
        max_train = {d: args.max_train for d in datasets} if args.max_train is not None else None
        summary = run_study(args.out, datasets, methods, args.seeds, data_dir=args.data_dir, max_train=max_train,
                            val_fraction=args.val_fraction, quiet=args.quiet, tune=args.tune, **options)
    print((Path(args.out) / "summary.md").read_text() if summary else "no finished cells")
    print(f"tables and plots in {args.out}/")
    return 0


def cmd_bench(argv: Sequence[str], root: Optional[Path] = None) -> int:
    root = Path(__file__).resolve().parent.parent if root is None else Path(root)
    if not (root / "bench" / "sweep.py").exists():
        print("mlcl-fast bench: the benchmark sweep (bench/sweep.py) ships with the source repository, not with "
              f"the installed package; run it from a checkout (looked in {root / 'bench'})", file=sys.stderr)
        return 2
    # run from the caller's folder (relative paths in argv keep their meaning), importing bench/ from root
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return subprocess.call([sys.executable, "-m", "bench.sweep", *argv], env=env)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    _setup(args)
    try:
        return {"train": cmd_train, "run": cmd_run, "study": cmd_study, "data": cmd_data}[args.command](args)
    except (ValueError, OSError) as err:
        print(f"mlcl-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
