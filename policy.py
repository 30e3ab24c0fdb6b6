"""
The policy being trained and its reference, on 1..N ranks: build, shard, precision, LoRA adapters, gather for
rollouts, the log-probs of completions (the plain path and the shared-prefix path), checkpoints. train_grpo.py is
the method; this file is how its two models live on the ranks and what they compute. It has no
command of its own: train_grpo.py calls it (one process, or `torchrun --nproc_per_node=8 train_grpo.py ...`).

Start-up (load): every rank builds the model on the meta device (shapes, no memory), shards it with FSDP2, allocates
its own shards only, and fills them from ONE read of --model: rank 0 reads the checkpoint in its own dtype, memory-
mapped, and broadcasts it one tensor at a time; each rank keeps its slice and casts it to fp32. A rank holds its
shards plus the tensor in flight, never a full copy (rank 0 also the file pages it has sent). One CUDA process runs
the same path on a 1-rank process group, but with LoRA; one CPU process keeps plain modules (fp32, exact: the tests'
oracle).

Precision: master weights, gradients and their reduction, and AdamW's state are fp32 (bf16 master weights would
lose AdamW's updates at the paper's lr: train_grpo.py refuses them). On CUDA, FSDP2 gathers the weights in bf16
and the forward and backward run in bf16; the reference lives in bf16. On CPU everything is fp32.

LoRA (--lora R): every targeted linear becomes base(x) + (alpha / R) * B A x, A [R, in] and B [out, R] fp32 and
trained (B starts at 0: step 0 is the base model exactly), the base frozen in the checkpoint's dtype on CUDA (bf16
for the released model: the compute is bf16 anyway) and in fp32 on CPU, with no gradient and no optimizer state. FSDP2
shards per parameter, so the frozen base and the adapters share their layer's unit. One process with LoRA keeps a plain
module instead (no FSDP2): the base is in its compute dtype already, the adapters are cast to it in their forward (as
FSDP2 casts them), and the rollouts then run on the weights as they are, where FSDP2 on one rank would gather a second
copy of the whole base for them (15.7 GiB at 7B: memplan.py). There is no reference copy: the reference is the same
model with its adapters off (reference()), which is the base exactly.

Checkpoints, <out>/step_<N>/:
    a Hugging Face model directory (config, safetensors, tokenizer, pixel limits) in --save-dtype, by default the dtype
        of --model (bf16 for the released Qwen2.5-VL): the next stage loads it as it is. Gathered one parameter at a
        time onto rank 0's CPU, cast before it travels, so no rank holds a second fp32 copy.
        With LoRA, the merged weights W + (alpha / R) B A, merged in fp32 one linear at a time as it is gathered.
    adapter.safetensors, adapter_config.json  with LoRA: the adapters alone (fp32) and their r, alpha, targets.
    resume/  torch.distributed.checkpoint: each rank writes its own shard of the fp32 master weights (with LoRA: the
        adapters; the frozen base is --model, read again) and of AdamW's state, and its RNG state (__<rank>_0.distcp);
        nothing is gathered.
    train_state.json, args.json  step, epoch, world size; the arguments a --resume must match.
    manifest.json  written last: every file's size. A checkpoint is complete when all of them are there, whole and
        readable; --resume takes the newest complete one and says which it passed over.
A step directory is written as .step_<N>.partial and renamed: a kill at any moment leaves the previous complete step
loadable. --keep N keeps the newest N step directories (and the one <out>/final names). --resume needs the world
size the checkpoint was written with: the global batch (pairs per rank x ranks), so every step's pairs and the
length of the learning-rate schedule, depend on it. DCP could reshard the state, but the result would not continue
the same run; to move a run to another world size, start a new one from <out>/step_<N> (its optimizer starts afresh).
"""

import contextlib
import copy
import json
import os
import pickle
import random
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

import common


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# start-up: build on the meta device, shard, fill from one read


def init_single_process(device, lora=False):
    """One CUDA process: a 1-rank process group, so that it takes the FSDP2 path (bf16 compute over fp32 master
    weights) that torchrun's ranks take. Not with `lora`: a plain module then (see LoRA at the top)."""
    if device.type == "cuda" and not dist.is_initialized() and not lora:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)


