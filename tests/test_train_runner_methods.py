# Copyright 2026 The peft-vision-ext authors. Licensed under the Apache License, Version 2.0.
"""`peft-vision train` with the methods tests/test_train_runner.py does not run, on the embedded data: the SAM
presets vpt, vpt_deep and adapter; sequential adapters (alone and with deformable LoRA) on Mask2Former with 1, 2 and 3
adapters per block. Each run must name its method and classes, train exactly what its method trains, and leave an
adapter that reloads onto a freshly loaded checkpoint (plain peft and `load_trained`), predicts what the trained model
predicted and reproduces the validation metric of results.json. Then `--push_to_hub`, offline: the Hub calls of
transformers' Trainer are replaced by a recorder, and what would be uploaded must be a loadable adapter repo with a
model card and no token."""

from __future__ import annotations

import json
import os
import re
import socket
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import peft_vision_ext.train.runner as runner
from peft_vision_ext.train import load_trained, main

from tiny_models import _perturb, make_mask2former, tiny_sam_config


# As in tests/test_train_runner.py.
FAST = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
    "--save_strategy", "no",
]  # fmt: skip
ROCK_CLASSES = {"0": "ground", "1": "rock", "2": "sky"}
ROCK_INSTANCE_CLASSES = {"0": "rock", "1": "boulder"}
SAM_SIZE = 80  # the tiny SAM's encoder input
M2F_SIZE = 64
# With --seed 5 the first two Mars instance scenes of every split hold rocks (at --seed 0 some hold none; those have
# tests of their own below).
M2F_SEED = 5
STAGING = ".peft-vision-train-staging"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A plain transformers SamModel (as SAM's own checkpoints are) and a tiny Mask2Former, saved with
    save_pretrained."""
    from transformers import SamModel

    root = tmp_path_factory.mktemp("train_methods")
    paths = {"root": root, "sam": str(root / "sam"), "m2f": str(root / "m2f")}
    torch.manual_seed(0)
    _perturb(SamModel(tiny_sam_config()), seed=0).save_pretrained(paths["sam"])
    make_mask2former().save_pretrained(paths["m2f"])
    return paths


def _sam_args(checkpoints, method: str, out: str) -> list[str]:
    return [
        "--model_name_or_path", checkpoints["sam"], "--method", method, "--dataset_name", "embedded:rocks/mars",
        "--max_train_samples", "4", "--max_eval_samples", "2", "--image_size", str(SAM_SIZE), "--output_dir", out,
        "--seed", "0", *FAST,
    ]  # fmt: skip


def _m2f_args(checkpoints, method: str, out: str, *, seed: int = M2F_SEED, train: int = 2, evaluate: int = 2):
    return [
        "--task", "instance", "--model_name_or_path", checkpoints["m2f"], "--method", method,
        "--dataset_name", "embedded:rock_instances/mars", "--max_train_samples", str(train),
        "--max_eval_samples", str(evaluate), "--image_size", str(M2F_SIZE), "--output_dir", out, "--seed", str(seed),
        *FAST,
    ]  # fmt: skip


def _train(args: list[str]):
    """``main(args)``, which must succeed; returns results.json and the run's plan, whose model is the trained one."""
    captured = {}
    execute = runner.execute

    def capturing(plan, argv=()):
        captured["plan"] = plan
        return execute(plan, argv)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "execute", capturing)
        assert main(args) == 0
    output_dir = args[args.index("--output_dir") + 1]
    with open(os.path.join(output_dir, "results.json")) as handle:
        return json.load(handle), captured["plan"]


def _outputs(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(pixel_values=pixel_values)
    if getattr(output, "logits", None) is not None:
        return output.logits
    return torch.cat([output.masks_queries_logits.flatten(2), output.class_queries_logits], dim=-1)


def _saved_vs_trainable(out: str, plan, results: dict) -> dict[str, torch.Tensor]:
    """The adapter file holds exactly the trainable tensors of the trained model (named as peft saves them), and
    their count is results.json's."""
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    trainable = {
        re.sub(r"\.(modules_to_save\.)?default(?=\.|$)", "", name): param
        for name, param in plan.model.named_parameters()
        if param.requires_grad
    }
    assert set(trainable) == set(saved)
    count = sum(param.numel() for param in trainable.values())
    assert count == results["trainable_parameters"] == sum(tensor.numel() for tensor in saved.values())
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, trainable[name].detach(), rtol=0, atol=0, msg=name)
    return saved


