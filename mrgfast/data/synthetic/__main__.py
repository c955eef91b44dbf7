"""CLI: `python -m mrgfast.data.synthetic --out DIR --seed 0 --n 300` writes the demo datasets."""

import argparse
import json

from mrgfast.data.synthetic.demo import timed_generate


def main(argv=None) -> None:
    """Parse arguments, write the datasets, print the manifest and the time taken."""
    parser = argparse.ArgumentParser(prog="python -m mrgfast.data.synthetic", description=__doc__)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=300, help="number of chest X-ray studies (two views each)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--n-volumes", type=int, default=60, help="number of CT volumes (0: none)")
    parser.add_argument("--volume-size", type=int, default=32, help="CT volume side in voxels")
    args = parser.parse_args(argv)
    manifest, seconds = timed_generate(args.out, seed=args.seed, n=args.n, size=args.size,
                                       n_volumes=args.n_volumes, volume_size=args.volume_size)
    print(json.dumps(manifest, indent=1))
    print(f"wrote the synthetic datasets to {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
