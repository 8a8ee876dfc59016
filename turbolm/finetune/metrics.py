"""Classification metrics (scikit-learn): accuracy, per-class and macro precision / recall /
F1, the confusion matrix, and the majority-class baseline.

Macro averages are taken over the labels that occur in the true or the predicted labels
(scikit-learn's default set); per-class rows are given for every label the model knows, with
support 0 for labels absent from the evaluation data.
"""

from __future__ import annotations

from collections.abc import Sequence


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence) -> dict:
    """Metrics of predicted label indices against true ones (indices into ``labels``)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = [int(y) for y in y_true], [int(y) for y in y_pred]
    if not y_true:
        from turbolm.errors import DataError

        raise DataError("no examples to evaluate")
    all_idx = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=all_idx, zero_division=0)
    present = sorted(set(y_true) | set(y_pred))
    mp, mr, mf, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=present, average="macro", zero_division=0
    )
    cm = confusion_matrix(y_true, y_pred, labels=all_idx)
    return {
        "examples": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(mp),
        "macro_recall": float(mr),
        "macro_f1": float(mf),
        "per_class": {
            str(lab): {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, lab in enumerate(labels)
        },
        "confusion_matrix": {
            "labels": [str(lab) for lab in labels],  # rows: true label, columns: predicted
            "matrix": cm.tolist(),
        },
    }


def majority_baseline(y_true: Sequence[int], majority: int, labels: Sequence) -> dict:
    """Accuracy and macro-F1 of always predicting label index ``majority``."""
    report = classification_report(y_true, [majority] * len(y_true), labels)
    return {
        "label": str(labels[majority]),
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
    }


def format_report(report: dict, baseline: dict | None = None) -> str:
    """A plain-text table of a ``classification_report`` (and the baseline)."""
    names = list(report["per_class"])
    width = max(12, *(len(n) for n in names))
    lines = [
        f"{'label':<{width}}  precision  recall     f1  support",
    ]
    for name, row in report["per_class"].items():
        lines.append(
            f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}"
            f"  {row['support']:7d}"
        )
    lines.append(
        f"{'macro avg':<{width}}  {report['macro_precision']:9.3f}  "
        f"{report['macro_recall']:6.3f}  {report['macro_f1']:5.3f}  {report['examples']:7d}"
    )
    lines.append(f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}")
    if baseline is not None:
        lines.append(
            f"majority-class baseline (always {baseline['label']!r}): accuracy "
            f"{baseline['accuracy']:.4f}, macro-F1 {baseline['macro_f1']:.4f}"
        )
    cm = report["confusion_matrix"]
    short = [n[:6] for n in cm["labels"]]
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines.append(" " * (width + 2) + " ".join(f"{s:>6}" for s in short))
    for name, row in zip(cm["labels"], cm["matrix"]):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:6d}" for v in row))
    return "\n".join(lines)
