"""``cifarbench eval``: overall and per-class test accuracy and the confusion matrix, through any runtime."""
from __future__ import annotations

import typer

from ..options import (ArchKwOpt, ArchOpt, BackendOpt, ClassesOpt, DataDirOpt, DataOpt, DeviceOpt, InputSizeOpt,
                       JsonOpt, MeanOpt, ModelArg, OutOpt, StdOpt)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def evaluate_cmd(model: ModelArg, data: DataOpt = "cifar10", data_dir: DataDirOpt = None,
                     backend: BackendOpt = "auto", device: DeviceOpt = None, out: OutOpt = None,
                     json: JsonOpt = False, arch: ArchOpt = None, arch_kw: ArchKwOpt = None, mean: MeanOpt = None,
                     std: StdOpt = None, classes: ClassesOpt = None, input_size: InputSizeOpt = None) -> None:
        """Test-set accuracy, per-class accuracy and confusion matrix (CSV and PNG under --out).

        Examples: cifarbench eval net4 --data cifar10-test.tar.gz --out eval;
        cifarbench eval my.onnx --classes a,b,c,d,e,f,g,h,i,j --backend onnx-int8 --json
        """
        from ..io import output_folder

        # --out is checked before the model is opened: no run ends in a refusal after the work is done
        with output_folder(out, FILES):
            from ..options import model_source

            source = model_source(model, arch, arch_kw, mean, std, classes, input_size)
            _evaluate(source, data, data_dir, backend, device, out, json)


FILES = ("confusion.csv", "per_class.csv", "eval.json", "confusion.png", "index.html")


def _evaluate(source, data, data_dir, backend, device, out, json) -> None:
    from ..analysis.ablation import predictions
    from ..analysis.metrics import confusion_matrix, summary
    from ..console import console, emit_json, progress
    from ..options import load_test_split
    from ..runtime import open_runtime

    test = load_test_split(source, data, data_dir)
    runtime = open_runtime(source, backend=backend, device=device)
    with progress() as bar:
        task = bar.add_task("eval", total=len(test), status=runtime.name)
        preds = predictions(runtime, test, progress=lambda n: bar.advance(task, n))
    conf = confusion_matrix(preds, test.labels, len(test.classes))
    from .publish import command_provenance

    result = {**summary(conf, test.classes), "confusion": conf.tolist(), "classes": list(test.classes),
              "images": len(test), "backend": runtime.name, "data": test.identity, "model": source.describe(),
              "provenance": command_provenance(model=runtime, data=test)}
    if out is not None:
        _write(out, result, test.classes)
    if json:
        emit_json(result)
        return
    from rich.table import Table

    from rich.markup import escape

    from ..provenance import data_label

    # words, not the identity string: a title wraps at spaces, and the identity has none
    table = Table(title=escape(f"{source.name} on {data_label(test.identity)}, {len(test):,} images ({runtime.name})"))
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for cls, acc in result["per_class"].items():
        table.add_row(cls, f"{acc:.2%}" if acc is not None else "-")
    table.add_row("[bold]overall", f"[bold]{result['accuracy']:.2%}")
    console.print(table)


def _write(out, result: dict, classes) -> None:
    import csv
    import io

    from ..analysis.figures import single_confusion_figure
    from ..io import write_json, write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["true \\ predicted", *classes])
    for cls, row in zip(classes, result["confusion"]):
        w.writerow([cls, *row])
    write_text(out / "confusion.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["class", "accuracy"])
    w.writerows([*result["per_class"].items(), ("overall", result["accuracy"])])
    write_text(out / "per_class.csv", buf.getvalue())
    write_json(out / "eval.json", result)
    from .publish import figure_caption, write_page

    prov = result["provenance"]
    name = (prov.get("model") or {}).get("name") or "model"
    title = f"{name} on {result['data']}: accuracy {result['accuracy']:.2%} ({result['backend']})"
    fig = single_confusion_figure(result["confusion"], classes, out / "confusion.png", title=title,
                                  caption=figure_caption(prov))
    rows = [[c, v] for c, v in result["per_class"].items()] + [["overall", result["accuracy"]]]
    write_page(out, f"eval: {name} on {result['data']}", prov, [
        {"title": "Accuracy", "text": f"{result['images']} test images; accuracies are fractions.",
         "table": {"columns": ["class", "accuracy"], "rows": rows}},
        {"title": "Confusion matrix", "figures": [{"path": fig, "caption": "rows: true class, columns: predicted"}],
         "table": {"columns": ["true \\ predicted", *classes],
                   "rows": [[c, *r] for c, r in zip(classes, result["confusion"])]}},
    ], result)
