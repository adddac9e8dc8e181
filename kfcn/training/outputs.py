"""Which label each model output is trained on, with what weight, and how a run is scored.

The contract between models and the training loop (PLAN.md, "Models"):

- a model returns a logits tensor, or a dict of them. Keys are task names
  ("sem", "geo" of SIFT Flow's two-task FCN) and auxiliary outputs "aux_<key>";
  a single-task model with an auxiliary head returns {"logits", "aux_logits"}.
- a tensor label is compared with every output; a dict label `labels[k]` with
  output `k` and with `aux_k`.
- the loss is the weighted sum over outputs, each output's per-pixel
  cross-entropy normalised on its own (by the valid pixels of the global batch):
  weight 1 (or `task_loss_weights[k]`) for a main output, `aux_loss_weight` for
  an auxiliary one (0.4 as mmsegmentation's FCN configs; torchvision's FCN
  reference uses 0.5).
- validation and evaluation see the inference outputs only: auxiliary outputs
  are dropped (`inference_outputs`), as `kfcn.inference_model` does.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

AUX_PREFIX = "aux_"
#: The key of a single-task model's main output in a dict (mmseg's decode head).
LOGITS_KEY = "logits"
#: `loss_reduction` settings: each output's mean over the global batch's valid pixels,
#: or the plain sum (Caffe's `normalize: false`, the FCN reference solvers).
LOSS_REDUCTIONS = ("mean", "sum")
#: `selection_metric` of a multi-task run: the mean over tasks of this score.
TASK_MEAN = "mean_iou"


def is_auxiliary(name: str) -> bool:
    """Whether an output name is an auxiliary head's ("aux_<key>")."""
    return name.startswith(AUX_PREFIX)


def label_key(name: str) -> str:
    """The label key an output is trained on: "aux_sem" -> "sem", "sem" -> "sem"."""
    return name[len(AUX_PREFIX) :] if is_auxiliary(name) else name


def loss_weights(
    output_names: list[str],
    label_keys: list[str] | None,
    *,
    aux_loss_weight: float = 0.4,
    task_loss_weights: Mapping[str, float] | None = None,
) -> dict[str, tuple[str | None, float]]:
    """Pairs every model output with its label and loss weight.

    Args:
        output_names: the model's output keys (["logits"] for a tensor output).
        label_keys: the keys of a dict label, or None for a tensor label (which
            every output is compared with).
        aux_loss_weight: weight of each "aux_*" output.
        task_loss_weights: weight of each main output by name (default 1.0);
            keys must be main output names.

    Returns:
        `{output name: (label key or None for the tensor label, weight)}`.

    Raises:
        ValueError: an output without a label, a label without an output, or
            task weights naming no output.
    """
    task_loss_weights = dict(task_loss_weights or {})
    mains = [n for n in output_names if not is_auxiliary(n)]
    unknown = sorted(set(task_loss_weights) - set(mains))
    if unknown:
        raise ValueError(
            f"`task_loss_weights` must name the model's main outputs {mains}. "
            f"Received: task_loss_weights={task_loss_weights!r}"
        )
    if label_keys is not None:
        missing = sorted({label_key(n) for n in output_names} - set(label_keys))
        unused = sorted(set(label_keys) - {label_key(n) for n in output_names})
        if missing or unused:
            raise ValueError(
                f"The model's outputs {sorted(output_names)} and the dataset's label keys "
                f"{sorted(label_keys)} must match (output k and aux_k are trained on label k). "
                f"Outputs without a label: {missing}; labels without an output: {unused}"
            )
    pairs = {}
    for name in output_names:
        weight = aux_loss_weight if is_auxiliary(name) else task_loss_weights.get(name, 1.0)
        pairs[name] = (None if label_keys is None else label_key(name), float(weight))
    return pairs


def inference_outputs(outputs: Any) -> Any:
    """Drops auxiliary outputs; a dict left with only "logits" becomes that tensor.

    The same rule as `kfcn.inference_model`, applied to the outputs of a call,
    so validation needs no second model.
    """
    if not isinstance(outputs, Mapping):
        return outputs
    kept = {k: v for k, v in outputs.items() if not is_auxiliary(k)}
    if set(kept) == {LOGITS_KEY}:
        return kept[LOGITS_KEY]
    if not kept:
        raise ValueError(
            f"The model has only auxiliary outputs {sorted(outputs)}: nothing to evaluate"
        )
    return kept


def selection_value(scores: Mapping[str, Any], metric: str) -> float:
    """The score that picks the best checkpoint.

    Args:
        scores: validation scores: the four metrics of one task, or per-task
            dicts (`{"sem": {...}, "geo": {...}}`).
        metric: a score name ("mean_iou", "pixel_accuracy", ...): for per-task
            scores the mean over the tasks of that score; or "<task>/<score>"
            (e.g. "sem/mean_iou") for one task's.

    Returns:
        The value (NaN when undefined).

    Raises:
        ValueError: naming `selection_metric` when the scores lack it.
    """
    task, _, name = metric.rpartition("/")
    try:
        if task:
            return float(scores[task][name])
        if name in scores and not isinstance(scores[name], Mapping):
            return float(scores[name])
        tasks = [v for v in scores.values() if isinstance(v, Mapping) and name in v]
        if tasks:
            return float(sum(float(t[name]) for t in tasks) / len(tasks))
    except (KeyError, TypeError):
        pass
    raise ValueError(
        f"`selection_metric` must name a validation score (e.g. mean_iou, or sem/mean_iou "
        f"for one task). Received: selection_metric={metric!r}; scores have {sorted(scores)}"
    )


def is_better(value: float, best: float | None) -> bool:
    """Higher is better; NaN never is."""
    return not math.isnan(value) and (best is None or value > best)
