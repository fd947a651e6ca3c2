"""The exported-model folder: the one module that writes it and reads it back (like timm's
`_hub.py`), so its file names and checks live in one place.

    mmkd export RUN_DIR [--format onnx|torchscript]   writes RUN_DIR/student/model.onnx

RUN_DIR/student/ (and RUN_DIR/student_NAME/ for each extra student)
    adapter.yaml              the adapter spec (architecture, preprocessing)
    model.safetensors         the weights (encoder + head)
    meta.json                 modality, embedding size, class names, sha256 of the files above
    class_embeddings.safetensors   zero-shot classifier (when trained into a text space)
    text/                     tokenizer and model config (text models only)
    model.onnx | model.torchscript.pt   written by `mmkd export`

Writing: `export_model` (the adapter contributes its spec and assets through
`Adapter.export_spec`, each settings section its `exported` rule). Reading: `load_exported`
(a callable model), `load_export_spec` (the spec alone, each section's `from_export` rule
applied), `weights_file` and `verify_export` (what `weights: FOLDER` loads). Folders exported
before meta.json held checksums load unchecked. This module sits below `mmkd.adapters`
(adapters/build.py reads exports through it), so it imports the adapters only inside the
functions that build a model.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mmkd import __version__
from mmkd.cli import command_parser
from mmkd.errors import CheckpointError, ConfigError
from mmkd.io import atomic_dir, atomic_path, load_state_file, save_state, sha256_file
from mmkd.roles import MAIN_STUDENT, student_slot

if TYPE_CHECKING:
    from mmkd.adapters import Adapter, AdapterOutput, Preprocessor

SPEC = "adapter.yaml"
WEIGHTS = "model.safetensors"
META = "meta.json"
CLASS_EMBEDDINGS = "class_embeddings.safetensors"
STUDENT = MAIN_STUDENT  # a run's folder for the student; its extra students go to student_NAME


def export_folder(run_dir: str | Path, role: str) -> Path:
    """Where a run exports the student of data role `role` ("student" or an extra student):
    the folder its slot names (mmkd.roles)."""
    return Path(run_dir) / student_slot(role).export_folder


def run_exports(run_dir: str | Path) -> dict[str, Path]:
    """role -> exported model folder of every student a run exported ("student" first)."""
    run_dir = Path(run_dir)
    folders = {STUDENT: run_dir / STUDENT}
    for folder in sorted(run_dir.glob(f"{STUDENT}_*")):
        folders[folder.name.removeprefix(f"{STUDENT}_")] = folder
    return folders


def export_model(
    model: Adapter,
    folder: str | Path,
    *,
    class_names: list[str] | None = None,
    class_embeddings: Tensor | None = None,
) -> Path:
    """Write `model` to `folder` atomically (the old folder stays until the new one is whole)."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        spec = model.export_spec(tmp)
        (tmp / SPEC).write_text(OmegaConf.to_yaml(spec))
        save_state(tmp / WEIGHTS, model.state_dict())
        meta = {
            "mmkd_version": __version__,
            "adapter": spec.adapter,
            "modality": model.modality,
            "embed_dim": model.embed_dim,
            "num_classes": model.num_classes,
            "class_names": list(class_names or []),
            "zero_shot": class_embeddings is not None,
        }
        if class_embeddings is not None:
            save_state(tmp / CLASS_EMBEDDINGS, {"class_embeddings": class_embeddings})
        # checked by every load (load_exported, teacher.weights=RUN/student)
        meta["sha256"] = {
            name: sha256_file(tmp / name)
            for name in (SPEC, WEIGHTS, CLASS_EMBEDDINGS)
            if (tmp / name).is_file()
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def weights_file(weights: str | Path) -> Path:
    """The weights file behind `weights`: an exported model folder or a file."""
    path = Path(weights)
    return path / WEIGHTS if path.is_dir() else path


def verify_export(folder: str | Path) -> None:
    """CheckpointError when a file of an exported model folder does not match the sha256 its
    meta.json records (exports written before checksums record none and pass)."""
    folder = Path(folder)
    try:
        sums = json.loads((folder / META).read_text()).get("sha256", {})
    except (OSError, ValueError, AttributeError):
        return  # no meta.json: loading the files reports what is missing
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != expected:
            raise CheckpointError(
                f"{path}: damaged or missing (its sha256 does not match the one in "
                f"{folder / META}); export the model again"
            )


def is_export(folder: str | Path) -> bool:
    """Whether `folder` is an exported model folder (holds its adapter spec)."""
    return (Path(folder) / SPEC).is_file()


def load_export_spec(folder: str | Path) -> DictConfig:
    """The adapter spec of an exported model folder, typed for its adapter, with its asset
    paths made absolute. Exports written before specs held only their adapter's sections hold
    every built-in section and an empty `options`: those the adapter does not read are dropped."""
    from mmkd.adapters import adapter_sections
    from mmkd.config.choices import drop_unread_sections
    from mmkd.config.compose import register_resolvers
    from mmkd.config.schema import adapter_schema

    register_resolvers()  # the defaults of sections an export omits may use ${package_dir:...}
    folder = Path(folder)
    spec_file = folder / SPEC
    if not spec_file.is_file():
        raise CheckpointError(
            f"{folder}: no {SPEC}; expected a run's exported model folder (RUN_DIR/student)"
        )
    try:
        saved = OmegaConf.load(spec_file)
        adapter = str(saved.get("adapter") or "image")
        schema = adapter_schema(adapter, key=f"{spec_file}: adapter")
        drop_unread_sections(saved, adapter, old_layout=True)
        spec = OmegaConf.merge(OmegaConf.structured(schema), saved)
    except ConfigError:  # an adapter that is not registered (a plugin not imported)
        raise
    except Exception as err:  # yaml or schema error: the file is damaged or from another version
        raise CheckpointError(f"{spec_file}: cannot be read as an adapter spec ({err})") from None
    for name, section in adapter_sections(adapter).items():
        section.from_export(spec[name], folder)
    return spec


def load_class_embeddings(folder: Path) -> Tensor | None:
    """The zero-shot class embeddings of an export, or None when it has none."""
    if not (folder / CLASS_EMBEDDINGS).is_file():
        return None
    state = load_state_file(folder / CLASS_EMBEDDINGS)
    if "class_embeddings" not in state:
        raise CheckpointError(f"{folder / CLASS_EMBEDDINGS}: no 'class_embeddings' tensor")
    return state["class_embeddings"]


class TensorInterface(torch.nn.Module):
    """Positional tensors in (the batch keys, in order), (embedding, logits) out: the calling
    convention ONNX and TorchScript need. Models without a classifier return embedding only."""

    def __init__(self, model: Adapter, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.model(dict(zip(self.input_names, inputs, strict=True)))
        return (out.embedding,) if out.logits is None else (out.embedding, out.logits)


def export_compiled(folder: str | Path, fmt: str, output: str | Path | None = None) -> Path:
    """Write an exported model as ONNX (`model.onnx`) or TorchScript (`model.torchscript.pt`),
    with a dynamic batch axis. Inputs are the preprocessed batch tensors, named as in
    `adapter.example_batch()`; outputs `embedding` (and `logits`)."""
    if fmt == "onnx":
        require_export_extra()
    exported = load_exported(folder)
    example = exported.model.example_batch(2)
    names = list(example)
    wrapper = TensorInterface(exported.model, names).eval()
    outputs = ["embedding"] if exported.model.num_classes is None else ["embedding", "logits"]
    default = "model.onnx" if fmt == "onnx" else "model.torchscript.pt"
    path = Path(output) if output else Path(folder) / default
    with atomic_path(path) as tmp, torch.no_grad():
        if fmt == "onnx":
            # the TorchScript-based exporter: with a dynamic batch axis, torch.export (dynamo=True)
            # failed on every adapter we tried in torch 2.14
            torch.onnx.export(
                wrapper,
                tuple(example.values()),
                str(tmp),
                input_names=names,
                output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in [*names, *outputs]},
                dynamo=False,
            )
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(wrapper, tuple(example.values())), str(tmp))
        else:
            raise ValueError(f"unknown export format {fmt!r}; use onnx or torchscript")
    return path


