#!/usr/bin/env python
"""Compare runs: one PNG of their curves overlaid, and a markdown table of results and differing settings.

    python tools/compare.py output/run_a output/run_b [--out output/compare.png]

Reads each run folder's summary.csv and config.yaml, so it works on runs that are still going.
"""
import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training.reporting import best_of, duration, plot_runs, ranking_metric, read_summary  # noqa: E402

NOT_SETTINGS = ('experiment', 'output')  # they name the run folder, so they always differ


def load_run(run_dir: Path) -> dict:
    if not (run_dir / 'summary.csv').is_file() or not (run_dir / 'config.yaml').is_file():
        raise SystemExit(f'error: {run_dir} is not a run folder (no summary.csv and config.yaml)')
    return dict(name=run_dir.name, rows=read_summary(run_dir / 'summary.csv'),
                config=yaml.safe_load((run_dir / 'config.yaml').read_text()))


def run_stats(rows: list) -> dict:
    """Top-1 of the best of raw, EMA and SWA weights: best (with its epoch and weights) and final; time; speed."""
    if not rows:
        return dict(epochs=0)
    best, weights, epoch = best_of(rows, 'top1')
    speeds = [r['img_per_sec'] for r in rows if r['img_per_sec']]
    return dict(epochs=len(rows), best=best, best_weights=weights, best_epoch=epoch,
                final=ranking_metric(rows[-1], 'top1')[0], seconds=sum(r['epoch_seconds'] for r in rows),
                img_per_sec=sum(speeds) / len(speeds) if speeds else None,
                gpu_hours=rows[-1].get('total_gpu_hours'), cost=rows[-1].get('total_cost'))


def results_table(runs: list) -> str:
    lines = ['| run | epochs | best top-1 | best epoch | weights | final top-1 | time | img/s | GPU-hours | cost |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for run in runs:
        s = run_stats(run['rows'])
        if not s['epochs']:
            lines.append(f"| {run['name']} | 0 | - | - | - | - | - | - | - | - |")
            continue
        speed = f"{s['img_per_sec']:.0f}" if s['img_per_sec'] else '-'
        hours = '-' if s['gpu_hours'] is None else f"{s['gpu_hours']:,.3g}"  # runs of older versions have none
        cost = '-' if s['cost'] is None else f"{s['cost']:,.2f}"
        lines.append(f"| {run['name']} | {s['epochs']} | {s['best']:.2f} | {s['best_epoch']} | {s['best_weights']} "
                     f"| {s['final']:.2f} | {duration(s['seconds'])} | {speed} | {hours} | {cost} |")
    return '\n'.join(lines)


def settings_table(runs: list) -> str:
    keys = sorted({k for run in runs for k in run['config']} - set(NOT_SETTINGS))
    differing = [k for k in keys if len({repr(run['config'].get(k)) for run in runs}) > 1]
    if not differing:
        return 'All settings are the same.'
    lines = ['| setting | ' + ' | '.join(run['name'] for run in runs) + ' |', '|---' * (len(runs) + 1) + '|']
    for key in differing:
        lines.append(f'| {key} | ' + ' | '.join(str(run['config'].get(key)) for run in runs) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('runs', nargs='+', type=Path, help='run folders')
    parser.add_argument('--out', type=Path, help='PNG to write (default: compare.png beside the first run folder)')
    args = parser.parse_args(argv)
    args.out = args.out or args.runs[0].parent / 'compare.png'
    runs = [load_run(path) for path in args.runs]
    names = [run['name'] for run in runs]
    if len(set(names)) < len(names):  # same folder name under different outputs
        for run, path in zip(runs, args.runs):
            run['name'] = str(path)
    plot_runs({run['name']: run['rows'] for run in runs if run['rows']}, args.out)
    print(results_table(runs))
    print()
    print(settings_table(runs))
    print(f'\ncurves: {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
