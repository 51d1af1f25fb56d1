"""Attention modules in a small convnet: what each registered image module costs and buys.

Every module of ``attnjax.nn.registry.IMAGES`` (SE, cSE, sSE, scSE, ...) goes after each stage of the same small
convnet (``experiments.lib.convnet.ConvNet``: 3×3 stem, stages of conv3×3 + GroupNorm + ReLU at widths 16, 32, 64
on 16×16, 8×8 and 4×4 feature maps, global average pooling, a linear classifier), next to a ``none`` baseline
without one. Each net trains for a few hundred AdamW steps on fresh batches of a synthetic task that needs
channel and spatial reasoning ("find the plus": the label is the channel of the one plus-shaped glyph among
distractor glyphs, and the image half it lies in; ``experiments.lib.convnet.make_dataset``), then is scored on
held-out images. The table gives, per module: parameters (and those added to ``none``), forward FLOPs per image
from XLA's cost analysis of the compiled forward pass (and the ratio to ``none``), and held-out accuracy (mean
over ``--seeds``, with the range when there are several).

    python -m experiments.conv_attention                       # CPU default: every module, ~25 min on 2 cores
    python -m experiments.conv_attention --modules none,se,scse --steps 1000 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

from experiments.lib import cli, host, plots, report
from experiments.lib.convnet import NONE, ConvSettings, TaskConfig, baseline_costs, image_specs, sweep
from experiments.lib.report import markdown_table

DEFAULT = ConvSettings()
SMOKE = dict(modules=[NONE, "se"], widths=[8, 16], steps=3, batch_size=8, warmup_steps=1, test_examples=32)
"""Defaults under ``--smoke`` (explicit flags still win): two modules, a tiny net, three steps."""


def parse_modules(text: str) -> Optional[list[str]]:
    """``"none,se"`` -> ``["none", "se"]``; ``"all"`` -> ``None`` (``none`` and every registered module)."""
    return None if text == "all" else [m for m in text.split(",") if m]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults (``ConvSettings``) run every registered module: 23 minutes for 30 modules
    on a shared 2-core CPU, most of it in the modules with large depthwise convolutions (LKA, MOAT, TransNeXt,
    FFNet: 0.2-0.5 s per step where the net without them takes 0.03 s, XLA's CPU depthwise backward)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", type=parse_modules, default=None,
                   help="comma-separated image modules and/or 'none', or 'all' (default: 'none' and every "
                        "registered image module)")
    p.add_argument("--widths", type=cli.parse_ints, default=list(DEFAULT.widths), help="channels per stage")
    p.add_argument("--groups", type=int, default=DEFAULT.groups, help="GroupNorm groups")
    cli.add_training_flags(p, DEFAULT)
    p.add_argument("--seeds", type=cli.parse_ints, default=list(DEFAULT.seeds),
                   help="comma-separated seeds (model initialization and training data); accuracy is their mean")
    p.add_argument("--noise", type=float, default=DEFAULT.task.noise, help="background noise of the images")
    p.add_argument("--glyphs", type=int, default=DEFAULT.task.glyphs, help="glyphs per image (the plus included)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write the bar plot")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    cli.add_output_flags(p, "conv_attention")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    try:
        settings(args).module_names()
    except ValueError as e:
        p.error(str(e))
    return args


def settings(args: argparse.Namespace) -> ConvSettings:
    """The study's ``ConvSettings`` from the flags."""
    task = TaskConfig(noise=args.noise, glyphs=args.glyphs)
    return ConvSettings(modules=args.modules, widths=tuple(args.widths), groups=args.groups, task=task,
                        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                        weight_decay=args.weight_decay, test_examples=args.test_examples, seeds=tuple(args.seeds),
                        progress=args.progress)


def summarize(rows: Sequence[dict], baseline_flops: float, baseline_params: int) -> list[dict]:
    """One summary per module (in run order) over its seeds: parameters, FLOPs, accuracy mean/min/max, or error."""
    out = []
    for name in dict.fromkeys(r["module"] for r in rows):
        runs = [r for r in rows if r["module"] == name]
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            out.append({"module": name, "error": errors[0]})
            continue
        accuracy = [r["accuracy"] for r in runs]
        out.append({"module": name, "params": runs[0]["params"], "params_added": runs[0]["params"] - baseline_params,
                    "flops": runs[0]["flops"], "flops_ratio": runs[0]["flops"] / baseline_flops,
                    "accuracy": statistics.fmean(accuracy), "accuracy_min": min(accuracy),
                    "accuracy_max": max(accuracy), "seeds": len(runs),
                    "train_seconds": statistics.fmean(r["train_seconds"] for r in runs)})
    return out


def table(summary: Sequence[dict]) -> str:
    """Markdown: module, parameters, parameters added to ``none``, forward FLOPs per image, FLOPs ×none, accuracy."""
    lines = []
    for s in summary:
        if "error" in s:
            lines.append([s["module"], "", "", "", "", s["error"]])
            continue
        accuracy = f"{s['accuracy']:.3f}"
        if s["seeds"] > 1:
            accuracy += f" ({s['accuracy_min']:.3f}–{s['accuracy_max']:.3f})"
        lines.append([s["module"], f"{s['params']:,}", f"{s['params_added']:+,}", f"{s['flops'] / 1e6:.2f}M",
                      f"{s['flops_ratio']:.3f}", accuracy])
    return markdown_table(["module", "params", "added vs none", "fwd FLOPs/image", "FLOPs ×none", "accuracy"], lines)