def build(spec, dtype):
    """(model on the meta device in `dtype`, tokenizer, image_cfg): shapes only, no weight file is read."""
    return common.load_model(spec, "meta", dtype)


def fsdp_units(model):
    """
    The units FSDP2 shards under the root, each gathered just before it runs and freed after: every decoder layer and
    vision block, the vision merger, the token embedding and the lm_head (one unit when they are tied). The last three
    are units of their own rather than part of the root because FSDP keeps a root gathered from its forward to the
    end of its backward: at 7B they are 1.2B parameters (2.4 GB in bf16 per rank for the whole step), and the first
    forward would gather all of them at once.
    """
    lm, visual = model.model.language_model, model.model.visual
    heads = [[lm.embed_tokens, model.lm_head]] if model.config.tie_word_embeddings else [lm.embed_tokens, model.lm_head]
    return list(lm.layers) + list(visual.blocks) + [visual.merger] + heads


def shard(model, device, reference=False):
    """
    FSDP2 as training runs it: the units of fsdp_units, and the root with the rest (patch embed, final norm). On CUDA
    the weights are gathered in bf16 for compute and gradients are reduced in fp32 (the policy's master weights are
    fp32; the reference's are bf16 already). The reference (`reference=True`) has no gradients. Without a process
    group (one CPU process) the model stays a plain module.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if reference:
        model.requires_grad_(False)
    if not dist.is_initialized():
        return model
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
          else MixedPrecisionPolicy())
    for m in fsdp_units(model):
        fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def enable_checkpointing(model):
    """Activation checkpointing of every decoder layer and vision block: backward recomputes their insides from
    their inputs. use_reentrant=False, which the shared-prefix path needs (cache_under_checkpointing)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if not model.get_input_embeddings().weight.requires_grad:
        # transformers also makes the embedding's output require grad, for reentrant checkpointing over a frozen
        # embedding; non-reentrant needs none of it, and under FSDP it would gather the frozen embedding in backward
        model.disable_input_require_grads()