# ----------------------------------------------------------------------------------------------------------------------
# SAM: the MoPEFT presets vpt, vpt_deep, adapter
# ----------------------------------------------------------------------------------------------------------------------
# What each preset trains in the two blocks of the tiny SAM encoder, besides the mask decoder.
SAM_PRESETS = {
    "vpt": {"prefix_embedding": {0}, "prefix_hidden": {0}, "prefix_out": {0}},  # VPT-shallow: the first block
    "vpt_deep": {"prefix_embedding": {0, 1}, "prefix_hidden": {0, 1}, "prefix_out": {0, 1}},
    "adapter": {"adapter_down": {0, 1}, "adapter_up": {0, 1}},
}
SAM_CONFIGS = {
    "vpt": {"use_lora": False, "use_prefix": True, "use_adapter": False, "gating": False, "prefix_depth": "shallow"},
    "vpt_deep": {"use_lora": False, "use_prefix": True, "use_adapter": False, "gating": False, "prefix_depth": "deep"},
    "adapter": {"use_lora": False, "use_prefix": False, "use_adapter": True, "gating": False},
}
SAM_TENSOR = re.compile(r"base_model\.model\.vision_encoder\.layers\.(\d+)\.mopeft_(\w+?)(?:\.(?:weight|bias))?")


