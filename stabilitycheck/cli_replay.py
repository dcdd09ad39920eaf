"""`stabilitycheck replay BUNDLE`: re-run the flagged step a `watch` bundle saved, and compare the
norms it measures now with those measured during training (exit 0 when every one agrees within
`--rtol`, 1 when one does not, 2 when the bundle cannot be used)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stabilitycheck._options import Parser, number
from stabilitycheck.replay import RTOL, replay


def main(argv: Sequence[str]) -> int:
    """`stabilitycheck replay BUNDLE [--rtol R]`: print the comparison; exit 0 if it reproduces."""
    parser = Parser(prog="stabilitycheck replay", description=__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument(
        "--rtol",
        type=number(float, 0),
        default=RTOL,
        help=f"largest |recorded - replayed| / the larger that agrees, in [0, 1) (default {RTOL:g})",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.rtol >= 1:  # the difference is at most 1: --rtol 5 read any change of the model as agreeing
        parser.error(
            f"argument --rtol: must be below 1, got {args.rtol:g}: the difference is |recorded - replayed| "
            "/ the larger of the two, at most 1, so 1 or more accepts any pair"
        )
    result = replay(args.bundle)
    bad = result.mismatches(args.rtol)
    worst = result.largest_difference()
    print(
        f"replayed step {result.step}: {len(result.names)} norms, largest relative difference {worst:.3g} "
        "(|recorded - replayed| / the larger)"
    )
    if result.changed:
        print(f"  note: the code of {', '.join(result.changed)} changed since the bundle was written")
    if bad and result.hooked:
        print(
            f"  note: in training, {', '.join(result.hooked)} had hooks of your own, which a bundle does not "
            "save and the replay runs without: what they did (a fault a forward hook planted) is not replayed"
        )
    factor = result.gradient_factor(args.rtol)
    if factor is not None:
        print(
            f"  note: every weight gradient that differs reads x{factor:.4g} the replay's and all else "
            "agrees, as torch.nn.utils.clip_grad_norm_ after backward leaves them: if your loop clips, pass "
            "watch(..., clip_grad_norm=max_norm) and the replay clips alike"
        )
    over = result.over_the_clip()
    if bad and over is not None:
        print(
            f"  note: the step's total gradient norm was {over:.6g}, above clip_grad_norm={result.clip:g}, "
            "which the bundle says your loop clipped to and the replay did: the loop did not clip to it; "
            "write the bundle with the max_norm your loop clips to, or without clip_grad_norm= if it does not"
        )
    for i in bad:
        kind, block = result.names[i]
        print(
            f"  differs: {kind} of {block}: recorded {result.recorded[i]:.9g}, "
            f"replayed {result.replayed[i]:.9g}"
        )
    return 1 if bad else 0