@torch.no_grad()
def fill(model, source, device, sampled=False):
    """
    Allocate a built (meta, maybe sharded) model's own storage on `device` and copy in `source`, rank 0's read of the
    checkpoint (None elsewhere): broadcast one tensor at a time in the checkpoint's dtype, each rank keeping its slice,
    cast to the model's dtype. Buffers (the rotary inv_freq) are in no state dict: rank 0's model sends them too.
    `sampled`: the model will be sampled from (generate), see below.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives a plain module's tied lm_head a tensor of its own (FSDP2 keeps the tie)
    if sampled and dist.is_initialized():
        # FSDP picks its root on the first forward, and the sampler calls submodules directly: run one through the
        # root now, on the storage not yet filled (its output is thrown away), so that its gathers come before the
        # shards take their memory rather than on top of it
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
        model.reshard()  # a root stays gathered after forward: the optimizer must see the sharded parameters
    if dist.is_initialized():
        set_model_state_dict(model, source.state_dict() if _rank() == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.load_state_dict(source.state_dict())
    for name, b in model.named_buffers():
        if _rank() == 0:
            b.copy_(source.get_buffer(name))
        if dist.is_initialized():
            dist.broadcast(b, 0)


def load(spec, device, grad_checkpointing=False, lora=None):
    """
    (policy, reference, tokenizer, image_cfg, the checkpoint's dtype), both models from one read of `spec`: the policy
    in fp32 (its master weights), the reference in bf16 on CUDA (fp32 on CPU), frozen, in eval mode. With `lora`
    (add_adapters' r, alpha, dropout, targets, seed) the policy is the frozen base (the checkpoint's dtype on CUDA,
    fp32 on CPU) with fp32 adapters, and no reference is loaded (None: see reference()).
    """
    source = common.load_model(spec, "cpu", "auto")[0] if _rank() == 0 else None
    dtype = [str(next(source.parameters()).dtype).removeprefix("torch.") if source is not None else None]
    if dist.is_initialized():
        dist.broadcast_object_list(dtype, src=0)
    base = getattr(torch, dtype[0]) if lora and device.type == "cuda" else torch.float32  # LoRA: a frozen base
    model, tokenizer, image_cfg = build(spec, base)
    if lora:
        add_adapters(model, **lora)
        if source is not None:  # rank 0's initial adapters (A seeded, B zero) travel with the base weights
            add_adapters(source, **lora)
    if grad_checkpointing:
        enable_checkpointing(model)
    fill(shard(model, device), source, device, sampled=True)
    if lora:
        n, m = sum(p.numel() for p in model.parameters()), next(iter(adapters(model).values()))
        n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        common.print0(f"LoRA: rank {m.r}, alpha {m.alpha:g} (scale {m.scale:g}) on {len(adapters(model))} linears: "
                      f"{n_lora:,} trainable parameters ({100 * n_lora / n:.2g}% of {n:,}); the reference is the base "
                      f"(adapters off), no second model")
        return model.train(), None, tokenizer, image_cfg, dtype[0]
    ref = build(spec, torch.bfloat16 if device.type == "cuda" else torch.float32)[0]
    fill(shard(ref, device, reference=True), source, device)
    return model.train(), ref.eval(), tokenizer, image_cfg, dtype[0]


# -----------------------------------------------------------------------------
# LoRA: low-rank adapters on frozen base weights (--lora R)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(torch.nn.Linear):
    """
    A frozen linear plus a trainable rank-r update: y = x W^T + b + (alpha / r) * dropout(x) A^T B^T. It keeps the
    base's weight and bias under their own names, so the checkpoint's keys load into it as they are. A module (not a
    hook or a parametrization), so whatever calls `self_attn.q_proj(h)` sees the adapter: the model's forward in the
    log-prob paths and the sampler's hand-written decode step alike; and W + (alpha / r) B A is never formed to run it.
    """

    def __init__(self, base, r, alpha, dropout):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        fp32 = dict(dtype=torch.float32, device=base.weight.device)
        self.lora_A = torch.nn.Parameter(torch.empty(r, self.in_features, **fp32))
        self.lora_B = torch.nn.Parameter(torch.zeros(self.out_features, r, **fp32))
        self.r, self.alpha, self.scale, self.dropout, self.enabled = r, alpha, alpha / r, dropout, True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # fp32 kept, bf16 compute on a plain bf16 base
        return y + self.scale * F.linear(F.linear(F.dropout(x, self.dropout, self.training), a), b)


def lora_modules(model, targets):
    """
    {name: linear} the adapters go on, in the model's order. A target is the end of a module name: in the language
    model's decoder layers (q_proj, mlp.down_proj), or with the prefix `visual.` in the vision tower (visual.qkv,
    visual.mlp.down_proj, visual.merger.mlp.0): the vision tower stays frozen unless a target names it. `lm_head`
    names the output projection (not when it is tied to the token embedding: the merge would change both).
    """
    scopes = [("model.visual." if t.startswith("visual.") else "" if t == "lm_head" else
               "model.language_model.layers.", t.removeprefix("visual.")) for t in targets]
    hits = lambda name, scope, end: name.startswith(scope) and name.endswith("." + end) if scope else name == end
    if "lm_head" in targets and model.config.tie_word_embeddings:
        raise ValueError("--lora-targets: lm_head is tied to the token embedding in this model (its merged weight "
                         "would change the embedding too)")
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and any(hits(n, s, e) for s, e in scopes)}
    for t, (s, e) in zip(targets, scopes):
        if not any(hits(n, s, e) for n in found):
            where = "vision tower" if s == "model.visual." else "language model"
            raise ValueError(f"--lora-targets: '{t}' names no linear of the {where} (the language model's end in "
                             f"{', '.join(LORA_TARGETS)}, or lm_head; the vision tower's are visual.qkv, "
                             f"visual.attn.proj, visual.mlp.gate_proj, ..., visual.merger.mlp.0)")
    return found


def add_adapters(model, r, alpha, dropout, targets, seed):
    """
    Freeze `model` and put a LoRALinear on each linear of lora_modules(targets). A is drawn as nn.Linear draws its
    weight, U(-1/sqrt(in), 1/sqrt(in)), from a generator seeded by `seed` (the global RNG untouched), B is zero; on
    the meta device only the shapes. Returns the wrapped names.
    """
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    names = list(lora_modules(model, targets))
    for name in names:
        m = LoRALinear(model.get_submodule(name), r, alpha, dropout)
        if m.lora_A.device.type != "meta":
            with torch.no_grad():
                m.lora_A.uniform_(-m.in_features ** -0.5, m.in_features ** -0.5, generator=g)
        model.set_submodule(name, m)
    return names


def adapters(model):
    """{name: LoRALinear} of `model` ({} without LoRA)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def reference(model, ref):
    """pi_ref of Eq. 6 for the reference log-probs: `ref`, or with LoRA (no reference loaded, ref None) the policy
    with its adapters off, which is the base model exactly."""
    if ref is not None:
        yield ref
        return
    wrapped = adapters(model).values()
    for m in wrapped:
        m.enabled = False
    try:
        yield model
    finally:
        for m in wrapped:
            m.enabled = True


