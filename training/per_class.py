"""Top-1 per class, so that two runs can be compared class by class: the rows of per_class.csv (written by train.py at
the end of a run and by validate.py --per-class-csv), and the log line naming the worst classes."""
import csv
import io
import os
from pathlib import Path

COLUMNS = ('class_index', 'class_name', 'images', 'top1', 'weights')
WORST = 10  # classes named by the log line


def class_rows(result: dict, class_names: list, weights: str) -> list:
    """One dict per class, in label order, from an evaluate() result.

    Args:
        class_names: the dataset's class names in label order ('' where a dataset names none).
        weights: the weights evaluated (raw, ema or swa), written in every row so that a file says what it measured.

    Returns:
        class_index, class_name, images, top1 (percent; None for a class without validation images) and weights.
    """
    return [dict(class_index=i, class_name=name, images=images, top1=100 * hits / images if images else None,
                 weights=weights)
            for i, (name, images, hits) in enumerate(zip(class_names, result['class_images'], result['class_hits']))]


def write_csv(path: Path, rows: list):
    """per_class.csv, replaced in one step: a reader never sees half a file."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ('' if row[k] is None else row[k]) for k in COLUMNS})
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def worst_line(rows: list, when: str) -> str:
    """'Worst classes (<when>, ema weights): 3 hexagon 20.0%, ...': the WORST lowest top-1, ties in label order."""
    ranked = sorted((r for r in rows if r['top1'] is not None), key=lambda r: (r['top1'], r['class_index']))
    classes = ', '.join(' '.join(filter(None, (str(r['class_index']), r['class_name'], f"{r['top1']:.1f}%")))
                        for r in ranked[:WORST])
    return f"Worst classes ({when}, {rows[0]['weights']} weights): {classes}"