def findings(summary: Sequence[dict]) -> str:
    """A few sentences read off the table: the baseline, the best and worst modules, the spread."""
    ok = [s for s in summary if "error" not in s]
    base = next((s for s in ok if s["module"] == NONE), None)
    mods = [s for s in ok if s["module"] != NONE]
    if not mods:
        return ""
    best, worst = max(mods, key=lambda s: s["accuracy"]), min(mods, key=lambda s: s["accuracy"])
    text = [f"Best module: {best['module']} ({best['accuracy']:.3f}); worst: {worst['module']} "
            f"({worst['accuracy']:.3f})."]
    if base is not None:
        above = [s["module"] for s in mods if s["accuracy"] > base["accuracy"]]
        text.append(f"Baseline none: {base['accuracy']:.3f}; {len(above)} of {len(mods)} modules score above it.")
        if base["seeds"] > 1:
            text.append(f"Across seeds none ranges {base['accuracy_min']:.3f}–{base['accuracy_max']:.3f}: "
                        "differences smaller than that range are noise.")
        else:
            text.append("One seed per module: a module's accuracy can move by several points from seed to seed "
                        "(rerun with --seeds 0,1,2 to see the spread), so only large gaps mean something.")
    failed = [s["module"] for s in summary if "error" in s]
    if failed:
        text.append(f"Failed: {', '.join(failed)} (error in the table).")
    return " ".join(text)


def plot(summary: Sequence[dict], path: Path) -> None:
    """Bars per module: held-out accuracy (with the seed range), parameters added and FLOPs relative to none."""
    plt = plots.plt
    ok = [s for s in summary if "error" not in s]
    names = [s["module"] for s in ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.3 * len(ok) + 1.8), sharey=True)
    ys = range(len(ok))
    acc = [s["accuracy"] for s in ok]
    err = [[s["accuracy"] - s["accuracy_min"] for s in ok], [s["accuracy_max"] - s["accuracy"] for s in ok]]
    axes[0].barh(ys, acc, xerr=err, color=["0.6" if n == NONE else "C0" for n in names])
    base = next((s for s in ok if s["module"] == NONE), None)
    if base is not None:
        axes[0].axvline(base["accuracy"], color="0.3", ls="--", lw=1, label="none")
        axes[0].legend(fontsize=7)
    axes[0].set(xlabel="held-out accuracy", xlim=(0, 1))
    axes[1].barh(ys, [s["params_added"] for s in ok], color="C1")
    axes[1].xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
    axes[1].set(xlabel="parameters added to none")
    axes[2].barh(ys, [s["flops_ratio"] for s in ok], color="C2")
    axes[2].axvline(1.0, color="0.3", ls="--", lw=1)
    axes[2].set(xlabel="forward FLOPs / none's (XLA cost analysis)")
    axes[0].set_yticks(list(ys), names)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Image attention modules in a small convnet ('find the plus')")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(summary: Sequence[dict], args: argparse.Namespace, argv: Sequence[str], run_info: dict) -> str:
    """The page: command, setup, machine and load, the table, and what it shows."""
    device, task = run_info["device"], settings(args).task
    return "\n".join([
        f"# Image attention modules in a small convnet — {device['platform']}", "",
        "`" + " ".join(["python -m experiments.conv_attention", *argv]) + "`", "",
        f"ConvNet widths {args.widths} (3×3 stem; per stage conv3×3, GroupNorm({args.groups}), ReLU, then the "
        f"module; global average pool, linear), on the 'find the plus' task ({task.size}×{task.size}×{task.channels} images, "
        f"{task.glyphs} glyphs, noise {task.noise}; {task.num_classes} classes: the plus's channel × the image half "
        f"it lies in; chance {1 / task.num_classes:.3f}). "
        f"{args.steps} AdamW steps of {args.batch_size} fresh images (lr {args.lr}, warmup {args.warmup_steps}, "
        f"cosine, weight decay {args.weight_decay}); accuracy on {args.test_examples} held-out images, seeds "
        f"{args.seeds}. Each module is built from its registry spec with `channels` set to the stage width. "
        "FLOPs: XLA's cost analysis of the compiled forward pass for one image.", "",
        host.machine_line(run_info), "",
        table(summary), "",
        findings(summary), ""])


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the study, print the table, write ``<name>.json``, ``<name>.md`` (and ``<name>.png``) to ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    study = settings(args)
    started = host.start_run()
    rows = sweep(study)
    baseline = baseline_costs(study)
    summary = summarize(rows, baseline["flops"], baseline["params"])
    run_info = host.finish_run(started)
    md = markdown(summary, args, argv, run_info)
    print(md)
    out = Path(args.out)
    report.write_json({"args": report.jsonable_args(args), **run_info,
                       "registered": [s.name for s in image_specs()], "summary": summary, "results": rows},
                      f"{args.name}.json", out)
    (out / f"{args.name}.md").write_text(md)
    if args.plot:
        plot(summary, out / f"{args.name}.png")
    return summary


if __name__ == "__main__":
    main()