def trainable(model):
    """The parameters AdamW updates: every one, or with LoRA the adapters. They must be fp32 (see Precision at the top:
    train_grpo.py's --dtype refuses anything else); a frozen base weight may be bf16, it is never updated."""
    params = [p for p in model.parameters() if p.requires_grad]
    dtypes = {p.dtype for p in params} - {torch.float32}
    if dtypes:
        raise ValueError(f"AdamW over {', '.join(map(str, dtypes))} master weights: they must be fp32 (its updates at "
                         f"the paper's lr round away in bf16)")
    return params


# -----------------------------------------------------------------------------
# rollouts: the full weights gathered once per rollout phase


def generate(model, *a, **kw):
    """common.sample with the full weights gathered once (not one all-gather per layer per token); on CUDA they are
    gathered in bf16."""
    from torch.distributed.fsdp import FSDPModule

    fsdp_units = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root first
    model.eval()  # also turns activation checkpointing off, which would disable the KV cache
    if fsdp_units:
        model.set_reshard_after_forward(False)
        for m in fsdp_units:
            m.unshard()
    try:
        return common.sample(model, *a, **kw)
    finally:
        if fsdp_units:
            for m in fsdp_units:
                m.reshard()
            for m in fsdp_units[1:]:  # the root keeps FSDP's default for roots (no reshard after forward)
                m.set_reshard_after_forward(True, recurse=False)
        model.train()


# -----------------------------------------------------------------------------
# checkpoints: <out>/step_<N>/ appears complete or not at all


# -----------------------------------------------------------------------------
# log-probs (the plain path)


def completion_logprobs(model, rows, images, temperature):
    """
    Per-token log-probs [N, T] (and mask) of completions under `model` at the sampling temperature. rows:
    [(prompt_ids, image_key, completion_ids)]. One right-padded forward over prompt+completion with explicit
    3-D positions (the prompt's from rope_positions, then next_pos + j on all three axes for completion
    token j), so no position is left to the model. Images go in as pixel_values, so the vision tower runs
    inside the root forward (FSDP gathers and reduces its weights there) and trains with the rest.
    """
    device = next(model.parameters()).device
    merge = model.config.vision_config.spatial_merge_size
    P = [len(p) for p, _, _ in rows]
    T = max(len(c) for _, _, c in rows)
    L = max(p + len(c) - 1 for p, (_, _, c) in zip(P, rows))  # a completion's last token is never an input
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    pos = torch.zeros(3, len(rows), L, dtype=torch.long)
    for b, (prompt, key, comp) in enumerate(rows):
        n = len(prompt) + len(comp) - 1
        ids[b, :n] = torch.tensor(prompt + comp[:-1])
        mask[b, :n] = 1
        pos[:, b, :len(prompt)], next_pos = common.rope_positions(prompt, [images[key][1]], model.config.image_token_id, merge)
        pos[:, b, len(prompt):n] = next_pos + torch.arange(len(comp) - 1)
    pixels = torch.cat([images[key][0] for _, key, _ in rows]).to(device)
    grids = torch.tensor([images[key][1] for _, key, _ in rows], device=device)
    keep = L - min(P) + 1  # logits only from the shortest prompt's last token on: the vocab is large
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                   pixel_values=pixels, image_grid_thw=grids, use_cache=False, logits_to_keep=keep).logits
    # completion token j of row b sits at P_b + j and is predicted by the logits at P_b + j - 1
    at = torch.tensor([[p - 1 + j - (L - keep) for j in range(T)] for p in P], device=device).clamp(max=keep - 1)
    return completion_token_logprobs(logits[torch.arange(len(rows), device=device)[:, None], at], rows, temperature)


