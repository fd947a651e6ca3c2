"""What an adapter's config section is: a dataclass of its settings, its checks, its export rule.

Each adapter family keeps its section(s) in a light `*_config.py` beside its code (no torch,
timm, transformers or torchaudio), so the schema (`mmkd.config.schema.AdapterSpec`) is built
from them without importing any model library. An adapter class names the sections it reads
(`Adapter.sections`); start-up validation checks those and rejects changes to the others, and
an export writes only those, each passed through its own `exported` rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmkd.settings import Settings, check_choice, check_non_negative, check_positive

__all__ = ["Section", "check_choice", "check_non_negative", "check_positive"]


class Section(Settings):
    """Base of an adapter's section dataclass (`student.<name>`): the checks of `Settings`
    (run at start-up for the sections the chosen adapter reads) plus the export hooks.
    Subclasses override the hooks they need."""

    @classmethod
    def exported(cls, cfg: DictConfig) -> None:
        """Edit `cfg` in place for an export: switch off pretrained sources (the exported
        weights file holds the weights)."""

    @classmethod
    def from_export(cls, cfg: DictConfig, folder: Path) -> None:
        """Edit `cfg` in place after loading it from the exported model folder `folder` (make
        the paths of assets saved there absolute)."""

    @classmethod
    def changed(cls, cfg: DictConfig, composed: DictConfig | None = None) -> list[str]:
        """The fields of `cfg` that differ from this section's defaults. A value an export
        writes for an untouched section (a default with its pretrained switches off, as earlier
        exports saved every section) counts as a default, and so does the value of `composed`
        (the section as the config group files gave it, before the experiment body and the
        command line)."""
        defaults = OmegaConf.structured(cls)
        exported = defaults.copy()
        cls.exported(exported)
        given, plain, off = _plain(cfg), _plain(defaults), _plain(exported)
        base = _plain(composed) if composed is not None else {}
        return [
            name
            for name, value in given.items()
            if value not in (plain.get(name), off.get(name))
            and (name not in base or value != base[name])
        ]


def _plain(cfg: DictConfig) -> dict[str, Any]:
    """`cfg` as a dict, interpolations resolved where they can be (else left as written)."""
    try:
        out = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. a resolver that is not registered in this process
        out = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(out, dict)
    return out
