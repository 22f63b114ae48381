"""Run textrl's recipe once per seed, then summarize every seed run so far.

    python tools/seeds.py --seeds 3 --run-name full --eval-games 0 --no-baselines [textrl flags]

Seed s runs as `python textrl.py --seed s --run-name <name>/seed-<s> [flags]` would, in
runs/<name>/seed-<s>/ (an existing one is continued, as with --resume). After each seed,
runs/<name>/seeds.md tabulates every finished seed found there: each row's win rate per seed, its
mean, standard deviation and range, and PPO's gain over the policy it started from; then, game by
game, what PPO changed: the games each row lost (how many ended in a loop of at most 3 commands)
and the games won by one row and lost by the other. seeds.png plots the held-out win rate against
PPO's environment steps, one line per seed, and their mean. Seeds can so be run one at a time, in
separate sessions, into the same name.
"""
import argparse
import dataclasses
import glob
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import textrl  # noqa: E402


def curve(folder: str, start: str) -> list[tuple[int, float]]:
    """(PPO environment steps, held-out win rate) of one seed run: the start policy's row, the
    curve's points during PPO, and the final row; all on the curve's games (--curve-games: the first
    N of the table's), the two rows counted from their games in metrics.jsonl."""
    results = json.load(open(os.path.join(folder, "results.json")))
    rows = textrl.read_jsonl(os.path.join(folder, "metrics.jsonl"))
    ppo = [r for r in rows if r["stage"] == "ppo" and "return" in r]
    if not ppo or start + "+PPO" not in results:
        return []
    n = next((r["curve_games"] for r in ppo if "curve_games" in r), None)

    def rate(agent: str) -> float:  # the row's win rate on the first n games
        won = [w for _, w in sorted((r["game"], r["won"]) for r in rows
                                    if r["stage"] == "episode" and r["agent"] == agent)]
        return float(np.mean(won[:n])) if n and won else results[agent]["win_rate"]
    return [(0, rate(start))] + [(r["env_steps"], r["heldout_win_rate"])
                                 for r in ppo if "heldout_win_rate" in r] + [
        (ppo[-1]["env_steps"], rate(start + "+PPO"))]


def looped(episode: dict) -> bool:
    """A game that ended going round in circles: at most 3 different commands in its last 8 (back
    and forth between two rooms, or one command again and again)."""
    return len(episode["commands"]) >= 8 and len(set(episode["commands"][-8:])) <= 3


def changes(folder: str, start: str) -> list[tuple[str, str]]:
    """How one seed's games changed under PPO: the games each row lost (and how many of them ended
    in a loop), and the games PPO won that the start lost, and the other way round."""
    rows = textrl.read_jsonl(os.path.join(folder, "metrics.jsonl"))
    games = {a: {r["game"]: r for r in rows if r["stage"] == "episode" and r["agent"] == a}
             for a in (start, start + "+PPO")}
    lost = {a: [r for r in g.values() if not r["won"]] for a, g in games.items()}
    out = [(f"{a}: lost (of which ending in a loop)", f"{len(r)} ({sum(map(looped, r))})")
           for a, r in lost.items()]
    before, after = games.values()
    return out + [(f"won by {start}+PPO, lost by {start} / the other way round",
                   f"{sum(after[k]['won'] > r['won'] for k, r in before.items())} / "
                   f"{sum(after[k]['won'] < r['won'] for k, r in before.items())}")]


def summarize(folder: str) -> str:
    """seeds.md and seeds.png for every finished seed-<s>/ in folder; returns the table."""
    runs = sorted((int(re.search(r"seed-(\d+)$", d)[1]), d) for d in glob.glob(
        os.path.join(folder, "seed-*")) if os.path.exists(os.path.join(d, "results.md")))
    seeds, results = [s for s, _ in runs], [json.load(open(os.path.join(d, "results.json")))
                                            for _, d in runs]
    rows = {k: [r[k]["win_rate"] for r in results] for k in results[0] if k != "_seconds"}
    start = next((k for k in rows if k + "+PPO" in rows), None)  # the policy PPO started from
    if start:
        rows[f"{start}+PPO - {start}"] = [b - a for a, b in zip(rows[start], rows[start + "+PPO"])]
    out = [f"| win rate | {' | '.join(f'seed {s}' for s in seeds)} | mean ± sd (range) |",
           "|---|" + "---|" * (len(seeds) + 1)]
    out += [f"| {k} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {np.mean(v):.3f} ± "
            f"{np.std(v, ddof=1) if len(v) > 1 else 0:.3f} ({min(v):.3f} to {max(v):.3f}) |"
            for k, v in rows.items()]
    if start:  # where the gain came from, game by game
        per_seed = [changes(d, start) for _, d in runs]
        out += ["", f"| games ({results[0][start]['games']}) | " + " | ".join(
            f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
        out += [f"| {name} | " + " | ".join(c[i][1] for c in per_seed) + " |"
                for i, (name, _) in enumerate(per_seed[0])]
    with textrl.figure(os.path.join(folder, "seeds.png"), 1, 6) as (ax,):
        curves = [curve(d, start) for _, d in runs] if start else []
        for s, xy in zip(seeds, curves):
            if xy:
                ax.plot(*zip(*xy), "o-", alpha=0.6, label=f"seed {s}")
        if len({len(xy) for xy in curves}) == 1 and curves[0]:  # the same points: their mean
            ax.plot(np.mean([[x for x, _ in xy] for xy in curves], 0),
                    np.mean([[y for _, y in xy] for xy in curves], 0), "k-", lw=2, label="mean")
        ax.set(xlabel="PPO environment steps", ylabel="win rate on the curve's held-out games (greedy)")
        if any(curves):
            ax.legend()
    textrl.atomic_save(os.path.join(folder, "seeds.md"), "\n".join(out) + "\n")
    return "\n".join(out)


def seeds(cfg: textrl.Config, argv: list[str], n: int) -> str:
    """Run the recipe for seeds cfg.seed .. cfg.seed + n - 1, summarizing after each."""
    if n < 1:
        raise textrl.UserError(f"--seeds must be at least 1, got {n}")
    textrl.check_config(cfg)
    name = cfg.run_name or time.strftime("seeds-%Y%m%d-%H%M%S")
    for s in range(cfg.seed, cfg.seed + n):
        run_name = f"{name}/seed-{s}"
        resume = os.path.exists(os.path.join("runs", run_name, "results.json"))
        textrl.run(dataclasses.replace(cfg, seed=s, run_name=run_name, resume=resume or cfg.resume),
                   argv + ["--seed", str(s), "--run-name", run_name])
        table = summarize(os.path.join("runs", name))
        textrl.say(f"\n{table}")
    return table


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --seed is not --seeds
    own.add_argument("--seeds", type=int, default=3, help="how many seeds, from --seed on (%(default)s)")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False,
                                parents=[textrl.parser(), own])  # textrl's flags and -h, and --seeds
    p.parse_args(argv)  # --help, and any bad flag, before anything runs
    args, rest = own.parse_known_args(argv)  # rest: textrl's flags, as given
    textrl.main(rest, job=lambda cfg, argv: seeds(cfg, argv, args.seeds))


if __name__ == "__main__":
    main()