def completion_token_logprobs(logits, rows, temperature):
    """[N, T] log-probs of each row's completion tokens at the sampling temperature (0 past a completion's end) and
    the [N, T] mask, from the [N, T, V] logits that predict them. Both log-prob paths end here."""
    T = logits.shape[1]
    tok = torch.tensor([c + [0] * (T - len(c)) for _, _, c in rows], device=logits.device)
    mask = torch.tensor([[j < len(c) for j in range(T)] for _, _, c in rows], device=logits.device).float()
    logp = (logits.float() / temperature).log_softmax(-1).gather(-1, tok[..., None]).squeeze(-1)
    return logp * mask, mask


# -----------------------------------------------------------------------------
# log-probs, the shared-prefix path (--shared-prefix, the default): an image's K completions share one prompt
# of ~1,000 image tokens, so the prompt runs once per micro-batch, with gradients, and the completions attend
# to its keys/values. Equal to the plain path to float rounding (tests/test_train_grpo.py states by how much).


class PrefixLayer(DynamicLayer):
    """
    One layer's cache. Recording (the prompt forward): keep the first keys/values it is given, graph included,
    and return what it is given. Serving (the completion forward, built from recorded keys/values): return the
    prefix + the new ones and store nothing. Both are safe to call twice, which activation checkpointing does
    when it replays a layer in backward (DynamicLayer would append the replay's keys a second time).
    """

    def __init__(self, keys=None, values=None):
        super().__init__()
        self.serving = keys is not None
        if self.serving:
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.serving:
            return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        if not self.is_initialized:
            self.keys, self.values, self.device, self.is_initialized = key_states, value_states, key_states.device, True
        return key_states, value_states


@contextlib.contextmanager
def cache_under_checkpointing(model):
    """transformers drops the cache in checkpointed decoder layers (a replay would write it twice); PrefixLayer
    can be replayed, so let it through. Needs use_reentrant=False: reentrant checkpointing runs the forward
    without a graph, so the recorded prefix keys would carry no gradient, silently."""
    layers = list(model.model.language_model.layers)
    for m in layers:
        f = getattr(m, "_gradient_checkpointing_func", None)
        if m.gradient_checkpointing and getattr(f, "keywords", {}).get("use_reentrant", True) is not False:
            raise ValueError("the shared-prefix path needs gradient checkpointing with use_reentrant=False")
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache  # back to the class's False


