"""One function per DVC stage: the single adapter from the validated config to library calls.

Each ``run_*`` function takes the ``Config`` and explicit paths (which come from dvc.yaml), calls
library functions with plain keyword arguments, writes the stage's outputs atomically and logs the
stage execution as one MLflow run. Stage scripts in ``stages/`` only parse paths and call these.
Heavy modules (torch, mlflow, matplotlib) are imported inside the functions that need them, so a
stage starts without loading what it does not use.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from petpipe.config import Config, ConfigError, load_config, stage_params
from petpipe.errors import PetpipeError
from petpipe.files import atomic_open, write_bytes, write_json, write_text


def write_rows(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """CSV with a header (``columns``, else the first row's keys); DVC plots read it directly."""
    with atomic_open(path) as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------------------- stages


def run_fetch(cfg: Config, *, dataset: Path, downloads: Path) -> dict[str, Any]:
    from petpipe.fetch import fetch
    from petpipe.tracking import repo_root, stage_run

    with stage_run("fetch", stage_params(cfg, "fetch")) as run:
        result = fetch(cfg.data.url, cfg.data.sha256, dest=dataset, root=Path.cwd(), downloads=downloads)
        if cfg.data.sha256 is None:
            print(f"warning: data.sha256 is null, the archive was not verified; its SHA-256 is {result.sha256}", file=sys.stderr)
        info = {"sha256": result.sha256, "archive_bytes": result.archive_bytes, "files": result.files}
        run.set_tags({"data.sha256_actual": result.sha256, "repo_root": str(repo_root())})
        run.log_metrics({"archive_bytes": result.archive_bytes, "files": result.files})
    print(f"fetch: {result.files} files from {cfg.data.url} -> {dataset}")
    return info


def run_labels(cfg: Config, *, dataset: Path, out_dir: Path, metrics: Path) -> dict[str, int]:
    from petpipe.labels import make_table, write_table
    from petpipe.tracking import stage_run

    with stage_run("labels", stage_params(cfg, "labels")) as run:
        lab = cfg.labels
        table = make_table(
            dataset, rule=lab.rule, images_dir=lab.images_dir, pattern=lab.pattern, match_on=lab.regex_on,
            csv_name=lab.csv, valid_pct=lab.valid_pct, seed=cfg.seed,
        )  # fmt: skip
        files = write_table(table, out_dir)
        counts = table.counts()
        write_json(metrics, counts)
        run.log_metrics(counts)
        for path in files.values():
            run.log_artifact(path, "labels")
    print(f"labels: {counts}")
    return counts


def _prepare(cfg: Config):
    """Device and precision (a bad choice fails here, before any work), then every seed.

    Seeding comes before any model is built, so ``seed`` fixes the head's (and, with
    ``train.weights: none``, the body's) initial weights as well as the data order.
    """
    from petpipe.device import make_runtime, seed_everything

    runtime = make_runtime(cfg.device, cfg.precision)
    return runtime, seed_everything(cfg.seed)


def _loaders(cfg: Config, dataset: Path, table, runtime, generator):
    from petpipe.data import make_loaders

    t = cfg.train
    return make_loaders(
        dataset, table, size=t.size, batch_size=t.batch_size, num_workers=t.num_workers, min_scale=t.min_scale,
        flip=t.flip, generator=generator, pin_memory=runtime.pin_memory,
    )  # fmt: skip


def _restore(checkpoint: Path):
    """Model rebuilt from a petpipe checkpoint (architecture from its metadata, weights from it)."""
    from petpipe.engine import load_checkpoint
    from petpipe.model import build_model

    state = load_checkpoint(checkpoint)
    meta = state["meta"]
    model = build_model(meta["arch"], len(meta["classes"]), weights="none")
    model.load_state_dict(state["model"])
    return model, meta


def _fit_stage(
    cfg: Config, stage: str, *, runtime, generator, model, meta: dict, dataset: Path, table, epochs: int, lr_max: list[float],
    pct_start: float, checkpoint: Path, metrics: Path, plot: Path, extra_metrics: dict[str, float] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Shared body of train_frozen and finetune: one-cycle fit, checkpoint, metrics, curves, MLflow."""
    from petpipe.engine import fit_one_cycle, save_checkpoint
    from petpipe.model import count_trainable
    from petpipe.tracking import stage_run

    train_loader, valid_loader = _loaders(cfg, dataset, table, runtime, generator)
    print(f"{stage}: {runtime.describe()}; {len(train_loader.dataset)} train / {len(valid_loader.dataset)} valid images; "
          f"{count_trainable(model):,} trainable parameters; lr_max per layer group {['%.2e' % lr for lr in lr_max]}")  # fmt: skip
    with stage_run(stage, stage_params(cfg, stage)) as run:
        run.set_tags({"device": runtime.describe(), "precision": runtime.precision})
        run.log_params({f"{stage}.lr_max_groups": [float(f"{lr:.4g}") for lr in lr_max]})
        history = fit_one_cycle(
            model, train_loader, valid_loader, epochs=epochs, lr_max=lr_max, pct_start=pct_start,
            weight_decay=cfg.train.weight_decay, runtime=runtime,
            on_epoch_end=lambda row: run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])),
        )  # fmt: skip
        save_checkpoint(checkpoint, model, meta={**meta, "stage": stage, "epochs": epochs})
        final = {k: v for k, v in history[-1].items() if k != "epoch"} | (extra_metrics or {})
        write_json(metrics, final)
        write_rows(plot, history)
        run.log_artifact(plot, "curves")
        run.log_artifact(checkpoint, "model")
    return final


def run_train_frozen(cfg: Config, *, dataset: Path, table_csv: Path, classes_json: Path, checkpoint: Path, metrics: Path, plot: Path) -> dict:
    from petpipe.labels import read_table
    from petpipe.model import build_model, freeze_body, layer_groups

    runtime, generator = _prepare(cfg)
    table = read_table(table_csv, classes_json)
    model = build_model(cfg.train.arch, len(table.classes), cfg.train.weights)
    freeze_body(model)
    meta = {"arch": cfg.train.arch, "classes": table.classes, "size": cfg.train.size}
    lr_max = [cfg.train_frozen.lr] * len(layer_groups(model))
    return _fit_stage(
        cfg, "train_frozen", runtime=runtime, generator=generator, model=model, meta=meta, dataset=dataset, table=table, epochs=cfg.train_frozen.epochs,
        lr_max=lr_max, pct_start=cfg.train_frozen.pct_start, checkpoint=checkpoint, metrics=metrics, plot=plot,
    )  # fmt: skip


def run_lr_find(cfg: Config, *, dataset: Path, table_csv: Path, classes_json: Path, checkpoint: Path, result: Path, plot: Path, figure: Path) -> dict:
    from petpipe.labels import read_table
    from petpipe.lr_find import auto_max_lr, lr_range_test, suggest
    from petpipe.model import unfreeze
    from petpipe.report import lr_find_figure
    from petpipe.tracking import stage_run

    runtime, generator = _prepare(cfg)
    table = read_table(table_csv, classes_json)
    model, _ = _restore(checkpoint)
    unfreeze(model)
    train_loader, _ = _loaders(cfg, dataset, table, runtime, generator)
    with stage_run("lr_find", stage_params(cfg, "lr_find")) as run:
        run.set_tags({"device": runtime.describe(), "precision": runtime.precision})
        lf = cfg.lr_find
        curve = lr_range_test(model, train_loader, runtime, start_lr=lf.start_lr, end_lr=lf.end_lr, num_it=lf.num_it, weight_decay=cfg.train.weight_decay)
        suggestions = suggest(curve, lf.num_it)
        lo, hi = auto_max_lr(suggestions)
        summary = {**suggestions, "auto_max_lr_lo": lo, "auto_max_lr_hi": hi, "iterations": len(curve["lr"])}
        write_json(result, summary)
        write_rows(plot, [{"lr": lr, "loss": loss} for lr, loss in zip(curve["lr"], curve["loss"])])
        write_bytes(figure, lr_find_figure(curve["lr"], curve["loss"], suggestions))
        for i, (lr, loss) in enumerate(zip(curve["lr"], curve["loss"])):
            run.log_metrics({"lr_find_loss": loss, "lr_find_lr": lr}, step=i)
        run.log_metrics(summary)
        run.log_artifact(figure, "lr_find")
    print(f"lr_find: {len(curve['lr'])} iterations; suggestions {suggestions}")
    return summary


def resolve_max_lr(max_lr: tuple[float, float] | str, lr_find_result: Path) -> tuple[float, float]:
    """``finetune.max_lr`` as (lo, hi): given explicitly, or ``auto`` from lr_find's valley suggestion."""
    if max_lr != "auto":
        return max_lr  # type: ignore[return-value]
    from petpipe.lr_find import auto_max_lr

    try:
        return auto_max_lr(json.loads(lr_find_result.read_text()))
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"finetune.max_lr: 'auto' needs lr_find's result {lr_find_result}, which cannot be read ({err}); run lr_find first") from None


def run_finetune(
    cfg: Config, *, dataset: Path, table_csv: Path, classes_json: Path, checkpoint: Path, lr_find_result: Path, final: Path, metrics: Path, plot: Path
) -> dict:  # fmt: skip
    from petpipe.labels import read_table
    from petpipe.model import layer_groups, unfreeze
    from petpipe.schedule import discriminative_lrs

    runtime, generator = _prepare(cfg)
    table = read_table(table_csv, classes_json)
    lo, hi = resolve_max_lr(cfg.finetune.max_lr, lr_find_result)
    model, meta = _restore(checkpoint)
    unfreeze(model)
    lr_max = discriminative_lrs(lo, hi, len(layer_groups(model)))
    return _fit_stage(
        cfg, "finetune", runtime=runtime, generator=generator, model=model, meta=meta, dataset=dataset, table=table, epochs=cfg.finetune.epochs, lr_max=lr_max,
        pct_start=cfg.finetune.pct_start, checkpoint=final, metrics=metrics, plot=plot,
        extra_metrics={"max_lr_lo": lo, "max_lr_hi": hi},
    )  # fmt: skip


def run_report(
    cfg: Config, *, dataset: Path, table_csv: Path, classes_json: Path, final: Path, curves: list[Path], lr_find_figure_path: Path,
    out_dir: Path, html_path: Path, metrics: Path,
) -> dict:  # fmt: skip
    from petpipe import interpret as it
    from petpipe import report as rp
    from petpipe.data import ImageTable, make_loader, valid_transform
    from petpipe.engine import classification_metrics, predict
    from petpipe.labels import read_table
    from petpipe.tracking import stage_run

    runtime, _ = _prepare(cfg)
    table = read_table(table_csv, classes_json)
    model, meta = _restore(final)
    valid = ImageTable(dataset, table, "valid", valid_transform(meta["size"]))
    loader = make_loader(valid, batch_size=cfg.train.batch_size, train=False, num_workers=cfg.train.num_workers, pin_memory=runtime.pin_memory)
    with stage_run("report", stage_params(cfg, "report")) as run:
        run.set_tags({"device": runtime.describe(), "precision": runtime.precision})
        logits, targets = predict(model.to(runtime.device), loader, runtime)
        interp = it.Interpretation.from_logits(logits, targets)
        classes = table.classes
        cm = it.confusion_matrix(interp.targets, interp.preds, len(classes))
        confused = it.most_confused(cm, classes, cfg.report.most_confused_min)
        per_class = it.per_class_metrics(cm, classes)
        worst = it.top_losses(interp.losses, cfg.report.top_losses)
        summary = classification_metrics(logits, targets)

        figures = {
            "confusion": rp.confusion_figure(cm, classes),
            "top_losses": rp.top_losses_figure(
                [rp.thumbnail(valid.samples[i][0]) for i in worst],
                [f"{classes[interp.preds[i]]}/{classes[interp.targets[i]]}/{interp.losses[i]:.2f}/{interp.probs[i, interp.preds[i]]:.2f}" for i in worst],
            ),
            "curves": rp.curves_figure({p.stem: read_rows(p) for p in curves}),
        }
        for name, png in figures.items():
            write_bytes(out_dir / f"{name}.png", png)
        write_rows(out_dir / "per_class.csv", per_class)
        confused_rows = [{"actual": a, "predicted": p, "count": n} for a, p, n in confused]
        write_rows(out_dir / "most_confused.csv", confused_rows, columns=["actual", "predicted", "count"])
        write_rows(out_dir / "confusion.csv", [{"actual": classes[i], **dict(zip(classes, map(int, row)))} for i, row in enumerate(cm)])

        page = rp.render_html(
            f"petpipe report: {meta['arch']} on {len(classes)} classes",
            {"accuracy": f"{summary['accuracy']:.4f}", "error rate": f"{summary['error_rate']:.4f}",
             "valid loss": f"{summary['valid_loss']:.4f}", "validation images": str(len(valid))},
            [
                ("Training curves", rp.img_tag(figures["curves"], "training curves")),
                ("Learning-rate finder", rp.img_tag(lr_find_figure_path.read_bytes(), "lr_find")),
                ("Confusion matrix", rp.img_tag(figures["confusion"], "confusion matrix")),
                ("Most confused (actual, predicted, count)",
                 rp.table_html(confused_rows[:30], ["actual", "predicted", "count"])
                 if confused else "<p>No confusions at or above report.most_confused_min.</p>"),
                (f"Top {len(worst)} losses", rp.img_tag(figures["top_losses"], "top losses")),
                ("Per-class metrics", rp.table_html(per_class, ["class", "precision", "recall", "f1", "support"])),
            ],
        )  # fmt: skip
        write_text(html_path, page)
        write_json(metrics, summary)
        run.log_metrics(summary)
        run.log_artifact(html_path)
        for path in sorted(out_dir.iterdir()):
            run.log_artifact(path, "interpretation")
    print(f"report: {html_path} (accuracy {summary['accuracy']:.4f})")
    return summary


# ------------------------------------------------------------------------------- entry points


# The path arguments every stage after `labels` takes: the dataset and its labels table.
LABELLED_DATA = [("dataset", "extracted dataset folder"), ("table_csv", "labels table"), ("classes_json", "class list")]


def stage_main(
    run: Callable[..., Any], arguments: list[tuple[str, str]], description: str, multiple: tuple[str, ...] = (), argv: list[str] | None = None
) -> int:  # fmt: skip
    """Common ``main`` for the scripts in stages/: ``--params`` plus the named path arguments.

    Arguments named in ``multiple`` take one or more paths. Known user errors print one clear
    line and exit 2, without a traceback.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    for name, help_text in arguments:
        nargs = "+" if name in multiple else None
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, help=help_text, nargs=nargs)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params)
        run(cfg, **{name: getattr(args, name) for name, _ in arguments})
    except PetpipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
