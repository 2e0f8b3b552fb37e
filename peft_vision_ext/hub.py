# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""Model cards for adapter directories.

``PeftModel.save_pretrained`` writes ``README.md`` with ``library_name: peft`` and the base model, then saves each
adapter's config. Our configs' ``save_pretrained`` calls :func:`update_model_card`, which adds the method, the task and
a usage snippet; recipes call it again with the measured metrics. The directory is exactly what ``push_to_hub``
uploads.

The card's metadata follows the Hub's rules: ``pipeline_tag`` is the task of the adapted model class
(:func:`pipeline_tag_for`; omitted when unknown), and ``base_model`` is a Hub repo id (:func:`hub_model_id`) or absent,
with a comment in the card text, when the base model was loaded from a local path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ._files import atomic_file


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


# Hub pipeline tags (https://huggingface.co/tasks) of the model classes in transformers' auto mappings, most specific
# first (Grounding DINO is zero-shot detection; SamModel, mask generation; bare vision encoders, feature extraction).
_TASK_MAPPINGS = (
    ("MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES", "zero-shot-object-detection"),
    ("MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES", "object-detection"),
    ("MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES", "image-segmentation"),
    ("MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES", "image-segmentation"),
    ("MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES", "image-segmentation"),
    ("MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES", "image-segmentation"),
    ("MODEL_FOR_MASK_GENERATION_MAPPING_NAMES", "mask-generation"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification"),
    ("MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES", "depth-estimation"),
    ("MODEL_FOR_IMAGE_MAPPING_NAMES", "image-feature-extraction"),
    ("MODEL_FOR_BACKBONE_MAPPING_NAMES", "image-feature-extraction"),
)
# Classes outside those mappings (this package's own models, remote code): by the ending of the class name.
_TASK_SUFFIXES = (
    ("ForObjectDetection", "object-detection"),
    ("ForSemanticSegmentation", "image-segmentation"),
    ("ForUniversalSegmentation", "image-segmentation"),
    ("ForInstanceSegmentation", "image-segmentation"),
    ("ForPanopticSegmentation", "image-segmentation"),
    ("ForImageClassification", "image-classification"),
    ("Backbone", "image-feature-extraction"),
)
PIPELINE_TAGS = frozenset(tag for _, tag in _TASK_MAPPINGS + _TASK_SUFFIXES)
# Marks the comment that says why `base_model` is missing (found again, and replaced, on every update).
_LOCAL_BASE_MARK = "<!-- base_model omitted:"
_LOCAL_BASE_COMMENT = (
    f"{_LOCAL_BASE_MARK} the base model was loaded from a local path, which is not a Hugging Face Hub model id "
    "(adapter_config.json records it as `base_model_name_or_path`). If that checkpoint is a copy of a Hub model, add "
    "`base_model: <namespace>/<name>` to the metadata above, so that the Hub links this adapter to it. -->"
)
# A snapshot in the Hub cache: .../models--<namespace>--<name>/snapshots/<revision>
_CACHE_SNAPSHOT = re.compile(r"(?:^|[\\/])models--([^\\/]+)[\\/]snapshots(?:[\\/]|$)")


def pipeline_tag_for(class_name: str | None) -> str | None:
    """The Hub pipeline tag of a model class (by name), or None when it is unknown: the task of transformers' auto
    mapping that lists the class, else the one its name's ending implies (``*ForObjectDetection`` ->
    ``object-detection``, ``*ForSemanticSegmentation`` -> ``image-segmentation``, ``*Backbone`` ->
    ``image-feature-extraction``, ...)."""
    if not class_name:
        return None
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - transformers is a dependency
        modeling_auto = None
    for mapping_name, tag in _TASK_MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name, None)
        if not isinstance(mapping, Mapping):
            continue  # renamed in another transformers version: the suffix rules below still apply
        for value in mapping.values():
            if class_name == value or (isinstance(value, (tuple, list)) and class_name in value):
                return tag
    return next((tag for suffix, tag in _TASK_SUFFIXES if class_name.endswith(suffix)), None)


def hub_model_id(name_or_path: Any) -> str | None:
    """The Hub repo id a ``base_model_name_or_path`` stands for, or None for a local path (absolute, relative and
    existing, or not a valid repo id) or no name. A snapshot in the Hub cache (``.../models--org--name/snapshots/...``)
    stands for its repo id."""
    if not isinstance(name_or_path, str) or not name_or_path:
        return None
    snapshot = _CACHE_SNAPSHOT.search(name_or_path)
    if snapshot:
        candidate = snapshot.group(1).replace("--", "/")
    elif (
        os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or "\\" in name_or_path
        or os.path.exists(name_or_path)
    ):
        return None
    else:
        candidate = name_or_path
    try:
        validate_repo_id(candidate)
    except HFValidationError:
        return None
    return candidate


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _base_config_architecture(name_or_path: str | None) -> str | None:
    """The first ``architectures`` entry of the base model's ``config.json``: in the local directory, or in the local
    Hub cache (never downloaded)."""
    if not name_or_path:
        return None
    path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(path):
        repo_id = hub_model_id(name_or_path)
        if repo_id is None:
            return None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
        if not isinstance(cached, str):
            return None
        path = cached
    architectures = _read_json(path).get("architectures")
    return architectures[0] if isinstance(architectures, list) and architectures else None