def shared_prefix_logprobs(model, rows, images, temperature):
    """
    completion_logprobs (same rows, same result) with each distinct prompt run once. Forward 1: the rows'
    distinct prompts, left-padded into one batch, images as pixel_values, records every layer's keys/values with
    their graph; its last logits predict each completion's first token. Forward 2: per row, completion[:-1],
    right-padded, attending to its own prompt's keys/values (gathered to its row, so the prompt and the vision
    tower get the gradients of all its completions). Positions are explicit on both sides: the completion's
    continue from its prompt's (left to the model they would be silently wrong). Always two root forwards, so
    every FSDP rank runs the same collectives whatever its rows; and every prompt layer's output is on the loss's
    path (through the first token's logits), so FSDP's pre-backward hooks gather a layer before its cached keys'
    gradient needs its weights.
    """
    device = next(model.parameters()).device
    merge = model.config.vision_config.spatial_merge_size
    prefixes = list(dict.fromkeys((key, tuple(prompt)) for prompt, key, _ in rows))
    index = {p: i for i, p in enumerate(prefixes)}
    which = torch.tensor([index[(key, tuple(prompt))] for prompt, key, _ in rows], device=device)
    # forward 1: the distinct prompts
    S = max(len(prompt) for _, prompt in prefixes)
    ids = torch.zeros(len(prefixes), S, dtype=torch.long)
    mask = torch.zeros(len(prefixes), S, dtype=torch.long)
    pos = torch.zeros(3, len(prefixes), S, dtype=torch.long)
    start = []
    for b, (key, prompt) in enumerate(prefixes):
        ids[b, S - len(prompt):] = torch.tensor(prompt)
        mask[b, S - len(prompt):] = 1
        pos[:, b, S - len(prompt):], next_pos = common.rope_positions(list(prompt), [images[key][1]],
                                                                      model.config.image_token_id, merge)
        start.append(next_pos)
    pixels = torch.cat([images[key][0] for key, _ in prefixes]).to(device)
    grids = torch.tensor([images[key][1] for key, _ in prefixes], device=device)
    recorded = Cache(layers=[PrefixLayer() for _ in range(model.config.text_config.num_hidden_layers)])
    mask = mask.to(device)
    # forward 2's inputs: completion token j - 1 at position next_pos + j - 1 predicts token j (at least one
    # column, so that a batch of one-token completions still runs both forwards)
    T = max(len(c) for _, _, c in rows)
    cids = torch.zeros(len(rows), max(T - 1, 1), dtype=torch.long)
    cmask = torch.zeros(len(rows), max(T - 1, 1), dtype=torch.long)
    for r, (_, _, comp) in enumerate(rows):
        cids[r, :len(comp) - 1] = torch.tensor(comp[:-1], dtype=torch.long)
        cmask[r, :len(comp) - 1] = 1
    cpos = (torch.tensor(start)[which.cpu()][:, None] + torch.arange(cids.shape[1])).expand(3, -1, -1)
    with cache_under_checkpointing(model):
        first = model(input_ids=ids.to(device), attention_mask=mask, position_ids=pos.to(device), pixel_values=pixels,
                      image_grid_thw=grids, cache=recorded, use_cache=True, logits_to_keep=1).logits[:, -1]
        serving = Cache(layers=[PrefixLayer(m.keys[which], m.values[which]) for m in recorded.layers])
        rest = model(input_ids=cids.to(device), attention_mask=torch.cat([mask[which], cmask.to(device)], 1),
                     position_ids=cpos.to(device), cache=serving, use_cache=True).logits
    return completion_token_logprobs(torch.cat([first[which, None], rest[:, :T - 1]], 1), rows, temperature)


# -----------------------------------------------------------------------------


def check_finite(model, step):
    """Refuse to save non-finite weights: one pass over each rank's own shards."""
    from torch.distributed.tensor import DTensor

    bad = [n for n, p in model.named_parameters()
           if not torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()]
    n = torch.tensor([len(bad)], device=next(model.parameters()).device)
    if dist.is_initialized():
        dist.all_reduce(n)
    if n.item():
        where = f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}" if bad else "on another rank"
        raise ValueError(f"step {step}: the weights are not finite ({where}); refusing to save a checkpoint")


def gather(model, dtype):
    """
    ({name: full tensor in `dtype`}, {adapter name: full fp32 tensor}) on rank 0's CPU ({} on other ranks), gathered
    one parameter at a time and cast before it travels: rank 0 builds one copy in `dtype`, never a second fp32 one.
    With LoRA each wrapped weight is merged as it is gathered: W + (alpha / r) B A in fp32, then cast (one matrix at
    a time in fp32); the adapters come apart too.
    """
    from torch.distributed.tensor import DTensor

    whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
    merged = {f"{n}.weight": m for n, m in adapters(model).items()}
    full, lora, done = {}, {}, {}
    for name, p in model.state_dict(keep_vars=True).items():
        if name.endswith((".lora_A", ".lora_B")):
            t = whole(p.detach())
            if _rank() == 0:
                lora[name] = t.cpu()
            continue
        if id(p) not in done:  # tied weights are one tensor under two names
            if name in merged:
                m = merged[name]
                ba = whole(m.lora_B.detach()) @ whole(m.lora_A.detach())
                t = (whole(p.detach()).float() + m.scale * ba).to(dtype)
            else:
                t = whole(p.detach().to(dtype))
            done[id(p)] = t.cpu() if _rank() == 0 else None
        if _rank() == 0:
            full[name] = done[id(p)]
    return full, lora


