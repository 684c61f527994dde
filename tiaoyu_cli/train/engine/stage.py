"""What a stage gives the one loop (engine/trainer.py): `next_batch`, `step` → `StepOutput`, `evaluate`, and the
optional hooks `BaseStage` fills with defaults (setup, extra modules, state for exact resume, how the model
is saved and loaded back). A new objective is a new Stage, never a new loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn

from tiaoyu_cli import checkpoint as ckpt_io

if TYPE_CHECKING:  # the loop that drives a stage (a type only: trainer.py imports this module)
    from tiaoyu_cli.train.engine.trainer import Trainer


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to minimise (mean over the micro-batch)
    # logged values, averaged over micro-batches (and processes); floats or 0-d tensors — tensors
    # are read only at log steps, so returning them keeps the device from waiting every step
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    tokens: int = 0  # tokens processed in this micro-batch (for tokens/s and --max-tokens)


class Stage(Protocol):
    """What a stage supplies to the loop. Optional hooks have defaults in `BaseStage`."""

    name: str

    def setup(self, trainer: "Trainer") -> None: ...
    def next_batch(self) -> Any: ...
    def step(self, model: nn.Module, batch: Any) -> StepOutput: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FullModelSaver:
    """How a checkpoint's model files are written and read back for --resume: the whole model (the default).
    A stage that trains something else (LoRA adapters in an RL stage) is given another saver when it is built."""

    full_model = True  # --fsdp can gather and write a sharded model only when the whole model is saved

    def save_model(self, folder: Path, model: nn.Module, tokenizer) -> None:
        ckpt_io.save_model_files(folder, model, tokenizer)

    def load_for_resume(self, folder: Path, model: nn.Module) -> None:
        ckpt_io.load_weights(model, ckpt_io.load_model_tensors(folder, None), f"--resume: {folder}",
                             strict=False, hint=": resume with the model options the run started with")


class BaseStage:
    """Defaults for the optional parts of a stage."""

    name = "stage"
    steps_per_epoch: int | None = None  # for --epochs
    tokens_per_step: int | None = None  # per micro-batch per process, for --max-tokens schedules
    find_unused_parameters: bool = False  # DDP: some parameters get no gradient in a step (MoE sets it itself)
    shardable: bool = True  # --fsdp: every process runs the same forward passes (no per-process sampling)

    def setup(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable modules outside the model (e.g. a PPO value head): optimised, saved in train_state."""
        return {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Data position etc. Tensor values go to train_state.safetensors, the rest to trainer.json."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    saver = FullModelSaver()  # a stage built with another saver (an instance attribute) writes its own files

    def save_model(self, folder: Path, model: nn.Module, tokenizer) -> None:
        """Write the model files of a checkpoint (by `self.saver`: the full model unless the stage was built
        with another)."""
        self.saver.save_model(folder, model, tokenizer)

    def load_for_resume(self, folder: Path, model: nn.Module) -> None:
        """Load weights saved by `save_model` back into the model before resuming."""
        self.saver.load_for_resume(folder, model)

    def info(self) -> dict[str, Any]:
        """Stage options, recorded in trainer.json."""
        cfg = getattr(self, "cfg", None)
        return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
