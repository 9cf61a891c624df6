"""Sampler checkpoints as inference-only LoRA adapters on the engine's shared
peft model, their factors as plain tensors for the sampler's batched LoRA
(key -> adapter weights), and switching the model to its bare base weights for
a sampling turn without disturbing any training run.

A sampler checkpoint is a standard peft adapter folder (adapter_config.json +
adapter_model.safetensors). Loaded adapters stay cached (LRU, keyed by path
and the file's sha256, so other weights under a reused path reload) under a
generated adapter name.

An ephemeral snapshot (save_weights_and_get_sampling_client) is a run's adapter
copied into memory, no files, registered here under its path
gradwire://<run_id>/ephemeral/<id> and served exactly like a loaded checkpoint.
Snapshots live until released, or until their total size exceeds the budget
(the oldest unused go first); a sampling request holds its snapshot until it ends.
Worker thread only, but `snapshot()` may be called from any thread (the registry of
snapshots has its own lock).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import pathlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import peft
import safetensors.torch
import torch

from gradwire_server import checkpoints
from gradwire_server.checkpoints import Checkpoint
from gradwire_server.engine import Engine
from gradwire_server.errors import ServiceError
from gradwire_server.lora_batch import AdapterWeights, adapter_layers_off, adapter_weights

ADAPTER_WEIGHTS = checkpoints.ADAPTER_WEIGHTS
EPHEMERAL_KIND = "ephemeral"
SNAPSHOT_BUDGET_BYTES = 2 * 2**30  # host memory all ephemeral snapshots may hold together


def is_ephemeral_path(path: str) -> bool:
    """Whether `path` names an ephemeral snapshot (gradwire://<run_id>/ephemeral/<id>)."""
    parts = path.removeprefix(checkpoints.SCHEME).split("/")
    return path.startswith(checkpoints.SCHEME) and len(parts) == 3 and parts[1] == EPHEMERAL_KIND


@dataclass
class WeightsSnapshot:
    """A run's LoRA adapter at one moment, in host memory."""

    path: str
    config: peft.LoraConfig
    weights: dict[str, torch.Tensor]  # CPU; peft state-dict names

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())


class AdapterLoadError(ValueError):
    """A sampler checkpoint folder that does not hold an adapter for this model."""