def base_model_class(directory: str | os.PathLike, config: Any | None = None) -> str | None:
    """The class name of the adapted base model: peft's ``auto_mapping`` (on the config object, or in the
    ``adapter_config.json`` that ``save_pretrained`` wrote to ``directory``), else the ``architectures`` of the base
    model's own ``config.json`` (a local directory, or the local Hub cache)."""
    saved = _read_json(os.path.join(os.fspath(directory), "adapter_config.json"))
    for auto_mapping in (getattr(config, "auto_mapping", None), saved.get("auto_mapping")):
        if isinstance(auto_mapping, Mapping) and isinstance(auto_mapping.get("base_model_class"), str):
            return auto_mapping["base_model_class"]
    name = getattr(config, "base_model_name_or_path", None) or saved.get("base_model_name_or_path")
    return _base_config_architecture(name if isinstance(name, str) else None)


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
    model_name: str | None = None,
) -> ModelCard:
    """Create or update ``directory/README.md`` with our method's metadata, and metrics when they are known.

    Args:
        directory: the adapter directory (the one ``save_pretrained`` wrote).
        method: our method name, e.g. ``"conv_adapter"``; becomes a tag.
        config: the adapter config. Its ``base_model_name_or_path`` (else the one in ``directory``'s
            ``adapter_config.json``, else the card's) becomes ``base_model`` when it is a Hub repo id; a local path is
            left out, with a comment in the card text saying why.
        metrics: name → value, e.g. ``{"mean_iou": 0.71, "balanced_accuracy": 0.83}``; written as a ``model-index``
            entry (Hub evaluation results) and as a table.
        dataset_name / dataset_type: the evaluation data set, required by the Hub's ``model-index`` format.
        model_name: the name the ``model-index`` entry gives the model when the card has none; default: the
            directory's name. Pass it when ``directory`` is a temporary one (see ``atomic_directory``).

    ``pipeline_tag`` (and a tag of the same name) is the task of the adapted model class (:func:`base_model_class`,
    :func:`pipeline_tag_for`): ``object-detection`` for a ``*ForObjectDetection`` head, ``image-segmentation`` for
    semantic/universal/instance segmentation, ``image-feature-extraction`` for a bare vision encoder or backbone. When
    the class or its task is unknown, no tag is invented (a tag already on the card stays).

    The card is replaced in one step (temporary file and rename): an interruption leaves the old card or the new one.
    """
    path = os.path.join(os.fspath(directory), "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    data = card.data
    data.library_name = "peft"
    task = pipeline_tag_for(base_model_class(directory, config))
    if task is not None:
        data.pipeline_tag = task

    saved = _read_json(os.path.join(os.fspath(directory), "adapter_config.json"))
    recorded = getattr(config, "base_model_name_or_path", None) or saved.get("base_model_name_or_path")
    # Else the card's own: peft's card takes it from the model's config (`_name_or_path`), a user may list several.
    card_bases = data.base_model if isinstance(data.base_model, list) else [data.base_model]
    names = [recorded] if recorded else [name for name in card_bases if name]
    bases = [base for base in map(hub_model_id, names) if base is not None]
    data.base_model = (bases[0] if len(bases) == 1 else bases) or None
    local_base = len(bases) < len(names)

    tags = set()
    for tag in data.tags or []:
        if tag.startswith("base_model:"):
            # peft tags "base_model:adapter:<name_or_path>", also for an empty name or a local path: keep Hub ids
            if hub_model_id(tag.rpartition(":")[2]) is None:
                continue
        elif task is not None and tag in PIPELINE_TAGS and tag != task:
            continue  # a stale task tag (earlier versions wrote "image-segmentation" for every model)
        tags.add(tag)
    tags.update({"peft-vision-ext", method.replace("_", "-")})
    if task is not None:
        tags.add(task)
    data.tags = sorted(tags)

    text = "\n".join(line for line in card.text.splitlines() if not line.startswith(_LOCAL_BASE_MARK))
    if local_base:
        text = f"{_LOCAL_BASE_COMMENT}\n\n{text.lstrip()}"
    if _USAGE_HEADING not in text:
        title = METHOD_TITLES.get(method, method)
        text = text.rstrip() + f"\n\n# {title}\n\n" + _usage_text(method)

    if metrics:
        results = [
            EvalResult(
                task_type=data.pipeline_tag or "other",
                dataset_type=dataset_type or dataset_name or "custom",
                dataset_name=dataset_name or "custom",
                metric_type=name,
                metric_value=float(value),
            )
            for name, value in metrics.items()
        ]
        data.eval_results = results
        data.model_name = data.model_name or model_name or os.path.basename(os.path.abspath(os.fspath(directory)))
        table = "\n".join(f"| {name} | {float(value):.4f} |" for name, value in metrics.items())
        heading = "## Evaluation results"
        text = text.split(heading)[0].rstrip() + f"\n\n{heading}\n\n| metric | value |\n|---|---|\n{table}\n"
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{text.lstrip()}")
    with atomic_file(path) as temporary:
        card.save(temporary)
    return card
