"""`tiaoyu export CKPT --format hf|gguf -o OUT`: a Hugging Face folder or a llama.cpp GGUF file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tiaoyu_cli.console import console
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.export.gguf import export_gguf
from tiaoyu_cli.export.hf import export_hf

EXAMPLES = """
Examples:

  tiaoyu export ckpt/sft --format hf -o export/sft-hf/           # transformers: from_pretrained("export/sft-hf")

  tiaoyu export ckpt/sft --format gguf -o sft.gguf                # f32, exact

  tiaoyu export ckpt/sft --format gguf --quantize q8_0 -o sft-q8_0.gguf   # 8.5 bits per weight

  llama-cli -m sft-q8_0.gguf -cnv                                 # llama.cpp reads the chat template from the file
"""


def register(app: typer.Typer) -> None:
    @app.command("export", epilog=EXAMPLES,
                 help="Export a checkpoint: --format hf (a folder transformers loads, with a model card) or "
                      "--format gguf (one file llama.cpp runs; --quantize f16|q8_0).")
    def export(
        ckpt: Annotated[Path, typer.Argument(help="checkpoint folder (step folder or run folder: its latest)")],
        out: Annotated[Path, typer.Option("-o", "--out", help="hf: output folder; gguf: output file")],
        format: Annotated[str, typer.Option("--format", "-f", help="hf | gguf")] = "hf",
        quantize: Annotated[str, typer.Option(help="gguf tensor type: none (f32) | f16 | q8_0")] = "none",
        name: Annotated[str, typer.Option(help="gguf: general.name (default: the file name)")] = "",
        force: Annotated[bool, typer.Option("--force", help="replace an existing output")] = False,
    ) -> None:

        fmt = format.lower()
        if fmt == "hf":
            if quantize not in ("none", ""):
                raise TiaoyuError("--quantize applies to --format gguf; the hf export keeps the weights as they are")

            with console.status(f"exporting {ckpt} → {out} (hf) …"):
                summary = export_hf(ckpt, out, force=force)
            console.print(f"wrote {summary['out']}/ ({summary['architecture']}, "
                          f"{summary['parameters'] / 1e6:.2f}M parameters): {', '.join(summary['files'])}")
        elif fmt == "gguf":
            kind = {"none": "f32", "": "f32"}.get(quantize.lower(), quantize.lower())
            with console.status(f"exporting {ckpt} → {out} (gguf {kind}) …"):
                summary = export_gguf(ckpt, out, kind, force=force, name=name or None)
            types = ", ".join(f"{n} {t}" for t, n in summary["tensor_types"].items())
            console.print(f"wrote {summary['out']} ({summary['bytes'] / 1e6:.2f} MB, {summary['tensors']} tensors: "
                          f"{types})")
        else:
            raise TiaoyuError(f"--format {format!r}: choose hf or gguf")
        sys.stdout.write(json.dumps(summary) + "\n")
