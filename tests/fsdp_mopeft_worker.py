# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""One SGD step of MoPEFT under FSDP that shards each transformer block, on the CPU (gloo); run by tests/test_fsdp.py:

    torchrun --standalone --nproc_per_node 2 tests/fsdp_mopeft_worker.py OUT_DIR [CASE ...]

A case is ``<model>-<placement>``: model ``sam``, ``vit`` or ``dinov2`` (tests/tiny_models.py), placement one of

- ``fsdp2_outer``: ``fully_shard`` on each MoPEFT wrapper (the block and its adapter in one group), then the root;
- ``fsdp2_inner``: ``fully_shard`` on each wrapped block (``layer.base_layer``), then the root (the MoPEFT parameters
  sit in the root's group); ``fsdp2_inner_ckpt``: the same with activation checkpointing on;
- ``fsdp1_inner``: ``FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy(<the classes named in the
  model's _no_split_modules>), use_orig_params=True)``, what accelerate's TRANSFORMER_BASED_WRAP does; this wraps the
  block inside the MoPEFT wrapper;
- ``fsdp1_outer``: the same with ``ModuleWrapPolicy({MoPEFTLayer})``.

Every rank builds the same seeded model, takes the same step without FSDP on the full batch (the reference), then the
step under FSDP on its half of the batch. It writes ``OUT_DIR/<case>/rank<r>.json`` (loss, largest difference to the
reference, a checksum of the trained weights to compare ranks) and, from rank 0, the adapter saved from the sharded
model (``OUT_DIR/<case>/adapter``) with the reference model's eval outputs (``OUT_DIR/<case>/reference.pt``).

Saving under either FSDP: gather the full state dict on all ranks (a collective), then save from rank 0 with peft:

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        peft_model.save_pretrained(path, state_dict=sd)  # FSDP1: peft_model = model.module; FSDP2: the model itself
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft_vision_ext  # noqa: E402, F401
from peft_vision_ext import MoPEFTConfig  # noqa: E402
from peft_vision_ext.tuners.mopeft import MoPEFTLayer  # noqa: E402

from tiny_models import make_dinov2, make_sam, make_vit  # noqa: E402


CASES = [
    *(f"sam-{p}" for p in ("fsdp2_outer", "fsdp2_inner", "fsdp2_inner_ckpt", "fsdp1_inner", "fsdp1_outer")),
    *(f"vit-{p}" for p in ("fsdp2_outer", "fsdp2_inner", "fsdp1_inner")),
    "dinov2-fsdp2_inner",
]
BATCH = 4  # two images per rank
LR = 0.1


def build(model_name: str):
    """The base model, the MoPEFT model (full mixture, every part acting) and the full batch ``(x, labels)``."""
    base = {"sam": make_sam, "vit": make_vit, "dinov2": make_dinov2}[model_name](0)
    torch.manual_seed(0)  # LoRA A and the prefix/adapter/gate linears draw from the global generator
    model = get_peft_model(copy.deepcopy(base), MoPEFTConfig(init_weights=False, prefix_length=4))
    size = 80 if model_name == "sam" else 32
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, size, size, generator=generator)
    labels = torch.randint(0, 3, (BATCH, size, size), generator=generator) if model_name == "sam" else None
    return base, model, x, labels


def loss_of(model, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    # Every loss is a mean over images (and pixels or tokens), so the mean of the two half-batch losses -- what FSDP's
    # averaged gradients follow -- is the full-batch loss. The tiny SAM's mask decoder passes the encoder almost no
    # gradient (its logits are ~1e-3), so its loss also reads the last encoder block's output.
    if labels is not None:
        outputs = model(pixel_values=x, labels=labels, output_hidden_states=True)
        return outputs.loss + outputs.hidden_states[-1].pow(2).mean()
    return model(pixel_values=x).last_hidden_state.pow(2).mean()


def outputs_of(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval outputs to compare a reloaded adapter with: SAM's logits and last encoder block output (the logits of the
    tiny SAM are ~1e-3 and barely read the encoder), the other encoders' last hidden state."""
    with torch.no_grad():
        outputs = model.eval()(pixel_values=x, output_hidden_states=True)
    if hasattr(outputs, "logits"):
        return {"logits": outputs.logits, "encoder": outputs.hidden_states[-1]}
    return {"encoder": outputs.last_hidden_state}


def full_gradients(model) -> dict[str, torch.Tensor]:
    """The gradients of the trainable parameters, unsharded, by their names in the PeftModel (collective)."""
    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            return {
                n.replace("_fsdp_wrapped_module.", ""): p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return grads


def sgd_step(model, x: torch.Tensor, labels: torch.Tensor | None) -> tuple[float, dict[str, torch.Tensor]]:
    """One SGD step; returns the loss and the (full) gradients it applied."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    loss = loss_of(model, x, labels)
    loss.backward()
    grads = full_gradients(model)
    optimizer.step()
    return loss.item(), grads


def blocks(model) -> list[MoPEFTLayer]:
    return [m for m in model.modules() if isinstance(m, MoPEFTLayer)]


def shard(model, placement: str):
    """``model`` (the PeftModel) sharded per block as ``placement`` says; returns the module to call."""
    if placement.startswith("fsdp2"):
        for layer in blocks(model):
            fully_shard(layer.base_layer if "inner" in placement else layer)
        fully_shard(model)
        return model
    if "inner" in placement:
        names = set(model.base_model.model._no_split_modules)
        classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    else:
        classes = {MoPEFTLayer}
    policy = ModuleWrapPolicy(classes)
    return FullyShardedDataParallel(
        model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu")
    )


def run_case(case: str, out: Path, rank: int, world: int) -> None:
    model_name, placement = case.split("-")
    base, model, x, labels = build(model_name)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    reference = copy.deepcopy(model)
    if placement.endswith("_ckpt"):
        for candidate in (reference, model):
            inner = candidate.base_model.model
            # transformers >= 5.23 names it activation_checkpointing_enable (the old name warns).
            (getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable)()
    reference_loss, reference_grads = sgd_step(reference, x, labels)
    reference_state = dict(reference.named_parameters())
    # Every MoPEFT tensor gets a gradient (init_weights=False: every part acts), or the comparison proves little.
    inactive = [n for n in trainable if "mopeft_" in n and not reference_grads.get(n, torch.zeros(1)).abs().max() > 0]

    half = BATCH // world
    rows = slice(rank * half, (rank + 1) * half)
    sharded = shard(model, placement)
    loss, grads = sgd_step(sharded, x[rows], None if labels is None else labels[rows])
    # Gradients relative to each tensor's largest reference gradient: the updates of the deepest parts (the prefix
    # embeddings, ~1e-7 per step) are below float32 resolution of their weights, so weights alone would not show them.
    # MoPEFT tensors only: some of the trained mask decoder's gradients are exactly zero in exact arithmetic (key
    # biases under softmax) and float noise in both runs; its weights are still compared below.
    grad_errors = {
        n: ((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
        for n, g in reference_grads.items()
        if "mopeft_" in n and n in grads
    }
    grad_missing = sorted(set(reference_grads) - set(grads))

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    missing = [n for n in trainable if n not in full]
    differences = {
        n: (full[n].detach().float() - reference_state[n].detach().float()).abs().max().item()
        for n in trainable
        if n in full
    }
    flat = torch.cat([full[n].detach().float().reshape(-1) for n in trainable if n in full])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(gathered[0], other) for other in gathered)

    # Saving: the full state dict (a collective on every rank, kept on rank 0 only with cpu_offload), saved by peft.
    saved = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    target = out / case
    if rank == 0:
        target.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(target / "adapter", state_dict=saved)
        reference.save_pretrained(target / "reference_adapter")
        evaluation = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(2))
        torch.save({"x": evaluation, "outputs": outputs_of(reference, evaluation)}, target / "reference.pt")
    dist.barrier()
    worst = max(differences, key=differences.get) if differences else None
    worst_grad = max(grad_errors, key=grad_errors.get) if grad_errors else None
    report = {
        "loss": loss,
        "reference_loss": reference_loss,
        "max_difference": differences[worst] if worst else None,
        "worst": worst,
        "max_relative_grad_error": grad_errors[worst_grad] if worst_grad else None,
        "worst_grad": worst_grad,
        "compared_grads": len(grad_errors),
        "grad_missing": grad_missing,
        "missing": missing,
        "inactive_in_reference": inactive,
        "identical_across_ranks": identical,
        "trainable": len(trainable),
    }
    (target / f"rank{rank}.json").write_text(json.dumps(report, indent=1))


def main() -> None:
    out = Path(sys.argv[1])
    cases = sys.argv[2:] or CASES
    torch.set_num_threads(1)
    # A short timeout: a case that fails on one rank only must not leave the other waiting for 30 minutes.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for case in cases:
            try:
                start = time.perf_counter()
                run_case(case, out, rank, world)
                if rank == 0:
                    print(f"{case}: {time.perf_counter() - start:.1f} s", flush=True)
            except Exception as error:  # reported per case; the other cases still run
                (out / case).mkdir(parents=True, exist_ok=True)
                (out / case / f"rank{rank}.json").write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
                dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