@contextlib.contextmanager
def _dcp_quietly():
    """One CPU process saves and loads its resume state without a process group, as DCP allows (and warns each time)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def resume_state(model, optimizer):
    """What --resume needs, sharded: this rank's fp32 master weights (with LoRA the adapters: the frozen base is read
    again from --model) and AdamW state (no gather) and its RNG state. Also the structure dcp.load reads into (AdamW's
    state is created by a step at lr 0 if it has none yet)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    return {"model": weights, "optimizer": optim, f"rng_rank{_rank()}": rng}  # one RNG entry per rank


def save(out, step, model, optimizer, tokenizer, image_cfg, save_dtype, keep, state, args):
    """
    Write <out>/step_<step>/ (see the docstring at the top), then keep the newest `keep` step directories (0: all).
    `state` (step, epoch, world) goes to train_state.json, `args` (what a --resume must match) to args.json; both JSON.
    Collective: every rank calls it.
    """
    import torch.distributed.checkpoint as dcp
    from transformers import Qwen2_5_VLForConditionalGeneration

    check_finite(model, step)
    final, partial = os.path.join(out, f"step_{step}"), os.path.join(out, f".step_{step}.partial")
    dtype = getattr(torch, save_dtype)
    weights, lora = gather(model, dtype)
    if _rank() == 0:
        with torch.device("meta"):  # a plain module around the gathered weights, for save_pretrained
            plain = Qwen2_5_VLForConditionalGeneration._from_config(copy.deepcopy(model.config), dtype=dtype)
        plain.load_state_dict(weights, assign=True)
        plain.tie_weights()
        shutil.rmtree(partial, ignore_errors=True)
        common.save_checkpoint(plain, tokenizer, image_cfg, partial)
        common.save_prompts(partial, args["prompts"], not args["no_think"])  # the next stage asks it the same way
        del plain, weights
        if lora:
            save_adapters(partial, model, lora, args)
    _barrier()  # the directory exists (save_checkpoint renames it into place) before the ranks write into it
    with _dcp_quietly():
        dcp.save(resume_state(model, optimizer), checkpoint_id=os.path.join(partial, "resume"))
    if _rank() == 0:
        common.write_atomic(os.path.join(partial, "train_state.json"), json.dumps(state, indent=1) + "\n")
        common.write_atomic(os.path.join(partial, "args.json"), json.dumps(args, indent=1, sort_keys=True) + "\n")
        sizes = {os.path.relpath(os.path.join(d, f), partial): os.path.getsize(os.path.join(d, f))
                 for d, _, files in os.walk(partial) for f in files}
        common.write_atomic(os.path.join(partial, "manifest.json"), json.dumps(sizes, indent=1, sort_keys=True) + "\n")
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(partial, final)  # atomic: a step_<N> is always complete
        prune(out, keep)
    _barrier()


def save_adapters(path, model, lora, args):
    """<path>/adapter.safetensors (the fp32 adapters, named <module>.lora_A / .lora_B) and adapter_config.json."""
    from safetensors.torch import save_file

    wrapped = adapters(model)
    m = next(iter(wrapped.values()))
    save_file(lora, os.path.join(path, "adapter.safetensors"))
    config = dict(r=m.r, alpha=m.alpha, scale=m.scale, dropout=m.dropout, targets=args.get("lora_targets"),
                  base_model=args.get("model"), modules=list(wrapped))
    common.write_atomic(os.path.join(path, "adapter_config.json"), json.dumps(config, indent=1) + "\n")


