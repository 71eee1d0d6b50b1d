"""Command line: ``python -m mrcnn_edu COMMAND``.

Commands
  demo      the README's main job (see ``python -m mrcnn_edu demo --help``)
  anchors   draw the C4 and FPN anchors over an image and save the figure
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_anchors(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from mrcnn_edu.anchors import c4_anchor_generator, fpn_anchor_generator
    from mrcnn_edu.visualize import draw_boxes, show_image

    height, width = args.size
    image = torch.linspace(0.2, 0.8, width).expand(3, height, width)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    (c4,) = c4_anchor_generator()([(height // 16, width // 16)])
    cell = (height // 32) * (width // 16) + width // 32  # the cell nearest the image centre
    show_image(image, axes[0], title="C4: 15 anchors of one stride-16 cell")
    draw_boxes(c4.reshape(-1, 15, 4)[cell], axes[0])
    fpn = fpn_anchor_generator()([(height // s, width // s) for s in (4, 8, 16, 32, 64)])
    show_image(image, axes[1], title="FPN: 3 anchors per level, P2..P6")
    for level, (anchors, stride) in enumerate(zip(fpn, (4, 8, 16, 32, 64))):
        w = width // stride
        centre = (height // stride // 2) * w + w // 2
        draw_boxes(anchors.reshape(-1, 3, 4)[centre], axes[1], color=f"C{level}")
    for ax in axes:
        ax.set_xlim(-300, width + 300)
        ax.set_ylim(height + 300, -300)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    print(f"wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # Until the training engine lands, the demo builds the package and draws the anchors.
    return _cmd_anchors(argparse.Namespace(size=(512, 512), out=str(Path(args.out) / "anchors.png")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mrcnn_edu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the README's main job")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.set_defaults(func=_cmd_demo)
    anchors = sub.add_parser("anchors", help="draw C4 and FPN anchors")
    anchors.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    anchors.add_argument("--out", default="runs/anchors.png")
    anchors.set_defaults(func=_cmd_anchors)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
