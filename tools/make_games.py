"""Make the bundled TextWorld games again: games/<level>/<split>/<level>-<split>-<seed>.z8 (+ .json).

Every split's tw-make seeds and options are written here, and only here. "train" and "rl" games come
from tw-make's train split of foods and preparations (their seeds never repeat: PPO plays no game SFT
saw), "valid" and "test" from its valid and test splits, which no train game uses. 32 valid games
tell two settings apart by 3 points a game (8 told them apart by 12.5).

    python tools/make_games.py                 # all of them (a few minutes per hundred games)
    python tools/make_games.py --split rl      # one split
"""
import argparse
import glob
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

LEVELS = {"easy": "--recipe 1 --take 1 --go 6 --open",
          "tutorial": "--recipe 2 --take 2 --go 6 --open --cut"}
# split -> (tw-make's split of foods and preparations, seeds)
SPLITS = {"train": ("train", range(1, 33)), "rl": ("train", range(2001, 2129)),
          "valid": ("valid", range(1, 33)), "test": ("test", range(1001, 1065))}


def commands(folder: str, levels, splits) -> list[list[str]]:
    """One tw-make command per game."""
    return [["tw-make", "tw-cooking", *LEVELS[level].split(), "--split", tw_split, "--seed",
             str(seed), "--silent", "-f", "--output",
             os.path.join(folder, level, split, f"{level}-{split}-{seed:03d}.z8")]
            for level in levels for split in splits for tw_split, seeds in [SPLITS[split]]
            for seed in seeds]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--games", default="games", help="folder to write into (%(default)s)")
    p.add_argument("--level", choices=list(LEVELS), action="append", help="default: every level")
    p.add_argument("--split", choices=list(SPLITS), action="append", help="default: every split")
    args = p.parse_args(argv)
    jobs = commands(args.games, args.level or LEVELS, args.split or SPLITS)
    bin_dir = os.path.dirname(sys.executable)  # tw-make sits next to the python that has textworld
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        run = lambda cmd: subprocess.run(cmd, check=True, env=env)
        list(tqdm(pool.map(run, jobs), total=len(jobs), desc="tw-make"))
    for ni in glob.glob(os.path.join(args.games, "*", "*", "*.ni")):  # Inform 7 sources: not needed
        os.remove(ni)


if __name__ == "__main__":
    main()