EXPORT_PACKAGES = ("onnx",)  # what torch.onnx.export needs (the [export] extra installs it)


def require_export_extra() -> None:
    """One line naming the extra when ONNX export's packages are missing."""
    for name in EXPORT_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(
                f"--format onnx needs the {name!r} package, which the [export] extra installs: "
                "pip install 'mmkd[export]'"
            ) from None


@dataclass
class ExportedModel:
    """A loaded export: call it on raw samples of its modality."""

    model: Adapter
    preprocessor: Preprocessor
    class_names: list[str]
    class_embeddings: Tensor | None

    @torch.inference_mode()
    def __call__(self, raw_samples: list[Any]) -> AdapterOutput:
        items = [self.preprocessor(raw, train=False) for raw in raw_samples]
        return self.model(self.preprocessor.collate(items))

    def classify(self, raw_samples: list[Any]) -> list[str]:
        """Class names: by the classifier head, or zero-shot by the nearest class prompt."""
        from mmkd.adapters.base import class_scores

        scores = class_scores(self(raw_samples), self.class_embeddings)
        if scores is None or not self.class_names:
            raise ValueError("this model has neither a classifier nor zero-shot class prompts")
        return [self.class_names[i] for i in scores.argmax(-1).tolist()]


def load_exported(folder: str | Path) -> ExportedModel:
    """Load RUN_DIR/student (or any export folder) in eval mode, on the CPU."""
    from mmkd.adapters import build_adapter

    folder = Path(folder)
    spec = load_export_spec(folder)
    spec.weights = str(folder)
    spec.freeze_encoder = False
    model = build_adapter(spec, key=str(folder)).eval()
    meta_file = folder / META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    embeddings = load_class_embeddings(folder)
    return ExportedModel(model, model.make_preprocessor(), meta.get("class_names", []), embeddings)


def command(argv: Sequence[str]) -> int:
    """`mmkd export RUN_DIR [--format onnx|torchscript] [--output PATH] [--model FOLDER]`."""
    parser = command_parser("export", "Export a run's student to ONNX or TorchScript.")
    parser.add_argument("run_dir", help="a finished run folder (holding student/)")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    parser.add_argument("--output", help="file to write (default: RUN_DIR/student/model.onnx)")
    parser.add_argument("--model", default=STUDENT, help="which exported model folder of the run")
    args = parser.parse_args(argv)
    print(export_compiled(Path(args.run_dir) / args.model, args.format, args.output))
    return 0