@pytest.mark.parametrize("method", list(SAM_PRESETS))
def test_sam_preset_trains_reloads_and_reproduces(checkpoints, method):
    from peft import PeftModel
    from transformers import AutoModelForSemanticSegmentation

    from peft_vision_ext.adaptation import evaluate_segmentation
    from peft_vision_ext.data import collate_segmentation, load_rock_dataset
    from peft_vision_ext.data.fixed_size import FixedSizeSegmentationTransform

    out = str(checkpoints["root"] / f"sam_{method}")
    results, plan = _train(_sam_args(checkpoints, method, out))
    assert results["method"] == method and results["model_class"] == "SamForSemanticSegmentation"
    assert results["id2label"] == ROCK_CLASSES and results["id2label_from"] == "the dataset"
    assert set(results["validation"]["per_class_iou"]) == set(ROCK_CLASSES.values())
    assert results["image_size"] == SAM_SIZE and results["data"]["validation_samples"] == 2
    config = results["peft_config"]
    assert config["peft_type"].startswith("MOPEFT") and config["modules_to_save"] == ["mask_decoder"]
    assert {key: config[key] for key in SAM_CONFIGS[method]} == SAM_CONFIGS[method]
    saved_config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert {key: saved_config[key] for key in SAM_CONFIGS[method]} == SAM_CONFIGS[method]

    # trained: the preset's tensors in the expected blocks, and the whole mask decoder; nothing else
    saved = _saved_vs_trainable(out, plan, results)
    kinds, decoder = defaultdict(set), 0
    for name, tensor in saved.items():
        if name.startswith("base_model.model.mask_decoder."):
            decoder += tensor.numel()
            continue
        match = SAM_TENSOR.fullmatch(name)
        assert match, f"{method} trains {name}"
        kinds[match.group(2)].add(int(match.group(1)))
    assert dict(kinds) == SAM_PRESETS[method]
    mask_decoder = plan.model.get_base_model().mask_decoder.original_module
    assert decoder == sum(param.numel() for param in mask_decoder.parameters())
    if method == "adapter":  # zero-initialised up-projections: the steps reached them
        assert all(saved[name].abs().sum() > 0 for name in saved if "mopeft_adapter_up" in name)

    # reloaded onto a freshly loaded checkpoint, the plain peft way and with load_trained
    id2label = {int(k): v for k, v in results["id2label"].items()}
    base = AutoModelForSemanticSegmentation.from_pretrained(
        checkpoints["sam"], id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    reloaded = PeftModel.from_pretrained(base, out).eval()
    transform = FixedSizeSegmentationTransform(results["image_size"], results["image_mean"], results["image_std"])
    data = load_rock_dataset("mars", "validation", 2, SAM_SIZE, seed=0).with_transform(transform)
    pixels = collate_segmentation([data[i] for i in range(len(data))])["pixel_values"]
    expected = _outputs(plan.model.eval(), pixels)
    torch.testing.assert_close(_outputs(reloaded, pixels), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_outputs(load_trained(out), pixels), expected, rtol=0, atol=1e-5)
    metrics = evaluate_segmentation(reloaded, data, len(id2label), batch_size=4, ignore_index=255, id2label=id2label)
    assert metrics["mean_iou"] == pytest.approx(results["validation"]["mean_iou"], abs=1e-5)
    for name, value in results["validation"]["per_class_iou"].items():
        assert metrics[f"iou_{name}"] == pytest.approx(value, abs=1e-5), name


# ----------------------------------------------------------------------------------------------------------------------
# Mask2Former: sequential adapters, alone and with deformable LoRA, 1-3 per block
# ----------------------------------------------------------------------------------------------------------------------
M2F_BLOCK = re.compile(
    r"model\.pixel_level_module\.encoder\.(?:\w+\.)*?layers\.\d+\.blocks\.\d+"  # Swin backbone
    r"|model\.pixel_level_module\.decoder\.encoder\.layers\.\d+"  # pixel-decoder encoder (deformable attention)
    r"|model\.transformer_module\.decoder\.layers\.\d+"  # masked-attention decoder (has cross-attention)
)
M2F_TENSOR = re.compile(
    rf"base_model\.model\.(?P<block>{M2F_BLOCK.pattern})\."
    r"(?:(?P<sublayer>\w+)\.iseg_adapter_(?:down|up)\.(?:weight|bias)"
    r"|self_attn\.(?:base_layer\.)?(?P<projection>\w+)\.iseg_lora_[AB])"
)
SUBLAYER = {"attention": "self", "self_attn": "self", "cross_attn": "cross", "mlp": "ffn", "fc2": "ffn"}
PLACEMENT = {1: {"ffn"}, 2: {"self", "ffn"}, 3: {"self", "cross", "ffn"}}  # SeqAdapterConfig.adapters_per_block
DEFORMABLE_PROJECTIONS = {"value_proj", "output_proj", "sampling_offsets", "attention_weights"}
# About 10 s of CPU each: one (the default combination) in the default run, the others slow.
M2F_CASES = [
    pytest.param("deform_lora+seq_adapter", 2, id="deform_lora+seq_adapter-2"),
    pytest.param("seq_adapter", 3, id="seq_adapter-3", marks=pytest.mark.slow),
    pytest.param("deform_lora+seq_adapter", 1, id="deform_lora+seq_adapter-1", marks=pytest.mark.slow),
    pytest.param("deform_lora+seq_adapter", 3, id="deform_lora+seq_adapter-3", marks=pytest.mark.slow),
    pytest.param("seq_adapter", 1, id="seq_adapter-1", marks=pytest.mark.slow),
    pytest.param("seq_adapter", 2, id="seq_adapter-2", marks=pytest.mark.slow),
]


def _same_ap(reproduced: float | None, logged: float | None) -> bool:
    """results.json writes pycocotools' -1 (undefined) as None."""
    reproduced = None if reproduced is None or reproduced < 0 else float(reproduced)
    if reproduced is None or logged is None:
        return reproduced is logged
    return abs(reproduced - logged) <= 1e-5


@pytest.mark.parametrize("method, per_block", M2F_CASES)
def test_mask2former_adapters_train_reload_and_reproduce(checkpoints, method, per_block):
    from peft import PeftModel
    from torch.utils.data import DataLoader
    from transformers import Mask2FormerForUniversalSegmentation

    from peft_vision_ext.data import collate_instance_segmentation, load_rock_instance_dataset
    from peft_vision_ext.data.fixed_size import FixedSizeInstanceTransform
    from peft_vision_ext.metrics import evaluate_instance_segmentation

    out = str(checkpoints["root"] / f"m2f_{method.replace('+', '_')}_{per_block}")
    args = _m2f_args(checkpoints, method, out) + ["--adapters_per_block", str(per_block)]
    results, plan = _train(args)
    assert results["task"] == "instance" and results["method"] == method
    assert results["id2label"] == ROCK_INSTANCE_CLASSES and results["id2label_from"] == "the dataset"
    assert set(results["validation"]["per_class_ap"]) == set(ROCK_INSTANCE_CLASSES.values())
    assert results["validation"]["num_images"] == 2 and results["validation"]["loss"] > 0
    config = results["peft_config"]
    assert config["adapters_per_block"] == per_block and config["modules_to_save"] == ["class_predictor"]
    assert config["peft_type"].startswith("DEFORM" if "deform" in method else "SEQ")

    # trained: the adapters where adapters_per_block puts them in every block, deformable LoRA on every projection of
    # the pixel decoder's deformable attention (with deform_lora), the class head; nothing else
    saved = _saved_vs_trainable(out, plan, results)
    adapters, lora, head = defaultdict(set), defaultdict(set), set()
    for name in saved:
        if name.startswith("base_model.model.class_predictor."):
            head.add(name)
            continue
        match = M2F_TENSOR.fullmatch(name)
        assert match, f"{method} trains {name}"
        if match["sublayer"]:
            adapters[match["block"]].add(SUBLAYER[match["sublayer"]])
        else:
            lora[match["block"]].add(match["projection"])
    assert head == {"base_model.model.class_predictor.weight", "base_model.model.class_predictor.bias"}
    base_model = plan.model.get_base_model()
    blocks = [name for name, _ in base_model.named_modules() if M2F_BLOCK.fullmatch(name)]
    assert len(blocks) == 8  # 4 Swin blocks, 2 pixel-decoder layers, 2 decoder layers
    for block in blocks:
        has_cross = block.startswith("model.transformer_module.")
        assert adapters[block] == PLACEMENT[per_block] - (set() if has_cross else {"cross"}), block
    assert set(adapters) == set(blocks)
    deformable = [block for block in blocks if ".pixel_level_module.decoder." in block]
    assert dict(lora) == ({block: DEFORMABLE_PROJECTIONS for block in deformable} if "deform" in method else {})
    for name, tensor in saved.items():  # zero-initialised: the steps reached them
        if "iseg_adapter_up" in name or "iseg_lora_B" in name:
            assert tensor.abs().sum() > 0, name

    # reloaded onto a freshly loaded checkpoint, the plain peft way and with load_trained
    id2label = {int(k): v for k, v in results["id2label"].items()}
    base = Mask2FormerForUniversalSegmentation.from_pretrained(
        checkpoints["m2f"],
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        ignore_mismatched_sizes=True,  # 3 classes in the checkpoint, 2 in the data
    )
    reloaded = PeftModel.from_pretrained(base, out).eval()
    transform = FixedSizeInstanceTransform(results["image_size"], results["image_mean"], results["image_std"])
    data = load_rock_instance_dataset("mars", "validation", 2, M2F_SIZE, seed=M2F_SEED).with_transform(transform)
    pixels = collate_instance_segmentation([data[i] for i in range(len(data))])["pixel_values"]
    expected = _outputs(plan.model.eval(), pixels)
    torch.testing.assert_close(_outputs(reloaded, pixels), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_outputs(load_trained(out), pixels), expected, rtol=0, atol=1e-5)
    # mask AP of a 2-step model is no signal (0 here); the outputs above are
    loader = DataLoader(data, batch_size=4, collate_fn=collate_instance_segmentation)
    ap = evaluate_instance_segmentation(reloaded, loader, id2label)
    logged = results["validation"]
    for key in ("map", "map_50", "map_75", "mar_100"):
        assert _same_ap(ap[key], logged[key]), (key, ap[key], logged[key])
    for name, value in logged["per_class_ap"].items():
        assert _same_ap(ap["map_per_class"][name], value), (name, ap["map_per_class"][name], value)


# ----------------------------------------------------------------------------------------------------------------------
# Instance images without instances
# ----------------------------------------------------------------------------------------------------------------------
def test_an_image_without_instances_gives_empty_targets():
    """FixedSizeInstanceTransform once reshaped the (0, size, size) mask stack with ``reshape(0, -1)``, which numpy
    refuses ('cannot reshape array of size 0 into shape (0,newaxis)')."""
    from peft_vision_ext.data.fixed_size import FixedSizeInstanceTransform

    example = {
        "image": Image.fromarray(np.full((20, 24, 3), 90, np.uint8)),
        "instance_map": Image.fromarray(np.zeros((20, 24), np.uint8)),
        "instance_classes": [],
    }
    pixel_values, masks, classes = FixedSizeInstanceTransform(32).example(example)
    assert pixel_values.shape == (3, 32, 32) and masks.shape == (0, 32, 32) and classes.shape == (0,)


def test_an_image_without_instances_in_the_embedded_data_trains(checkpoints):
    """With --seed 0 the third Mars training scene and the first test scene hold no rock (the embedded instance data
    has such scenes at most seeds)."""
    out = str(checkpoints["root"] / "m2f_empty_image")
    results, _ = _train(_m2f_args(checkpoints, "deform_lora", out, seed=0, train=3, evaluate=2))
    assert results["data"]["instances"]["train"] == 17 and results["test"]["num_images"] == 2


def test_a_test_split_without_instances_is_refused_before_training(checkpoints, capsys):
    """Nothing to score: refused up front in one line (before, evaluation raised after training, losing the run)."""
    out = str(checkpoints["root"] / "m2f_empty_test")
    args = _m2f_args(checkpoints, "deform_lora", out, seed=0, train=3, evaluate=1)  # test: one scene, no rock
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "The test data holds no instance with pixels" in err and "raise --max_eval_samples" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(out)


# ----------------------------------------------------------------------------------------------------------------------
# --push_to_hub, offline
# ----------------------------------------------------------------------------------------------------------------------
TOKEN = "hf_NotARealTokenButSecret42"
HUB_ID = "tester/rocks-vpt"


class RecordingHub:
    """Stands in for transformers' shared ``HfApi`` (``transformers.trainer.hf_api()``): Trainer calls
    ``create_repo`` (``init_hf_repo``, from ``Trainer.__init__`` when ``push_to_hub``) and ``upload_folder``
    (``Trainer.push_to_hub``). Each upload keeps a copy of the files huggingface_hub would send (its own
    ``filter_repo_objects`` with the caller's ``ignore_patterns`` and the default ones) and is applied to a model of
    the remote repo (``upload_folder`` adds and replaces files, it deletes none)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos: list[dict] = []
        self.uploads: list[dict] = []
        self.remote = root / "remote"

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        from huggingface_hub import RepoUrl

        self.repos.append({"repo_id": repo_id, "token": token, "private": private, "exist_ok": exist_ok, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        import shutil

        from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(folder_path)
        files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.glob("**/*")) if path.is_file()}
        kept = list(filter_repo_objects(files, ignore_patterns=[*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS]))
        snapshot = self.root / f"upload_{len(self.uploads)}"
        for name in kept:
            for target in (snapshot / name, self.remote / name):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(files[name], target)
        self.uploads.append({"repo_id": repo_id, "files": kept, "snapshot": snapshot, **kwargs})
        return "recorded-commit"


@pytest.fixture(scope="module")
def pushed(checkpoints):
    """One `--push_to_hub` run with the Hub replaced by a :class:`RecordingHub` and every socket connection
    refused (and recorded)."""
    import transformers.trainer

    root = checkpoints["root"] / "hub"
    root.mkdir()
    hub = RecordingHub(root)
    connections = []

    def refuse(*args, **kwargs):
        connections.append(args)
        raise OSError("a test tried to reach the network")

    out = str(checkpoints["root"] / "pushed")
    args = _sam_args(checkpoints, "vpt", out)
    args += ["--push_to_hub", "--hub_model_id", HUB_ID, "--hub_token", TOKEN, "--hub_private_repo", "true"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.trainer, "hf_api", lambda: hub)
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        results, _ = _train(args)
    return out, results, hub, connections


def test_push_to_hub_uploads_a_loadable_adapter_repo(checkpoints, pushed):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    from peft_vision_ext.adaptation import evaluate_segmentation
    from peft_vision_ext.data import load_rock_dataset
    from peft_vision_ext.data.fixed_size import FixedSizeSegmentationTransform

    out, results, hub, connections = pushed
    assert connections == []
    assert hub.repos == [{"repo_id": HUB_ID, "token": TOKEN, "private": True, "exist_ok": True}]
    final = hub.uploads[-1]
    assert final["repo_id"] == HUB_ID and final["token"] == TOKEN
    assert final["commit_message"] == "peft-vision train --method vpt"
    files = set(final["files"])
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "preprocessor_config.json"} <= files
    assert not [name for name in files if name.startswith(("checkpoint-", "merged/", "ranked/"))]
    repo = final["snapshot"]

    # a loadable adapter repo: the adapter onto a fresh checkpoint reproduces the logged metric
    id2label = {int(k): v for k, v in results["id2label"].items()}
    base = AutoModelForSemanticSegmentation.from_pretrained(
        checkpoints["sam"], id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    model = PeftModel.from_pretrained(base, str(repo)).eval()
    processor = AutoImageProcessor.from_pretrained(str(repo))
    assert processor.size == {"height": SAM_SIZE, "width": SAM_SIZE}
    assert list(processor.image_mean) == results["image_mean"] and list(processor.image_std) == results["image_std"]
    transform = FixedSizeSegmentationTransform(SAM_SIZE, processor.image_mean, processor.image_std)
    data = load_rock_dataset("mars", "validation", 2, SAM_SIZE, seed=0).with_transform(transform)
    metrics = evaluate_segmentation(model, data, len(id2label), batch_size=4, ignore_index=255, id2label=id2label)
    assert metrics["mean_iou"] == pytest.approx(results["validation"]["mean_iou"], abs=1e-5)

    # the model card: peft's, with the metrics as model-index; the local checkpoint is no `base_model`
    card = ModelCard.load(repo / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-segmentation"
    assert "peft-vision-ext" in card.data.tags
    assert card.data.get("base_model") is None and "base_model omitted" in card.text
    assert not [tag for tag in card.data.tags if tag.startswith("base_model:")]
    assert checkpoints["sam"] not in (repo / "README.md").read_text()
    logged = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert logged["mean_iou"] == pytest.approx(results["validation"]["mean_iou"], abs=1e-9)
    for name, value in results["validation"]["per_class_iou"].items():
        assert logged[f"iou_{name}"] == pytest.approx(value, abs=1e-9)
    assert (repo / "README.md").read_text() == open(os.path.join(out, "README.md")).read()

    # the token: hidden in results.json (local and uploaded) and absent from every card
    assert results["arguments"]["training"]["hub_token"] == "<hidden>"
    command = results["command"]
    assert command[command.index("--hub_token") + 1] == "<hidden>"
    texts = [Path(out, "results.json"), Path(out, "README.md"), repo / "results.json"]
    texts += [upload["snapshot"] / "README.md" for upload in hub.uploads]
    for path in texts:
        assert TOKEN not in path.read_text(), path


def test_push_to_hub_uploads_no_file_holding_the_token(pushed):
    _, _, hub, _ = pushed
    holding = [
        f"upload {index}: {name}"
        for index, upload in enumerate(hub.uploads)
        for name in upload["files"]
        if TOKEN.encode() in (upload["snapshot"] / name).read_bytes()
    ]
    assert holding == []


def test_push_to_hub_pushes_the_finished_repo_once(pushed):
    _, _, hub, _ = pushed
    staged = [name for upload in hub.uploads for name in upload["files"] if name.startswith(STAGING)]
    remote = sorted(path.relative_to(hub.remote).as_posix() for path in hub.remote.glob("**/*") if path.is_file())
    assert staged == [] and not [name for name in remote if name.startswith(STAGING)]
    assert [upload["commit_message"] for upload in hub.uploads] == ["peft-vision train --method vpt"]
