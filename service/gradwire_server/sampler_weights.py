"""Sampler checkpoints as inference-only LoRA adapters on the engine's shared
peft model, their factors as plain tensors for the sampler's batched LoRA
(key -> adapter weights), and switching the model to its bare base weights for
a sampling turn without disturbing any training run.

A sampler checkpoint is a standard peft adapter folder (adapter_config.json +
adapter_model.safetensors). Loaded adapters stay cached (LRU, keyed by path
and the file's sha256, so other weights under a reused path reload) under a
generated adapter name.
Worker thread only.
"""
from __future__ import annotations

import contextlib
import hashlib
import pathlib
from collections import OrderedDict
from collections.abc import Iterator

import peft
import safetensors.torch
import torch

from gradwire_server import checkpoints
from gradwire_server.checkpoints import Checkpoint
from gradwire_server.engine import Engine
from gradwire_server.lora_batch import AdapterWeights, adapter_weights

ADAPTER_WEIGHTS = checkpoints.ADAPTER_WEIGHTS


class AdapterLoadError(ValueError):
    """A sampler checkpoint folder that does not hold an adapter for this model."""


class SamplerAdapters:
    """`capacity`: adapters kept loaded in the peft model (which checks an adapter
    against the model as it loads it); `weights_capacity`: checkpoints whose
    factors are kept for the sampler, so that several checkpoints sampling at
    once (e.g. 8 runs' latest weights) are not loaded again for every request."""

    def __init__(self, engine: Engine, capacity: int = 4, weights_capacity: int = 8):
        self.engine = engine
        self.capacity = capacity
        self.weights_capacity = weights_capacity
        self._loaded: OrderedDict[tuple[str, str], str] = OrderedDict()  # (folder, sha256) -> adapter
        self._weights: OrderedDict[tuple[str, str], AdapterWeights] = OrderedDict()  # (folder, sha256) -> factors

    def weights_for(self, checkpoint: Checkpoint) -> AdapterWeights:
        """The LoRA factors of a sampler checkpoint (loaded as in adapter_for if they
        are not cached). They stay valid for whoever holds them after eviction."""
        key = _key(checkpoint)
        if key in self._weights:
            self._weights.move_to_end(key)
            return self._weights[key]
        name = self.adapter_for(checkpoint)
        try:
            weights = adapter_weights(self.engine.base.model, name)
        except ValueError as error:
            raise AdapterLoadError(str(error)) from None
        self._weights[key] = weights
        if len(self._weights) > self.weights_capacity:
            self._weights.popitem(last=False)
        return weights

    def adapter_for(self, checkpoint: Checkpoint) -> str:
        """The adapter name of a sampler checkpoint, loading it (after checking the
        file against the checkpoint's sha256) if it is not cached."""
        key = _key(checkpoint)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        checkpoints.verify(checkpoint, ADAPTER_WEIGHTS)
        name = "sampler-" + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
        self._load(checkpoint.folder, name)
        self._loaded[key] = name
        if len(self._loaded) > self.capacity:
            _, evicted = self._loaded.popitem(last=False)
            with preserved_adapter_state(self.engine.peft_model):
                self.engine.peft_model.delete_adapter(evicted)
        return name

    def _load(self, folder: pathlib.Path, name: str) -> None:
        try:
            config = peft.LoraConfig.from_pretrained(str(folder))
            weights = safetensors.torch.load_file(str(folder / ADAPTER_WEIGHTS), device=str(self.engine.device))
        except Exception as error:  # noqa: BLE001 - any decoding failure means a damaged file
            raise AdapterLoadError(f"cannot read the adapter ({ADAPTER_WEIGHTS}): {error}") from None
        config.inference_mode = True
        engine = self.engine
        # Adding an adapter initialises it randomly: keep the global RNG untouched.
        devices = [engine.device] if engine.device.type == "cuda" else []
        with preserved_adapter_state(engine.peft_model), torch.random.fork_rng(devices=devices):
            try:
                if engine.peft_model is None:
                    engine.peft_model = peft.get_peft_model(engine.base.model, config, adapter_name=name)
                else:
                    engine.peft_model.add_adapter(name, config)
            except ValueError as error:  # e.g. target modules this model lacks
                raise AdapterLoadError(f"the adapter does not fit this model: {error}") from None
        # Only the LoRA factors: the base weights are shared by every run (peft
        # may also save embedding layers' base weights into an adapter folder).
        lora_weights = {key: value for key, value in weights.items() if "lora_" in key}
        result = peft.set_peft_model_state_dict(engine.peft_model, lora_weights, adapter_name=name)
        missing = [k.replace(f".{name}.", ".") for k in result.missing_keys if f".{name}." in k]
        if result.unexpected_keys or missing:
            with preserved_adapter_state(engine.peft_model):
                engine.peft_model.delete_adapter(name)
            raise AdapterLoadError("the adapter's weights do not match its config and this model: "
                                   f"unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}")
        for parameter_name, parameter in engine.peft_model.named_parameters():
            if f".{name}." in parameter_name:
                parameter.requires_grad_(False)

    @contextlib.contextmanager
    def base_weights(self) -> Iterator[None]:
        """The model computes with its own weights (every adapter layer off) and the
        engine's autocast while the block runs: the sampler adds LoRA deltas itself.
        Afterwards the active adapter and every requires_grad flag are as before."""
        model = self.engine.peft_model
        with preserved_adapter_state(model), self.engine.autocast():
            if model is None:
                yield
                return
            # Not peft's disable_adapter(): its model-status check walks every module
            # and parameter on each call.
            model.base_model.disable_adapter_layers()
            try:
                yield
            finally:
                model.base_model.enable_adapter_layers()


def _key(checkpoint: Checkpoint) -> tuple[str, str]:
    """A checkpoint's cache key: its path and its adapter file's sha256 (a path saved
    again with other weights is another key)."""
    return checkpoint.path.path, checkpoint.metadata["files"][ADAPTER_WEIGHTS]["sha256"]


@contextlib.contextmanager
def preserved_adapter_state(model: peft.PeftModel | None) -> Iterator[None]:
    """Restores the active adapter and requires_grad flags (peft's set_adapter and
    disable_adapter change both) when the block ends."""
    if model is None:
        yield
        return
    active = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        if model.active_adapter != active and active in model.peft_config:
            model.set_adapter(active)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
