# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Model cards for adapter directories.

``PeftModel.save_pretrained`` writes ``README.md`` with ``library_name: peft`` and the base model, then saves each
adapter's config. Our configs' ``save_pretrained`` calls :func:`update_model_card`, which adds the method, the task and
a usage snippet; recipes call it again with the measured metrics. The directory is exactly what ``push_to_hub``
uploads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData


METHOD_TITLES = {
    "conv_adapter": "Fusable conv adapters (BN + 1x1 conv), peft-vision-ext",
    "mopeft": "MoPEFT: gated mixture of LoRA, prefix tuning and adapters, peft-vision-ext",
    "deform_lora": "LoRA on multi-scale deformable attention, peft-vision-ext",
    "seq_adapter": "Sequential bottleneck adapters in transformer blocks, peft-vision-ext",
}
_USAGE_HEADING = "## How to load this adapter"
_MERGE_LINES = {
    "conv_adapter": "fused = model.merge_and_unload()  # conv adapters fold into the convs: the base model's cost again\n",
    "mopeft": (
        "# LoRA without input-dependent gates merges exactly; prune gated parts first (peft_vision_ext.prune_mopeft)\n"
    ),
    "deform_lora": "merged = model.merge_and_unload()  # LoRA folds into the projections (not sequential adapters)\n",
    "seq_adapter": "# sequential adapters are non-linear: they do not merge; keep the PeftModel for inference\n",
}


def _usage_text(method: str) -> str:
    return (
        f"{_USAGE_HEADING}\n\n"
        f"This is a `{method}` adapter from [peft-vision-ext](https://pypi.org/project/peft-vision-ext/). "
        "Import the package before loading it; that registers the method with peft:\n\n"
        "```python\n"
        "import peft_vision_ext  # registers the method with peft\n"
        "from peft import PeftModel\n\n"
        "model = PeftModel.from_pretrained(base_model, path_or_repo_id)\n" + _MERGE_LINES.get(method, "") + "```\n"
    )


def update_model_card(
    directory: str | os.PathLike,
    *,
    method: str,
    config: Any | None = None,
    metrics: Mapping[str, float] | None = None,
    dataset_name: str | None = None,
    dataset_type: str | None = None,
) -> ModelCard:
    """Create or update ``directory/README.md`` with our method's metadata, and metrics when they are known.

    Args:
        directory: the adapter directory (the one ``save_pretrained`` wrote).
        method: our method name, e.g. ``"conv_adapter"``; becomes a tag.
        config: the adapter config; its base model name is recorded if the card lacks one.
        metrics: name → value, e.g. ``{"mean_iou": 0.71, "balanced_accuracy": 0.83}``; written as a ``model-index``
            entry (Hub evaluation results) and as a table.
        dataset_name / dataset_type: the evaluation data set, required by the Hub's ``model-index`` format.
    """
    path = os.path.join(os.fspath(directory), "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    data = card.data
    data.library_name = "peft"
    data.pipeline_tag = "image-segmentation"
    # peft tags "base_model:adapter:<name>" even when the base has no name; an empty one is noise on the Hub.
    tags = {tag for tag in (data.tags or []) if not tag.endswith(":")}
    tags.update({"peft-vision-ext", method.replace("_", "-"), "image-segmentation"})
    data.tags = sorted(tags)
    base = getattr(config, "base_model_name_or_path", None)
    if base and not data.base_model:
        data.base_model = base
    if not data.base_model:
        data.base_model = None

    text = card.text
    if _USAGE_HEADING not in text:
        title = METHOD_TITLES.get(method, method)
        text = text.rstrip() + f"\n\n# {title}\n\n" + _usage_text(method)

    if metrics:
        results = [
            EvalResult(
                task_type="image-segmentation",
                dataset_type=dataset_type or dataset_name or "custom",
                dataset_name=dataset_name or "custom",
                metric_type=name,
                metric_value=float(value),
            )
            for name, value in metrics.items()
        ]
        data.eval_results = results
        data.model_name = data.model_name or os.path.basename(os.path.abspath(os.fspath(directory)))
        table = "\n".join(f"| {name} | {float(value):.4f} |" for name, value in metrics.items())
        heading = "## Evaluation results"
        text = text.split(heading)[0].rstrip() + f"\n\n{heading}\n\n| metric | value |\n|---|---|\n{table}\n"
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{text.lstrip()}")
    card.save(path)
    return card
