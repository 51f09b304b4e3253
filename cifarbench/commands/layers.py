"""``cifarbench layers``: every conv layer of a model, in the names ``ablate``/``mine --filters`` accept."""
from __future__ import annotations

import typer

from ..options import (ArchKwOpt, ArchOpt, ClassesOpt, InputSizeOpt, JsonOpt, MeanOpt, ModelArg, StdOpt,
                       model_source)


def register(app: typer.Typer) -> None:
    @app.command("layers")
    def layers_cmd(model: ModelArg, json: JsonOpt = False, arch: ArchOpt = None, arch_kw: ArchKwOpt = None,
                   mean: MeanOpt = None, std: StdOpt = None, classes: ClassesOpt = None,
                   input_size: InputSizeOpt = None) -> None:
        """Conv layers: name (what --filters takes), filters (output channels), kernel, stride, output size and
        receptive field in input pixels (HxW where the axes differ; the union over paths where branches join;
        "unknown" after an op whose positions do not map to input pixels exactly).

        Examples: cifarbench layers net4; cifarbench layers resnet.pt --arch mymodels:resnet20 --json
        """
        from ..console import console, emit_json
        from ..filters import layer_table

        source = model_source(model, arch, arch_kw, mean, std, classes, input_size)
        table = layer_table(source)
        doc = {**table.to_json(), "source": source.kind}
        if json:
            from .publish import command_provenance

            doc["provenance"] = command_provenance(model=source)
            emit_json(doc)
            return
        from rich.table import Table

        out = Table(title=f"{table.model}: {len(table)} conv layers ({source.input_size}x{source.input_size} input)")
        for col in ("#", "layer", "filters", "kernel", "stride", "groups", "out", "RF"):
            out.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
        for i, layer in enumerate(table.layers.values(), 1):
            name = layer.name + (f" ({', '.join(layer.aliases)})" if layer.aliases else "")
            out.add_row(str(i), name, str(layer.filters), "x".join(map(str, layer.kernel)),
                        "x".join(map(str, layer.stride)) if layer.stride else "-",
                        "-" if layer.groups is None else str(layer.groups),
                        _hw(layer.out_size, layer.out_hw), _hw(layer.rf, layer.rf_hw, "unknown"))
        console.print(out)
        if table.note:
            console.print(table.note)


def _hw(square, hw, unknown: str = "-") -> str:
    """One number where both axes agree, ``HxW`` where they differ, ``unknown`` where it is not known."""
    if square is not None:
        return str(square)
    return "x".join(map(str, hw)) if hw is not None else unknown
