"""List the trained models that ship with kfcn, with their model cards.

    kfcn presets                       one line per preset: name, classes, val mean IU, size
    kfcn presets camvid_fcn8s_mobilenetv2 [--json]   the whole model card

A preset name works wherever the command takes a model path: `kfcn predict
--model camvid_fcn8s_mobilenetv2 ...`, `kfcn evaluate`, `kfcn export`, and
`kfcn train --init_from`. In Python: `kfcn.from_preset(name)`,
`kfcn.list_presets()`. Reads JSON only (no TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import os

from kfcn.cli.args import add_bool
from kfcn.cli.errors import UsageError

HELP = "List the shipped trained models (presets) and their model cards."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `kfcn presets`."""
    parser.add_argument("name", nargs="?", help="Show this preset's whole model card.")
    add_bool(parser, "json", False, "Print the card(s) as JSON")


def _size_mb(name: str) -> float:
    from kfcn import presets

    return presets.folder_bytes(os.path.join(presets.PRESET_DIR, name)) / 1e6


def _scores_text(block: dict, modes: tuple[str, ...], indent: str) -> list[str]:
    lines = []
    for mode in modes:
        scores = block.get(mode)
        if scores:
            lines.append(
                f"{indent}{mode}: mean IU {100 * scores['mean_iou']:.2f} %, pixel accuracy "
                f"{100 * scores['pixel_accuracy']:.2f} %, mean accuracy "
                f"{100 * scores['mean_accuracy']:.2f} %"
            )
            if "command" in scores:
                lines.append(f"{indent}  ({scores['command']})")
    return lines


def _card_text(name: str, card: dict) -> str:
    training, validation = card.get("training", {}), card.get("validation", {})
    names = card.get("class_info", {}).get("names", [])
    lines = [
        f"{name}: {card.get('description', '')}",
        f"  architecture: {card.get('architecture', '')}",
        f"  classes ({len(names)}): {', '.join(names)}",
        f"  input: {card.get('input', '')}",
        f"  trained with: {training.get('command', '')}",
        f"  data: {training.get('data', '')}",
        f"  training: {training.get('steps')} steps, {training.get('wall_clock_minutes')} min "
        f"wall clock on {training.get('machine', '')} ({training.get('date', '')})",
        f"  validation: {validation.get('data', '')}",
    ]
    scale = card.get("input_scale", 1.0)
    if scale != 1.0:
        lines.insert(
            4,
            f"  input scale: {scale:g} (the net runs at {scale:g}x each image's height and "
            "width, logits resized back; --input_scale 1.0 for the plain net)",
        )
    adjustment = card.get("logit_adjustment")
    if adjustment:
        lines.insert(
            4,
            f"  logit adjustment: tau {adjustment.get('tau')} (score_adjust adds -tau * log w for "
            f"the training class weights w: {adjustment.get('class_weighting', '')})",
        )
    lines += _scores_text(validation, ("whole", "flip", "scale_flip", "msflip"), "    ")
    native = validation.get("native")
    if native:
        lines.append(f"    at input scale 1 ({native.get('command', '')}):")
        lines += _scores_text(native, ("whole", "flip"), "      ")
    weights = card.get("weights", {})
    lines.append(
        f"  weights: {weights.get('parameters')} parameters, {_size_mb(name):.1f} MB; "
        f"{weights.get('storage', '')}; float16 argmax agreement "
        f"{weights.get('float16_argmax_agreement')}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Prints the presets (or one card)."""
    from kfcn import presets

    if args.name is not None:
        try:
            card = presets.model_card(args.name)
        except presets.PresetError as error:
            raise UsageError(f"name: {error}") from error
        print(json.dumps(card, indent=2) if args.json else _card_text(args.name, card))
        return 0
    cards = presets.list_presets()
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    if not cards:
        print("No presets ship with this kfcn.")
    for name, card in cards.items():
        validation = card.get("validation", {}).get("whole", {})
        classes = len(card.get("class_info", {}).get("names", []))
        print(
            f"{name}  {card.get('architecture', '')}, {classes} classes; val mean IU "
            f"{100 * validation.get('mean_iou', float('nan')):.1f} %; {_size_mb(name):.1f} MB"
        )
    return 0
