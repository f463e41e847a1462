"""The frozen base network and its LoRA adapter (peft), in the standard PEFT file layout.

Shared by training (which writes adapters) and generation/export (which apply them).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from shared.errors import UserError
from shared.models.network import MMAudio
from shared.outputs import replace_folder, require_space

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_INFO = "mmaudio_lora.json"  # which base network the adapter belongs to (peft does not record it)


class AdapterError(UserError):
    pass


def base_network(profile: str, checkpoint: str | None, variant: str | None,
                 weights_dir: str | os.PathLike | None = None) -> tuple[MMAudio, str]:
    """The network to adapt and its variant: an official file (`real`: `checkpoint`, whose shapes
    give the variant when none is named, else the variant's file in the weights folder), or the
    deterministic tiny network of the variant's layout."""
    from shared.models.network import build_network
    from shared.profiles import check_profile, fill_deterministically, network_config
    from shared.models.sequence import DEFAULT_VARIANT

    if check_profile(profile) == "real":
        if checkpoint is None:
            from shared.weights import NETWORK_WEIGHTS, require
            checkpoint = require(NETWORK_WEIGHTS[variant or DEFAULT_VARIANT], weights_dir)
        from shared.checkpoint import load_network
        from shared.models.network import VARIANTS
        network = load_network(checkpoint, variant)
        return network, next(name for name, official in VARIANTS.items() if official == network.config)
    variant = variant or DEFAULT_VARIANT
    network = build_network(None, **asdict(network_config(variant, "tiny")))
    return fill_deterministically(network), variant


def lora_config(rank: int, alpha: float, dropout: float, target_modules: str, use_rslora: bool = False,
                use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      use_rslora=use_rslora, use_dora=use_dora, bias="none")


def add_lora(network: MMAudio, config) -> nn.Module:
    """Freeze the network and wrap it with LoRA layers (in place: `network` itself now runs them)."""
    from peft import get_peft_model

    targets = [name for name, _ in network.named_modules() if _full_match(config.target_modules, name)]
    if not targets:
        raise AdapterError(f"target_modules {config.target_modules!r} matches no module of the network")
    containers = [n for n in targets if not isinstance(network.get_submodule(n), (nn.Linear, nn.Conv1d))]
    if containers:
        kind = type(network.get_submodule(containers[0])).__name__
        name = repr(containers[0]) if containers[0] else "'' (the whole network)"
        raise AdapterError(f"target_modules {config.target_modules!r} matches {len(targets)} module(s), {len(containers)} "
                           f"of them holding layers rather than being one, e.g. {name} ({kind}); LoRA goes on Linear "
                           "(or Conv1d) layers: match names such as joint_blocks.0.latent_block.attn.qkv")
    if config.use_dora:
        convs = [n for n in targets if not isinstance(network.get_submodule(n), nn.Linear)]
        if convs:
            raise AdapterError("DoRA works only on nn.Linear targets (peft's DoRA breaks on the channel-last "
                               f"Conv1d layers, e.g. {convs[0]}); pick Linear-only target_modules or drop DoRA")
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return get_peft_model(network, config)


def _full_match(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(pattern, name) is not None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_adapter(peft_model, directory: Path, info: dict[str, str], card: str | None = None) -> None:
    """Write the adapter in the PEFT layout plus `info` (variant, profile) and the model `card`
    (README.md, replacing peft's empty template), atomically (a temporary folder renamed into place)."""
    directory = Path(directory)
    temporary = directory.with_name(f".{directory.name}.tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    require_space(directory.parent, adapter_bytes(peft_model), "an adapter")
    peft_model.save_pretrained(str(temporary))
    (temporary / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if card is not None:
        (temporary / "README.md").write_text(card)
    replace_folder(temporary, directory)


def adapter_bytes(peft_model) -> int:
    """What the adapter's tensors take on disk (about)."""
    return sum(t.numel() * t.element_size() for t in adapter_state(peft_model).values()) + 2 ** 20


def adapter_info(directory: str | Path) -> dict[str, str]:
    path = Path(directory) / ADAPTER_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def check_adapter_file(directory: str | Path) -> None:
    """The adapter folder's files are there and its weights finite, read without a network: a
    command refuses a diverged adapter before it makes anything."""
    from safetensors.torch import load_file

    directory = Path(directory)
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise AdapterError(f"{directory}: not an adapter folder (missing {', '.join(missing)})")
    try:
        tensors = load_file(str(directory / "adapter_model.safetensors"))
    except Exception as error:  # safetensors raises several types for bad files
        raise AdapterError(f"{directory}: unreadable adapter weights ({type(error).__name__})") from None
    broken = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if broken:
        raise AdapterError(f"{directory}: {len(broken)} of the adapter's tensors are not finite (a diverged run, e.g. "
                           f"{broken[0]}); use a checkpoint from before it diverged")


def load_adapter(network: MMAudio, directory: str | Path, is_trainable: bool = False,
                 expected: dict[str, str] | None = None):
    """Apply a saved adapter to `network`; a wrong or corrupt adapter gives one clear error.

    `expected` (variant, profile of `network`) is checked against what the adapter was trained on.
    """
    from peft import PeftModel

    directory = Path(directory)
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise AdapterError(f"{directory}: not an adapter folder (missing {', '.join(missing)})")
    trained_on = adapter_info(directory)
    for key, value in (expected or {}).items():
        if key in trained_on and trained_on[key] != value:
            raise AdapterError(f"{directory}: this adapter was trained on {key} {trained_on[key]!r}, but the base "
                               f"network is {value!r}; use the base checkpoint it was trained with")
    try:
        model = PeftModel.from_pretrained(network, str(directory), is_trainable=is_trainable)
    except Exception as error:  # peft/safetensors raise many types for bad files
        raise AdapterError(f"{directory}: cannot load this adapter onto the network "
                           f"({type(error).__name__}: {str(error).splitlines()[0][:300]})") from None
    broken = [name for name, tensor in adapter_state(model).items() if not bool(torch.isfinite(tensor).all())]
    if broken:
        raise AdapterError(f"{directory}: {len(broken)} of the adapter's tensors are not finite (a diverged run, e.g. "
                           f"{broken[0]}); use a checkpoint from before it diverged")
    return model


def merge_adapter(network: MMAudio, directory: str | Path, scale: float = 1.0,
                  expected: dict[str, str] | None = None) -> MMAudio:
    """`network` with the adapter merged into its weights at `scale` (0: base, 1: as trained):
    a plain MMAudio again, as fast as the base network."""
    from peft.tuners.lora import LoraLayer

    model = load_adapter(network, directory, expected=expected)
    if scale != 1.0:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.scaling:
                    module.set_scale(name, scale)
    return model.merge_and_unload()


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)
