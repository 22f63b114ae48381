"""Where does bf16 lose a state's score? Each state scored alone and in batches of 8, per precision.

PPO scores pi_old again instead of taking log pi(a|s) from the rollout, because in bf16 a state's
score moves with the states batched beside it. This probe measures by how much, with parts of the
network kept in fp32 (the LM head, the attention, the residual stream) and with fp32 throughout, and
what each costs; and (--games) how far a greedy win rate moves when the same policy plays the same
games beside other games in its batch (the noise under every table's win rate):

    python tools/precision.py --checkpoint runs/<name>/checkpoints/last --states 48
    python tools/precision.py --checkpoint runs/<name>/checkpoints/last --states 0 --games 64
"""
import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import textrl  # noqa: E402


def batch_sizes(text: str) -> list[int]:
    """'8,7,5' -> [8, 7, 5], each at least 1 (argparse turns a ValueError into a usage error)."""
    sizes = [int(b) for b in text.split(",")]
    if min(sizes) < 1:
        raise ValueError(text)
    return sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="", help="a saved policy (default: the LLM as it comes)")
    p.add_argument("--states", type=int, default=48, help="states of the rl walkthroughs to score")
    p.add_argument("--games", type=int, default=0, help="also play the first N easy test games "
                   "greedily, once per --batches size (0 = not)")
    p.add_argument("--batches", default=[8, 7, 5], type=batch_sizes,
                   help="games in lockstep, one size per arrangement "
                   "(8,7,5; textrl evaluates with 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (%(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = textrl.compute_dtype(torch.device("cpu"), 4)
    if dtype == torch.float32:  # checked before the model loads and the games are played
        sys.exit("this CPU computes in fp32 already: nothing to compare")
    cfg = textrl.Config(max_steps=40)
    lm, tok = textrl.load_model(cfg, torch.device("cpu"))
    policy = textrl.Policy(lm, tok).eval()
    if args.checkpoint:
        textrl.load_checkpoint(args.checkpoint, policy, cfg)
    games = os.path.join(ROOT, "games")
    if args.games:  # the same policy, the same games, other batch neighbours: the win rates
        test = textrl.list_games(games, "easy", "test")[:args.games]
        limit = 2 * max(map(textrl.walkthrough_length, textrl.list_games(games, "easy", "train")))
        play_cfg = dataclasses.replace(cfg, max_steps=limit)  # the step limit of textrl's runs
        print(f"| games in a batch | win rate ({len(test)} test games) | seconds |\n|---|---|---|")
        won = []
        for b in args.batches:
            t0 = time.time()
            _, played = textrl.play(test, textrl.llm_agent(policy, True), play_cfg, tok,
                                    desc=f"batch {b}", batch=b)
            won.append([g.last.won for g in played])
            print(f"| {b} | {np.mean(won[-1]):.3f} | {time.time() - t0:.0f} |", flush=True)
        flips = [os.path.basename(g) for g, w in zip(test, zip(*won)) if len(set(w)) > 1]
        print(f"won in one arrangement, lost in another: {len(flips)} games {' '.join(flips)}")
    if args.states < 1:
        return
    rl = textrl.list_games(games, "easy", "rl")[:args.states // 6 + 2]
    episodes, _ = textrl.play(rl, textrl.walkthrough_agent, cfg, tok)
    states = [t for ep in episodes for t in ep][:args.states]

    @torch.no_grad()
    def logps(batch):  # log pi(.|s), normalized over the valid commands, in fp32
        return [s.float().log_softmax(-1) for s in policy([t.prompt for t in batch],
                                                          [t.actions for t in batch])[0]]

    def score(name: str, fp32=None):
        t0 = time.time()
        batched = [lp for i in range(0, len(states), 8) for lp in logps(states[i:i + 8])]
        seconds, alone = time.time() - t0, [logps([t])[0] for t in states]
        d = torch.cat([(a - b).abs() for a, b in zip(alone, batched)])
        chosen = torch.tensor([abs(float(a[t.action] - b[t.action]))
                               for a, b, t in zip(alone, batched, states)])
        vs32 = torch.cat([(a - b).abs() for a, b in zip(batched, fp32)]).mean() if fp32 else 0
        print(f"| {name} | {d.max():.3f}, {d.mean():.3f} | {chosen.max():.3f}, {chosen.mean():.3f}"
              f" | {vs32:.3f} | {seconds:.1f} |", flush=True)
        return batched

    print("| compute | alone vs batched: max, mean over all commands | chosen command: max, mean "
          "| batched vs fp32: mean | seconds, batched |")
    print("|---|---|---|---|---|")
    head = lm.get_output_embeddings()
    for param in lm.parameters():  # the reference first: fp32 throughout, NF4 weights as they are
        param.data = param.data.float()
    fp32 = score("fp32 throughout")
    with torch.autocast("cpu", dtype=dtype):
        score("bf16 matmuls, fp32 residual stream (autocast)", fp32)
    for param in lm.parameters():
        param.data = param.data.to(dtype)
    score("bf16 (textrl)", fp32)
    w32 = head.weight.float()
    lm.get_output_embeddings = lambda: (lambda x: F.linear(x.float(), w32))
    score("bf16, LM head in fp32", fp32)
    del lm.get_output_embeddings  # the model's own again
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def sdpa_fp32(module, q, k, v, mask, **kw):
        calls.append(1)
        out, weights = sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask, **kw)
        return out.to(q.dtype), weights
    AttentionInterface.register("sdpa_fp32", sdpa_fp32)
    lm.set_attn_implementation("sdpa_fp32")
    score("bf16, attention in fp32", fp32)
    assert calls, "the fp32 attention was not called"


if __name__ == "__main__":
    main()
