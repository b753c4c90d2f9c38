"""The library's callables under either package layout, for benchmark workers.

A worker run with --baseline REF imports an older revision's ``zipvoice``, whose modules may
sit elsewhere. Two layouts exist:

- "training": zipvoice/training/ (TrainingConfig, model_setup, optimizer, steps, checkpoints),
  zipvoice/inference/torch_backend.py and zipvoice/onnx/{export,runtime}.py;
- "utils": everything in zipvoice/utils/{trainer,infer,infer_onnx,onnx_export}.py, the run
  configured by the training command's argparse Namespace (e.g. 3c5b7d9).

The layout is told by which module the revision has (zipvoice.training.config: "training"),
and every callable comes from that revision's own module, so the timed code is what that
revision's trainer and inference run. Modules are imported only when a callable is asked
for, so that a torch row does not carry onnxruntime in its resident set.
"""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path
from typing import Any

# name -> module, per layout; the names are the same in both, only their homes moved.
MODULES: dict[str, dict[str, str]] = {
    "training": {
        "setup_model": "zipvoice.training.model_setup",
        "build_optimizer": "zipvoice.training.optimizer",
        "Batch": "zipvoice.training.steps",
        "adjusted_batch_count": "zipvoice.training.steps",
        "set_batch_count": "zipvoice.training.steps",
        "flow_matching_loss": "zipvoice.training.steps",
        "backward_and_step": "zipvoice.training.steps",
        "update_average": "zipvoice.training.checkpoints",
        "torch_sampler": "zipvoice.inference.torch_backend",
        "torch_vocoder": "zipvoice.inference.torch_backend",
        # what infer_zipvoice applies before generating; only later revisions have it
        "keep_freed_memory": "zipvoice.utils.allocator",
        "export_model": "zipvoice.onnx.export",
        "OnnxZipVoice": "zipvoice.onnx.runtime",
        # replay and distillation (+replay / +kd rows); only later revisions have it
        "ForgettingObjective": "zipvoice.training.distillation",
        "start_weights": "zipvoice.training.distillation",
    },
    "utils": {
        "setup_model": "zipvoice.utils.trainer",
        "build_optimizer": "zipvoice.utils.trainer",
        "Batch": "zipvoice.utils.trainer",
        "adjusted_batch_count": "zipvoice.utils.trainer",
        "set_batch_count": "zipvoice.utils.trainer",
        "flow_matching_loss": "zipvoice.utils.trainer",
        "backward_and_step": "zipvoice.utils.trainer",
        "update_average": "zipvoice.utils.trainer:_update_average",
        "torch_sampler": "zipvoice.utils.infer",
        "torch_vocoder": "zipvoice.utils.infer",
        "export_model": "zipvoice.utils.onnx_export",
        "OnnxZipVoice": "zipvoice.utils.infer_onnx",
    },
}


def has_module(module: str) -> bool:
    """Whether this revision's own tree has ``module`` (e.g. a feature a baseline predates).

    Decided by the tree of the imported ``zipvoice`` package, not by importing: the editable
    install's finder would otherwise supply a module the baseline lacks from this checkout."""
    import importlib.util

    import zipvoice

    root = Path(zipvoice.__file__).resolve().parent
    parts = module.split(".")
    for end in range(2, len(parts) + 1):  # parent packages first: find_spec imports them
        spec = importlib.util.find_spec(".".join(parts[:end]))
        if spec is None or spec.origin is None:
            return False
        if root not in Path(spec.origin).resolve().parents:
            return False
    return True


@cache
def layout() -> str:
    """ "training" if this revision has zipvoice/training/config.py, else "utils"."""
    return "training" if has_module("zipvoice.training.config") else "utils"


def library(name: str) -> Any:
    """The callable (or class) ``name`` from this revision's module for it."""
    where = MODULES[layout()].get(name)
    if where is None:
        raise KeyError(f"{name!r} is not known for the {layout()!r} layout")
    module, _, attribute = where.partition(":")
    if not has_module(module):
        raise ImportError(f"{module} is not in this revision's tree ({layout()!r} layout)")
    return getattr(importlib.import_module(module), attribute or name)


def tree_has(root: Path, module: str) -> bool:
    """In the parent process, without importing: whether the tree at ``root`` (a checkout or
    an exported revision) has ``module`` as a file or a package."""
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def training_config(flags: dict[str, Any]) -> Any:
    """The run's configuration from flag destinations (``num_iters=3``, ``use_lora=True``),
    the training command's defaults for everything else: a TrainingConfig, or for the
    "utils" layout the command's own parsed argparse Namespace. None leaves the default."""
    given = {key: value for key, value in flags.items() if value is not None}
    if layout() == "training":
        from zipvoice.training.config import TrainingConfig

        return TrainingConfig().replace(**given)
    get_parser = importlib.import_module("zipvoice.bin.train_zipvoice").get_parser
    argv: list[str] = []
    for key, value in given.items():
        text = str(int(value)) if isinstance(value, bool) else str(value)
        argv += ["--" + key.replace("_", "-"), text]
    return get_parser().parse_args(argv)


def setting(config: Any, name: str) -> Any:
    """One setting of a training_config() by its flag destination (``max_duration``)."""
    if layout() == "training":
        return config.flags()[name]
    return getattr(config, name)


def describe_layouts(results: list[dict[str, Any]]) -> str:
    """ "library layout: current training/, 3c5b7d9 utils/" from workers' results."""
    seen = {r["revision"]: r.get("layout", "?") for r in results if "revision" in r}
    return "library layout: " + ", ".join(f"{rev} {name}/" for rev, name in seen.items())