class SamplerAdapters:
    """`capacity`: adapters kept loaded in the peft model (which checks an adapter
    against the model as it loads it); `weights_capacity`: checkpoints whose
    factors are kept for the sampler, so that several checkpoints sampling at
    once (e.g. 8 runs' latest weights) are not loaded again for every request;
    `snapshot_budget_bytes`: host memory all ephemeral snapshots may hold."""

    def __init__(self, engine: Engine, capacity: int = 4, weights_capacity: int = 8,
                 snapshot_budget_bytes: int = SNAPSHOT_BUDGET_BYTES):
        self.engine = engine
        self.capacity = capacity
        self.weights_capacity = weights_capacity
        self.snapshot_budget_bytes = snapshot_budget_bytes
        self._loaded: OrderedDict[tuple[str, str], str] = OrderedDict()  # (path, sha256 or "") -> adapter
        self._weights: OrderedDict[tuple[str, str], AdapterWeights] = OrderedDict()  # (path, sha256 or "") -> factors
        self._snapshots: OrderedDict[str, WeightsSnapshot] = OrderedDict()  # path -> snapshot, oldest first
        self._snapshots_lock = threading.Lock()

    def weights_for(self, source: Checkpoint | WeightsSnapshot) -> AdapterWeights:
        """The LoRA factors of a sampler checkpoint or snapshot (loaded as in adapter_for
        if they are not cached). They stay valid for whoever holds them after eviction."""
        key = _key(source)
        if key in self._weights:
            self._weights.move_to_end(key)
            return self._weights[key]
        name = self.adapter_for(source)
        try:
            weights = adapter_weights(self.engine.base.model, name)
        except ValueError as error:
            raise AdapterLoadError(str(error)) from None
        self._weights[key] = weights
        if len(self._weights) > self.weights_capacity:
            self._weights.popitem(last=False)
        return weights

    def adapter_for(self, source: Checkpoint | WeightsSnapshot) -> str:
        """The adapter name of a sampler checkpoint (after checking its file against the
        checkpoint's sha256) or of a snapshot, loading it if it is not cached."""
        key = _key(source)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        name = "sampler-" + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
        if isinstance(source, WeightsSnapshot):
            self._load(copy.deepcopy(source.config),
                       {k: t.to(self.engine.device) for k, t in source.weights.items()}, name)
        else:
            checkpoints.verify(source, ADAPTER_WEIGHTS)  # (saves and deletes run on this thread too)
            self._load(*_read_adapter(source.folder, self.engine.device), name)
        self._loaded[key] = name
        if len(self._loaded) > self.capacity:
            self._unload(next(iter(self._loaded)))
        return name

    def add_snapshot(self, run_id: str) -> str:
        """Copies the run's current adapter into memory; returns the snapshot's path."""
        state = self.engine.save_state(run_id, with_optimizer=False)
        path = f"{checkpoints.SCHEME}{run_id}/{EPHEMERAL_KIND}/{secrets.token_hex(8)}"
        config = copy.deepcopy(self.engine.peft_model.peft_config[run_id])
        with self._snapshots_lock:
            self._snapshots[path] = WeightsSnapshot(path, config, state.adapter)
            total = sum(s.nbytes for s in self._snapshots.values())
            over = []
            while total > self.snapshot_budget_bytes and len(self._snapshots) > len(over) + 1:
                oldest = list(self._snapshots)[len(over)]  # the least recently used first
                over.append(oldest)
                total -= self._snapshots[oldest].nbytes
        for old in over:
            self._forget(old)
        return path

    def snapshot(self, path: str) -> WeightsSnapshot:
        """The snapshot at `path` (marked as recently used); NOT_FOUND once freed."""
        with self._snapshots_lock:
            found = self._snapshots.get(path)
            if found is not None:
                self._snapshots.move_to_end(path)
        if found is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND,
                               f"ephemeral sampler weights {path} not found: released, or freed under "
                               "memory pressure (save_weights_for_sampler(name) keeps weights until "
                               "deleted)", "SAMPLER_WEIGHTS_NOT_FOUND")
        return found

    def release(self, path: str) -> None:
        """Frees the snapshot at `path` (NOT_FOUND if it is gone already)."""
        self.snapshot(path)
        self._forget(path)

    def snapshot_count(self) -> int:
        with self._snapshots_lock:
            return len(self._snapshots)

    def _forget(self, path: str) -> None:
        """Drops a snapshot, its loaded adapter and its factors (a request still running
        keeps its own reference to the factors)."""
        if (path, "") in self._loaded:
            self._unload((path, ""))
        self._weights.pop((path, ""), None)
        with self._snapshots_lock:
            self._snapshots.pop(path, None)

    def _unload(self, key: tuple[str, str]) -> None:
        name = self._loaded.pop(key)
        with preserved_adapter_state(self.engine.peft_model):
            self.engine.peft_model.delete_adapter(name)

    def _load(self, config: peft.LoraConfig, weights: dict[str, torch.Tensor], name: str) -> None:
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
            finally:
                engine.adapters_changed()  # peft may have wrapped Linears no adapter had (kept if deleted)
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
        """The model computes with its own weights (every adapter layer off), the engine's
        autocast and attention kernel while the block runs: the sampler adds LoRA deltas
        itself. Runs' adapters, their requires_grad flags and the active one are untouched."""
        with self.engine.autocast(), self.engine.attention(), adapter_layers_off(self.engine.lora_layers):
            yield


def _key(source: Checkpoint | WeightsSnapshot) -> tuple[str, str]:
    """A cache key: a checkpoint's path and its adapter file's sha256 (a path saved
    again with other weights is another key); a snapshot's path (never reused) and ""."""
    if isinstance(source, WeightsSnapshot):
        return source.path, ""
    return source.path.path, source.metadata["files"][ADAPTER_WEIGHTS]["sha256"]


def _read_adapter(folder: pathlib.Path, device: torch.device
                  ) -> tuple[peft.LoraConfig, dict[str, torch.Tensor]]:
    """A sampler checkpoint folder's LoRA config and weights."""
    try:
        config = peft.LoraConfig.from_pretrained(str(folder))
        weights = safetensors.torch.load_file(str(folder / ADAPTER_WEIGHTS), device=str(device))
    except Exception as error:  # noqa: BLE001 - any decoding failure means a damaged file
        raise AdapterLoadError(f"cannot read the adapter ({ADAPTER_WEIGHTS}): {error}") from None
    return config, weights


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
