"""``cifarbench models``: the zoo, with parameter counts and bundled-weights status."""
from __future__ import annotations

import typer

from ..options import JsonOpt


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(json: JsonOpt = False) -> None:
        """List the nets of the report with parameter counts, FLOPs and bundled weights, and which data and caches
        every command uses by default.

        Examples: cifarbench models; cifarbench models --json
        """
        from ..console import console, emit_json
        from ..data import data_settings
        from ..nets import count_flops, count_parameters
        from ..zoo import bundled_weights, create_model, get_spec, list_models

        rows = []
        for name in list_models():
            spec, model = get_spec(name), create_model(name)
            weights = bundled_weights(name)
            meta = None
            if weights:
                from ..checkpoint import read_metadata

                meta = read_metadata(weights)
            rows.append({
                "name": name, "params": count_parameters(model), "mflops": round(count_flops(model) / 1e6, 1),
                "hparams": model.hparams, "report_params": spec["report"]["params"],
                "report_test_accuracy": spec["report"]["test_accuracy"],
                "bundled_weights": str(weights) if weights else None,
                "bundled_test_accuracy": (meta or {}).get("metrics", {}).get("test_accuracy"),
                "description": spec["description"],
            })
        if json:
            from .publish import command_provenance

            emit_json({"models": rows, "settings": data_settings(), "provenance": command_provenance()})
            return
        from rich.table import Table

        table = Table(title="cifarbench model zoo")
        for col in ("net", "params", "MFLOPs", "hyper-parameters", "report acc", "bundled acc"):
            table.add_column(col)
        for r in rows:
            hp = ", ".join(f"{k}={v}" for k, v in r["hparams"].items() if v is not None)
            acc = f"{r['bundled_test_accuracy']:.2%}" if r["bundled_test_accuracy"] is not None else "no weights"
            table.add_row(r["name"], f"{r['params']:,}", f"{r['mflops']:,}", hp,
                          f"{r['report_test_accuracy']:.2%}", acc)
        console.print(table)
        s = data_settings()
        console.print(f"default --data: {s['data']} ({s['data_from']}; set CIFARBENCH_DATA=PATH to change it)")
        console.print(f"CIFAR-10 download folder: {s['data_dir']}; artifact cache: {s['cache_dir']}")
        console.print(f"INT8 calibration set of the zoo nets: {s['calibration']}")
