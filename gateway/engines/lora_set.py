"""The embedded engine's model and the LoRA adapters in it, changed only between decode steps.

Every load gets its own peft name, so a request keeps the weights it started with: an unloaded (or
reloaded) adapter's old weights stay in the model, out of reach of new requests, until the last request
that uses them has ended (`sweep`). Rows name their adapter to peft per forward pass (`adapter_names`),
so nothing here depends on peft's single "active" adapter.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.engines.base import AdapterLoadError, AdapterNotLoaded


def internal_adapter_name(name: str) -> str:
    """peft keys adapters into module names, so public names (`p@v1`) get a safe, unique alias."""
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_]", "_", name)[:48] + "_" + digest


class LoraSet:
    """The base model, wrapped by peft while any adapter (loaded or retiring) is in it."""

    def __init__(self, base: Any, reload_base: Callable[[], Any]) -> None:
        self.base = base
        self.peft: Any = None
        self.names: dict[str, str] = {}  # public name -> peft name of its current load
        self.retiring: set[str] = set()  # peft names no new request may use, deleted once unused
        self._reload_base = reload_base
        self._loads = itertools.count(1)

    @property
    def model(self) -> Any:
        """What to run: the peft model while it holds adapters, else the base model."""
        return self.peft if self.peft is not None else self.base

    def peft_name(self, name: str) -> str:
        """The peft name a new request on adapter `name` runs with."""
        if name not in self.names:
            raise AdapterNotLoaded(f"adapter '{name}' is not loaded", code="adapter_not_loaded")
        return self.names[name]

    def load(self, name: str, path: Path, config: dict[str, Any]) -> None:
        """Load a PEFT LoRA folder as `name`; a previous load of `name` retires. Raise AdapterLoadError."""
        from peft import PeftModel

        if config.get("use_dora"):
            raise AdapterLoadError("DoRA adapters are not supported: peft cannot batch them with other rows",
                                   param="adapter_path", code="unsupported_adapter")
        peft_name = f"{internal_adapter_name(name)}_{next(self._loads)}"
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=peft_name)
            else:
                self.peft.load_adapter(str(path), adapter_name=peft_name)
            self.peft.eval()  # layers added by load_adapter start in training mode (dropout on)
        except Exception as exc:  # peft raises many types for a misfit adapter
            self._undo_load(peft_name)
            raise AdapterLoadError(f"the adapter does not fit the base model: {exc}",
                                   param="adapter_path", code="adapter_mismatch") from exc
        self.unload(name)
        self.names[name] = peft_name

    def _undo_load(self, peft_name: str) -> None:
        if self.peft is None:
            # A failed first load may have injected layers into the base model in place: reload it.
            self.base = self._reload_base()
        elif peft_name in self.peft.peft_config:  # others are in it too: peft is unwrapped when it holds none
            self.peft.delete_adapter(peft_name)

    def unload(self, name: str) -> None:
        """New requests can no longer use `name`; its weights go at the next `sweep` that finds them unused."""
        peft_name = self.names.pop(name, None)
        if peft_name is not None:
            self.retiring.add(peft_name)

    def sweep(self, in_use: set[str]) -> None:
        """Delete retiring adapters that no request uses; unwrap the base model when none is left."""
        for peft_name in sorted(self.retiring - in_use):
            self.retiring.discard(peft_name)
            if self.peft is None:
                continue
            others = [n for n in self.peft.peft_config if n != peft_name]
            if not others:
                # peft cannot run with zero adapters: take the LoRA layers out again.
                self.base, self.peft = self.peft.unload(), None
                continue
            if self.peft.active_adapter == peft_name:
                self.peft.set_adapter(others[0])
            self.peft.delete_adapter(peft_name)