def step_dirs(out):
    """[(step, path)] of <out>/step_<N>, newest first."""
    steps = sorted((int(d[5:]) for d in os.listdir(out) if d.startswith("step_") and d[5:].isdigit()),
                   reverse=True) if os.path.isdir(out) else []
    return [(s, os.path.join(out, f"step_{s}")) for s in steps]


def prune(out, keep):
    """Delete all but the newest `keep` step directories (0: keep all), never the one <out>/final names. Each is
    renamed away first, so a kill halfway through a deletion leaves no half-deleted step_<N> (and the next prune
    finishes it)."""
    link = os.path.join(out, "final")
    named = os.path.realpath(link) if os.path.islink(link) else None
    for _, path in step_dirs(out)[keep:] if keep else []:
        if os.path.realpath(path) != named:
            os.rename(path, os.path.join(out, "." + os.path.basename(path) + ".deleting"))
    for d in os.listdir(out):
        if d.startswith(".step_") and d.endswith(".deleting"):
            shutil.rmtree(os.path.join(out, d))


def incomplete(path):
    """Why the checkpoint `path` cannot be resumed from, or None: every file its manifest lists is there, of its size,
    and the weights' headers, the resume metadata and train_state.json parse."""
    from safetensors import SafetensorError, safe_open
    from torch.distributed.checkpoint import FileSystemReader

    try:
        with open(os.path.join(path, "manifest.json")) as f:
            sizes = json.load(f)
    except (OSError, ValueError) as e:
        return f"no readable manifest.json: {e}"
    for name, size in sorted(sizes.items()):
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            return f"{name} is missing"
        if os.path.getsize(f) != size:
            return f"{name} has {os.path.getsize(f)} of its {size} bytes"
    try:
        for name in sizes:
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(path, name), "pt") as f:
                    f.keys()
        FileSystemReader(os.path.join(path, "resume")).read_metadata()
        for name in ("train_state.json", "args.json"):
            with open(os.path.join(path, name)) as f:
                json.load(f)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        return f"unreadable: {e}"
    return None


def latest_checkpoint(out):
    """The newest complete <out>/step_<N>, or None; says why it passed over any newer one."""
    for _, path in step_dirs(out):
        why = incomplete(path)
        if why is None:
            return path
        common.print0(f"{path} is incomplete ({why}): falling back to the previous checkpoint")
    return None


def check_resume(path, args, world):
    """The checkpoint's train_state.json, if it was written on the same number of ranks by a run with the same `args`
    (the record save wrote to args.json); else a SystemExit naming what differs."""
    with open(os.path.join(path, "train_state.json")) as f:
        state = json.load(f)
    if state["world"] != world:
        raise SystemExit(f"{path} was written by {state['world']} rank(s), this run has {world}: --resume needs the "
                         f"same world size (the pairs of every step and the learning-rate schedule depend on it). To "
                         f"go on with {world}, start a new run with --model {path}")
    changed = common.changed_args(os.path.join(path, "args.json"), args)
    if changed:
        raise SystemExit(f"{path} came from other arguments ({'; '.join(changed)}); resume with the same ones (those "
                         f"whose help says so may change), or choose another --out")
    return state


def restore(path, model, optimizer):
    """Read this rank's shards of the fp32 master weights and AdamW state back from <path>/resume, and its RNG."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = resume_state(model, optimizer)
    with _dcp_quietly():
        dcp.load(state, checkpoint_id=os.path.join(path, "resume"))  # an entry missing from the checkpoint fails here
    frozen = any(not p.requires_grad for p in model.parameters())  # LoRA: the base is not in the state, nor changed
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=not frozen))
    rng = state[f"rng_rank{_rank()}"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])


def link_final(out):
    """<out>/final -> the newest complete step_<N>, replaced atomically: `final` always names a complete checkpoint."""
    last = latest_checkpoint(out)
    link = os.path.join(out, "final")
    if os.path.lexists(link + ".tmp"):
        os.remove(link + ".tmp")
    os.symlink(os.path.basename(last), link + ".tmp")
    os.replace(link + ".tmp", link)
    return link, last
