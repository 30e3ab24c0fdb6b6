"""
The memory plan: the peak bytes per rank of each phase of train_grpo.py's step (start-up, rollouts, reference
log-probs, policy forward + backward, optimizer step, save) for any model, world size and setting, found on a CPU
without the GPUs, in minutes and no memory.

    # the paper's setting on 8 ranks from the real config.json (train_grpo.py's defaults: 4 pairs, K=32, 1,024 new
    # tokens, micro-batches of 8; activation checkpointing as on CUDA); 64 GiB is the budget of an 80 GB card
    python memplan.py --model ../shared/models/qwen2.5-vl-7b-instruct --world 8 --budget 64
    # the same through bench.py, on its shapes (7b, 3b: the published config.json values)
    python bench.py --stage memory --shape 7b --world 8 --pairs 4 --k 32 --completion 1024
    python bench.py --stage memory --shape 3b --world 1 --micro-batch 2 --budget 64

How: policy.py, train_grpo.py and common.py's own code (policy.build, shard, enable_checkpointing, fill, generate;
common.sample with its shared prompt cache and with the old per-row copy; policy's log-probs and train_grpo's loss; AdamW)
runs under FakeTensorMode (tensors with shapes and no data) with torch's memory trackers (MemTracker,
FSDPMemTracker), this process being rank 0 of a fake process group of --world ranks, at the real width, image size
and token counts but with 1-3 decoder layers and vision blocks. Each phase's peak is fitted per layer and per block
and extrapolated to the full depth; the fit's prediction of the 3-layer measurement is printed (the check). Shards of
parameters, gradients and AdamW's state are arithmetic from the shapes (and the trackers must agree with it); the
start-up and save transfers are arithmetic on a process size measured here. The table says which figure is which.

With --lora R the policy is train_grpo.py --lora R's: the frozen bf16 base with fp32 adapters on every linear of
the language model (policy.add_adapters), gradients and AdamW state for the adapters only, and no reference model (the
reference log-probs are the policy's with its adapters off).

    # 7B with LoRA adapters of rank 64 on one 80 GB GPU
    python bench.py --stage memory --shape 7b --world 1 --lora 64
"""

import argparse
import collections
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch._subclasses.fake_tensor as fake_tensor
import torch.distributed as dist
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor
from torch.utils._mode_utils import no_dispatch

import common
import policy
import train_grpo

DEPTHS = [(1, 1), (2, 1), (1, 2), (3, 3)]  # (decoder layers, vision blocks): fit on the first 3, check the last
SHAPE_MODE_REAL = 1 << 28  # elements: the largest integer/bool tensor kept real (a micro-batch's 4-D attention mask)
GIB = 2 ** 30
CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # shard() is told CUDA (its precision); fake tensors live on CPU


def add_arguments(p):
    """The plan's own flags (bench.py --stage memory takes them too)."""
    p.add_argument("--world", type=int, default=8, help="ranks the model is sharded over (paper: 8)")
    p.add_argument("--image-size", default="1024x768", help="WxH of every image (KonIQ's 1024x768)")
    p.add_argument("--budget", type=float, default=64,
                   help="GiB per rank a phase may peak at (issue 13's 64 for 80 GB cards, 32 for 40 GB)")
    p.add_argument("--lora", type=int, default=0, help="rank R of train_grpo.py --lora R's adapters on the frozen bf16 "
                   "base (0: full fine-tuning)")


def parse_args(argv=None):
    d = defaults()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Qwen2.5-VL checkpoint directory (config.json and tokenizer "
                   "files are enough: no weight is read)")
    # train_grpo.py's settings, its defaults
    p.add_argument("--pairs", type=int, default=d.batch_pairs, help="pairs per step per rank (--batch-pairs)")
    p.add_argument("--k", type=int, default=d.k, help="rollouts per image")
    p.add_argument("--completion", type=int, default=d.max_new_tokens, help="new tokens per rollout (--max-new-tokens)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="completions per forward/backward")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing (default on, as train_grpo.py on CUDA)")
    p.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=d.shared_prefix,
                   help="train_grpo.py's log-prob path")
    add_arguments(p)
    return p.parse_args(argv)


def defaults():
    return train_grpo.parse_args(["--labels", "-", "--out", "-"])  # train_grpo.py's defaults


# -----------------------------------------------------------------------------
# shapes without data: FakeTensorMode, with the real code's bookkeeping tensors kept real, on fake ranks


class ShapeMode(FakeTensorMode):
    """
    FakeTensorMode in which the small integer and boolean tensors built from Python data stay real: token ids,
    masks, positions, image grids. The real code's data-dependent steps (rope positions, the vision tower's windows,
    .tolist(), a mask's .all()) then run as they do on a GPU, while every tensor made from the weights or the pixels
    stays fake. (FakeTensorMode itself keeps only one-element tensors real.)
    """

    def dispatch(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (isinstance(func, torch._ops.OpOverload) and any(x.name == "device" for x in func._schema.arguments)
                and torch.Tag.nondeterministic_seeded not in func.tags
                and not any(isinstance(x, torch.Tensor) for x in torch.utils._pytree.tree_leaves((args, kwargs)))
                and torch.device(kwargs.get("device") or "cpu").type == "cpu"):
            with no_dispatch():  # a constructor (zeros, full, arange, ...): its size and dtype on meta first
                meta = func(*args, **{**kwargs, "device": "meta"})
                real = (func(*args, **kwargs) if isinstance(meta, torch.Tensor) and not meta.dtype.is_floating_point
                        and meta.numel() <= SHAPE_MODE_REAL else None)
            if real is not None:
                return self.fake_tensor_converter.from_real_tensor(self, real, make_constant=True)
        return super().dispatch(func, types, args, kwargs)


@contextlib.contextmanager
def shape_mode():
    """ShapeMode, its real tensors allowed up to SHAPE_MODE_REAL elements, and transformers' input checks that read
    tensor values (image tokens vs image features) off: the fake image features have no values to compare."""
    limit, check = fake_tensor.CONSTANT_NUMEL_LIMIT, os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    fake_tensor.CONSTANT_NUMEL_LIMIT, os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = SHAPE_MODE_REAL, "1"
    try:
        with ShapeMode(allow_non_fake_inputs=True):
            yield
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = limit
        if check is None:
            del os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"]
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = check


@contextlib.contextmanager
def fake_ranks(world):
    """This process as rank 0 of `world` ranks whose collectives move nothing (torch's fake process group)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def cut_checkpoint(spec, layers, blocks, out):
    """A copy of checkpoint directory `spec` without weights (config, tokenizer, pixel limits) in `out`, cut to
    `layers` decoder layers and `blocks` vision blocks (all windowed then), or whole (None)."""
    from transformers import AutoConfig

    os.makedirs(out, exist_ok=True)
    for f in os.listdir(spec):
        if os.path.isfile(os.path.join(spec, f)) and f != "config.json" and ".safetensors" not in f:
            shutil.copy(os.path.join(spec, f), out)
    config = AutoConfig.from_pretrained(spec)
    if layers:
        config.text_config.num_hidden_layers = layers
        if getattr(config.text_config, "layer_types", None):
            config.text_config.layer_types = config.text_config.layer_types[:layers]
        config.vision_config.depth, config.vision_config.fullatt_block_indexes = blocks, []
    config.save_pretrained(out)
    return out


def load_fake(spec, checkpointing, lora=0, reference=True):
    """
    (policy, reference or None, tokenizer, image_cfg) of checkpoint `spec` in fake tensors, made as policy.load makes
    them on CUDA: policy.build on the meta device, activation checkpointing, policy.shard's FSDP2 units (weights
    gathered in bf16, gradients reduced in fp32), policy.fill (storage allocated, the root's first forward, the
    shards filled by rank 0's broadcast of a bf16 source); the policy's master weights fp32, the reference's bf16.
    With `lora` R: the policy is the frozen base in the checkpoint's dtype (bf16, as Qwen2.5-VL's) with fp32 adapters
    of rank R (alpha 2R, no dropout: train_grpo.py's defaults), and there is no reference (None; nor without
    `reference`).
    """
    with fake_tensor.unset_fake_temporarily():  # meta tensors, made outside the fake mode (which would wrap them)
        (model, tok, image_cfg), source = (policy.build(spec, torch.bfloat16 if lora else torch.float32),
                                           policy.build(spec, torch.bfloat16)[0])
        ref = policy.build(spec, torch.bfloat16)[0] if reference and not lora else None
        for m in (model, source) if lora else ():  # rank 0's source carries the initial adapters, as in policy.load
            policy.add_adapters(m, lora, 2.0 * lora, 0.0, policy.LORA_TARGETS, 0)
    if checkpointing:
        policy.enable_checkpointing(model)
    source.to_empty(device=CPU)  # the checkpoint rank 0 reads: bf16
    policy.fill(policy.shard(model, CUDA), source, CPU, sampled=True)
    if ref is not None:
        policy.fill(policy.shard(ref, CUDA, reference=True), source, CPU)
    return model.train(), ref, tok, image_cfg


# -----------------------------------------------------------------------------
# the trackers around each phase


class Tracker(MemTracker):
    """
    torch's MemTracker, for models with frozen parameters too (a LoRA run's base): it registers a gradient hook on
    every parameter of each module it enters, and a tensor that takes no gradient refuses one ("cannot register a hook
    on a tensor that doesn't require gradient"). A frozen parameter gets a handle that does nothing instead; it is
    still counted as a parameter.
    """

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        none = torch.utils.hooks.RemovableHandle(collections.OrderedDict())  # of no hook: remove() is a no-op
        for p in module.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles.setdefault(p, (none, none))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


def tracked_peak(model, optimizer, fn, then=None, inputs=(), fsdp=False):
    """
    {kind: bytes} on this rank at the peak of then(fn()), "Total" their sum: the policy `model`'s shards, gradients
    and AdamW state, `inputs` (tensors made before) and everything they allocate. By torch's MemTracker, or by its
    FSDPMemTracker (`fsdp`) where the run is the frozen reference's, whose parameters MemTracker cannot hook: that one
    swaps FSDP's hooks for its own, which changes how a grouped unit (a tied embedding and lm_head) runs, so it only
    watches a model that does not run, and last. A backward goes in `then`: the trackers follow the modules' nesting,
    and a backward inside the module call below would break it.
    """
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    if fsdp:
        tracker = FSDPMemTracker(model, optimizer)
        tracker.track_inputs(inputs)
    else:
        tracker = Tracker()
        tracker.track_external(model, optimizer, *torch.utils._pytree.tree_leaves(inputs))
    outer = torch.nn.Module()  # the tracker takes a second call of the root for a new step: nest fn in a module call
    outer.forward = fn
    with tracker:
        out = outer()
        if then is not None:
            then(out)
    peak = {getattr(k, "value", k): v for k, v in tracker.get_tracker_snapshot("peak")[CPU].items()}
    # and the peak inside each kind of unit, forward and backward: one part of a phase can peak below another with
    # 1-3 layers and above it with 28 (the gradients FSDP holds for every layer until the prompt's backward), so each
    # is fitted on its own. The units: FSDP2's (policy.fsdp_units and the root), the same modules in a plain one
    layers, blocks = set(model.model.language_model.layers), set(model.model.visual.blocks)
    units = {m for u in policy.fsdp_units(model) for m in (u if isinstance(u, list) else [u])} | {model}
    for module, stats in tracker.memory_tracking.items():
        kind = "decoder layers" if module in layers else "vision blocks" if module in blocks else "other units"
        for state, snaps in stats.snapshots.items() if module in units else ():
            if state.value.startswith("Peak"):
                key = f"in the {kind}, {state.value.replace('-', ' ').split()[1].lower()}"
                peak[key] = max([peak.get(key, 0)] + [s[CPU]["Total"] for s in snaps if CPU in s])
    return peak


class PrefillDone(Exception):
    pass


@contextlib.contextmanager
def split_at_prefill():
    """
    common.sample in two parts: the first call of common.prefill keeps its outputs and ends the sample (PrefillDone);
    the later ones return those outputs, so the decode runs with the prefill's results held but without its passing
    memory. Yields the kept outputs.
    """
    real, kept = common.prefill, []

    def prefill(*args, **kw):
        if kept:
            return kept[0]
        kept.append(real(*args, **kw))
        raise PrefillDone
    common.prefill = prefill
    try:
        yield kept
    finally:
        common.prefill = real


@contextlib.contextmanager
def forced_tokens(tokenizer, steps):
    """
    common.next_token's probabilities (common.token_probs: the softmax over the vocabulary is part of the peak) still
    run, but every row gets a fixed token (fake logits have no values to sample from, nor to check as finite), and
    the stop token at call `steps`. The KV cache is
    preallocated for every new token, so the first decode steps hold what the last one does, but for the attention
    over the rows' own tokens, which grows with the step (stated beside the table).
    """
    real, stop, filler, calls = common.next_token, tokenizer.convert_tokens_to_ids("<|im_end|>"), \
        tokenizer.convert_tokens_to_ids("a"), [0]

    def fixed(logits, temperature, top_p, top_k, *args, **kw):
        if temperature > 0:
            common.token_probs(logits, temperature, top_p, top_k)
        calls[0] += 1
        return torch.full(logits.shape[:1], stop if calls[0] == steps else filler, dtype=torch.long)
    common.next_token = fixed
    try:
        yield
    finally:
        common.next_token = real


def rollout_peak(model, optimizer, tok, setting, part, shared_prefix=True, inputs=()):
    """
    Peak {kind: bytes} of one part of the rollouts, run by policy.generate as train_grpo.py calls it. The parts, each
    linear in the depth (their maximum is not: with 1-3 layers a unit's gather or the prefill of the images is above
    the decode, with 28 the KV cache is far above them): "gather", generate's gather of every unit, common.sample
    doing nothing; "sample", common.sample alone, the gathered weights held (under split_at_prefill: its prefill,
    then its decode with `shared_prefix`).
    """
    real, peak = common.sample, {}
    shards = list(model.parameters())  # once gathered, the model's parameters are the gathered weights

    def sample(gathered_model, *args, **kw):
        def run():
            with contextlib.suppress(PrefillDone), forced_tokens(tok, 3):
                real(gathered_model, *args, **kw)
        if part == "sample":
            peak.update(tracked_peak(model, optimizer, run, inputs=(shards, *inputs)))
    common.sample = sample

    def gather():
        policy.generate(model, tok, setting["requests"], setting["images"], n=setting["k"],
                        max_new_tokens=setting["completion"], shared_prefix=shared_prefix)
    try:
        if part == "gather":
            return tracked_peak(model, optimizer, gather, fsdp=True)  # the gather runs no module
        gather()
        return peak
    finally:
        common.sample = real


# -----------------------------------------------------------------------------
# the phases, measured at one depth


def param_list(model):
    """[(shape, bytes per element, trainable)] of a model's parameters (each counted once)."""
    return [(tuple(p.shape), p.dtype.itemsize, p.requires_grad) for p in model.parameters()]


def shard_numel(shapes, world):
    """Elements of rank 0's FSDP2 shards: each parameter split on dim 0 into `world` chunks, rank 0's the largest
    (every rank's storage is padded to it)."""
    return sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in shapes)


def held_bytes(params, reference, world, grads=False):
    """
    Bytes of rank 0's shards that a step keeps, from parameter shapes: `params` [(shape, bytes, trainable)] of the
    policy, trainable ones with AdamW's two fp32 moments and fp32 step count (and fp32 gradients while they exist),
    frozen ones as they are; `reference` the same of a separate reference (frozen, [] where the reference is the
    policy itself, e.g. with its adapters switched off).
    """
    trainable = [s for s, _, t in params if t]
    return (sum(shard_numel([s], world) * b for s, b, _ in params + reference)
            + shard_numel(trainable, world) * (8 + (4 if grads else 0)) + 4 * len(trainable))


def measure_depth(spec, setting):
    """(peak {kind: bytes} of each measured phase, the policy's and reference's param_list, [bytes of the policy's
    shards, of AdamW's state] as the tracker saw them) of checkpoint `spec` (cut to a few layers and blocks), the
    phases in the order train_grpo.py's step runs them."""
    world, tok = setting["world"], setting["tokenizer"]
    with shape_mode():
        model, ref, _, _ = load_fake(spec, setting["checkpointing"], setting["lora"])
        params, ref_params = param_list(model), param_list(ref) if ref is not None else []
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                      foreach=True)  # what it picks on CUDA
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        optimizer.step()  # from the second step on, AdamW's two moments exist in every phase
        optimizer.zero_grad(set_to_none=True)
        held = held_bytes([], ref_params, world)  # the reference is not the trackers' model: its shards (arithmetic)
        if ref is not None:
            # and its gathered root unit (its live tensors): FSDP keeps a root's weights after its forward for the
            # backward, which the reference never runs, so its first forward leaves them (patch embedding, final
            # norm) for good
            ref.unshard()
            held += sum(p.untyped_storage().nbytes() for p in ref.parameters() if not isinstance(p, DTensor))
        peaks, images, rows = {}, setting["images"], setting["chunk"]
        with split_at_prefill() as kept:
            peaks[("rollouts", "prefill")] = rollout_peak(model, optimizer, tok, setting, "sample")
            logits, cache, mask, positions = kept[0]
            for shared in (True, False):  # the shared prompt cache (issue 12) and the old per-row copy
                peaks[("rollouts", shared)] = rollout_peak(model, optimizer, tok, setting, "sample", shared, inputs=(
                    logits, mask, positions, [(layer.keys, layer.values) for layer in cache.layers]))
            del logits, cache, mask, positions, kept[:]
        logprobs = policy.shared_prefix_logprobs if setting["shared_prefix"] else policy.completion_logprobs
        for p in model.parameters():  # from the second micro-batch on, the gradients exist
            p.grad = torch.zeros_like(p) if p.requires_grad else None

        def forward():  # train_grpo's micro-batch (one update per batch: pi_old = the policy)
            logp, mask = logprobs(model, rows, images, 1.0)
            return train_grpo.grpo_loss(logp, logp.detach(), torch.zeros_like(logp), torch.randn(len(rows)), mask,
                                        0.2, 0.05)[0]
        peaks["policy forward + backward"] = tracked_peak(model, optimizer, forward, lambda loss: loss.backward())
        optimizer.zero_grad(set_to_none=True)  # the reference runs before the policy's backward, with no gradients
        if ref is not None:
            peaks["reference log-probs"] = tracked_peak(
                model, optimizer, fsdp=True, fn=lambda: torch.no_grad()(logprobs)(ref, rows, images, 1.0))
        else:  # LoRA: the policy with its adapters off, as train_grpo.py runs it
            def reference():
                with policy.reference(model, None) as base:
                    return torch.no_grad()(logprobs)(base, rows, images, 1.0)
            peaks["reference log-probs"] = tracked_peak(model, optimizer, reference)
        # what the tracker sees of the policy's shards and AdamW's state (for shards_agree; last: the policy runs no
        # more under FSDPMemTracker's hooks), FSDPMemTracker's words or, for a plain module, MemTracker's
        sharded = dist.is_initialized()
        seen = tracked_peak(model, optimizer, lambda: None, fsdp=sharded)
        seen = [seen[k] for k in (("Sharded Param", "OptState") if sharded else ("Parameter", "Optstate"))]
        for p in peaks.values():
            p.update({k: v + held for k, v in p.items() if k == "Total" or k.startswith("in the")}, Reference=held)
        return peaks, params, ref_params, seen


def full_depth(spec, setting):
    """
    (peak bytes of the rollouts' gather above the policy's shards, the policy's param_list, parameters of a decoder
    layer, elements of the largest weight with an adapter) at the full depth: the gather is a few operations, so it is
    measured there rather than fitted (its peak is one unit's gather buffer on top of the units gathered before it:
    with few layers the largest unit's, at full depth the last one's).
    """
    with shape_mode():
        model = load_fake(spec, setting["checkpointing"], setting["lora"], reference=False)[0]
        layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
        adapted = max((m.weight.numel() for m in policy.adapters(model).values()), default=0)
        if not dist.is_initialized():  # a plain module (one process with LoRA): the rollouts run on its own weights
            return 0, param_list(model), layer, adapted
        peak = rollout_peak(model, torch.optim.AdamW(model.parameters()), setting["tokenizer"], setting, "gather")
        return peak["Total"] - peak["Sharded Param"], param_list(model), layer, adapted


def optimizer_peak(shapes, world):
    """Peak bytes of the optimizer step on one rank, clip_grad_norm_ then AdamW's foreach step (what it picks on CUDA)
    then zero_grad, over the rank's fp32 shards of the trainable `shapes`: torch's own code on plain tensors of the
    shards' shapes (FSDP2's DTensors wrap them without copies; on DTensors the tracker would also count the
    global-shape tensors DTensor makes to propagate shapes)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    with shape_mode():
        params = [torch.nn.Parameter(torch.empty(math.ceil(s[0] / world), *s[1:])) for s in shapes]
        optimizer = torch.optim.AdamW(params, lr=1e-6, foreach=True)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for p in params:
            p.grad = torch.zeros_like(p)
        tracker = MemTracker()
        tracker.track_external(*params, *[p.grad for p in params], optimizer)
        with tracker:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return tracker.get_tracker_snapshot("peak")[CPU]["Total"]


def process_rss():
    """Peak RSS of a fresh process that imports train_grpo (torch, transformers): a rank's host memory before any
    weight, measured."""
    code = "import resource, train_grpo; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024


def make_setting(spec, a):
    """The inputs of one rank's GRPO step, built as train_grpo.py builds them: images (preprocessed with the
    checkpoint's pixel limits), rollout requests, and the heaviest log-prob micro-batch (most prompts, then most
    completions), every completion --completion tokens."""
    _, tok, image_cfg = policy.build(spec, torch.float32)
    w, h = (int(x) for x in a.image_size.lower().split("x"))
    rng = np.random.default_rng(0)
    images = {i: common.preprocess_image(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), image_cfg)
              for i in range(2 * a.pairs)}
    prompts = common.load_prompts()
    requests = [(common.encode_prompt(tok, prompts, "score", [images[i][1]]), [i]) for i in images]
    filler = tok.convert_tokens_to_ids("a")
    rows = [(ids, i, [filler] * a.completion) for ids, (i,) in requests for _ in range(a.k)]
    chunks = np.array_split(np.arange(len(rows)), math.ceil(len(rows) / a.micro_batch))
    chunk = max(chunks, key=lambda c: (len({rows[j][1] for j in c}), len(c)))
    return dict(world=a.world, pairs=a.pairs, k=a.k, completion=a.completion, micro_batch=a.micro_batch,
                images=images, requests=requests, chunk=[rows[j] for j in chunk], tokenizer=tok, size=(w, h),
                checkpointing=a.grad_checkpointing is not False, shared_prefix=a.shared_prefix, lora=a.lora,
                prompt=len(requests[0][0]), visual=math.prod(images[0][1]) // image_cfg["merge_size"] ** 2)


# -----------------------------------------------------------------------------
# the fit and the table


def measure(spec, setting, log=print):
    """{(layers, blocks): (peaks of each phase, policy's param_list, reference's)} at every depth of DEPTHS."""
    measured, t0 = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for depth in DEPTHS:
            cut = cut_checkpoint(spec, *depth, os.path.join(tmp, "%d_%d" % depth))
            measured[depth] = measure_depth(cut, setting)
            log(f"  measured with {depth[0]} decoder layer(s), {depth[1]} vision block(s) ({time.time() - t0:.0f} s)")
    return measured


def fit_phases(measured, world, layers, blocks):
    """
    ({phase: its peak less the shards at (layers, blocks)}, the check): each phase's peak and its peaks inside each
    kind of unit are fitted on DEPTHS[:3], linear in the layers and in the blocks, the highest at (layers, blocks)
    counts; the check is that part's fit against its measurement at DEPTHS[-1].
    """
    full, check, last = {}, [], DEPTHS[-1]
    for key in measured[last][0]:
        grads = key == "policy forward + backward"

        def rest(depth, part):
            peaks, params, ref, _ = measured[depth]
            return peaks[key][part] - held_bytes(params, ref, world, grads)

        def fit(part, n_layers, n_blocks):
            return (rest((1, 1), part) + (rest((2, 1), part) - rest((1, 1), part)) * (n_layers - 1)
                    + (rest((1, 2), part) - rest((1, 1), part)) * (n_blocks - 1))
        parts = [p for p in measured[last][0][key] if p == "Total" or p.startswith("in the")
                 and all(p in m[0][key] for m in measured.values())]
        at = max(parts, key=lambda p: fit(p, layers, blocks))
        full[key] = fit(at, layers, blocks)
        got = measured[last][0][key][at]
        predicted = got - rest(last, at) + fit(at, *last)
        check.append(dict(phase=phase_name(key), part=at, predicted_gib=predicted / GIB, measured_gib=got / GIB,
                          error=abs(predicted - got) / got))
    return full, check


def phase_name(key):
    if isinstance(key, str):
        return key
    return "rollouts, " + {"prefill": "prefill", "gather": "gather", True: "decode, one prompt copy (issue 12)",
                           False: "decode, prompt copied per row"}[key[1]]


def shards_agree(measured, world):
    """Whether the tracker saw exactly the policy's shards and AdamW's state the arithmetic says, at every measured
    depth."""
    return all(
        m[3][0] == sum(shard_numel([s], world) * b for s, b, _ in m[1])
        and m[3][1] == 8 * shard_numel([s for s, _, t in m[1] if t], world) + 4 * sum(t for *_, t in m[1])
        for m in measured.values())


def plan(spec, world=8, pairs=None, k=None, completion=None, micro_batch=None, grad_checkpointing=True,
         shared_prefix=None, image_size="1024x768", budget=64, lora=0, log=print):
    """
    Print and return the memory plan per rank of train_grpo.py on `world` ranks for checkpoint directory `spec`
    (config.json and tokenizer files; no weight is read), with train_grpo.py's settings (None: its defaults), and
    with `lora` R its --lora R (see load_fake): only parameters with requires_grad get gradients and AdamW state, in
    the measurements and in the arithmetic, frozen ones count at their own dtype, and no reference is held.
    """
    from transformers import AutoConfig

    d, t0 = defaults(), time.time()
    a = argparse.Namespace(world=world, pairs=pairs or d.batch_pairs, k=k or d.k,
                           completion=completion or d.max_new_tokens, micro_batch=micro_batch or d.micro_batch,
                           grad_checkpointing=grad_checkpointing, image_size=image_size, lora=lora,
                           shared_prefix=d.shared_prefix if shared_prefix is None else shared_prefix)
    setting = make_setting(spec, a)
    config = AutoConfig.from_pretrained(spec)
    text, vision = config.text_config, config.vision_config
    B, K, T, P, budget = 2 * a.pairs, a.k, a.completion, setting["prompt"], budget * GIB
    R = B * K
    log(f"\nmemory plan per rank ({os.path.basename(os.path.normpath(spec))}, {world} ranks): {a.pairs} pairs = {B} "
        f"images of {image_size} ({setting['visual']} visual tokens, prompts of {P} tokens) x K={K} = {R} rollouts of "
        f"{T} new tokens; log-probs in micro-batches of {a.micro_batch} completions "
        f"({'shared-prefix' if a.shared_prefix else 'plain'} path); activation checkpointing "
        f"{'on' if setting['checkpointing'] else 'off'}"
        + (f"; LoRA adapters of rank {lora} on the frozen bf16 base, no reference model" if lora else ""))
    plain = bool(lora) and world == 1  # one process with LoRA: a plain module, no process group (init_single_process)
    with contextlib.nullcontext() if plain else fake_ranks(world):
        measured = measure(spec, setting, log)
        gather, params, layer, adapted = full_depth(spec, setting)
    ref_params = [] if lora else [(s, 2, False) for s, _, _ in params]  # bf16, frozen
    trainable = [s for s, _, t in params if t]
    opt_peak = optimizer_peak(trainable, world)
    full_rest, check = fit_phases(measured, world, text.num_hidden_layers, vision.depth)
    # the gather, measured at full depth on the policy alone: with the reference's gathered root unit, as the others
    last = measured[DEPTHS[-1]]
    full_rest[("rollouts", "gather")] = gather + last[0]["reference log-probs"]["Reference"] - held_bytes(
        [], last[2], world)
    agrees = shards_agree(measured, world)
    held = {g: held_bytes(params, ref_params, world, g) for g in (False, True)}
    total = sum(math.prod(s) for s, _, _ in params)
    largest, itemsize = max((math.prod(s), b) for s, b, _ in params)
    kv_token = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads
                                                                        ) * 2  # bytes per token (bf16 keys, values)
    kv = {True: (B * P + R * T) * kv_token,  # one prompt copy per request, each row's room for T tokens
          False: (B * P + 2 * R * P + R * T) * kv_token}  # while the cache is built: the prefill's, the gathered
    # copies per row, and the rows' buffers with room for T tokens
    rss = process_rss()
    parts = {key[1]: v for key, v in full_rest.items() if isinstance(key, tuple)}
    rows = [dict(phase=phase_name(("rollouts", shared)), how="measured", shards=held[False], kv=kv[shared],
                 rest=max(parts["gather"], parts["prefill"], parts[shared])) for shared in (True, False)]
    rows += [dict(phase=key, how="measured", shards=held[key == "policy forward + backward"], kv=0,
                  rest=full_rest[key]) for key in full_rest if isinstance(key, str)]
    bf16_copy = 2 * total  # the checkpoint rank 0 reads (memory-mapped) at start-up and gathers at a save
    # on the device: a tensor in flight at start-up (broadcast, then its slice cast) and at a save (gathered in bf16);
    # a plain module (one process with LoRA) copies its weights in and out as they lie. With LoRA a save merges each
    # adapted linear W [out, in] in fp32: B A, W in fp32, their sum and its scaled term, 16 bytes an element (18 with
    # W gathered), `adapted` the elements of the largest such W
    start_rest = 0 if plain else 2 * largest + itemsize * largest // world
    save_rest = max(0 if plain else 2 * largest + 2 * largest // world, (16 if plain else 18) * adapted)
    host_target = rss + bf16_copy + held[False]  # issue 13: the process, one bf16 copy on rank 0 and the shards
    rows = [dict(phase="start-up, host, rank 0", how="computed", shards=0, rest=rss + bf16_copy, kv=0,
                 target=host_target),
            dict(phase="start-up, host, other ranks", how="computed", shards=0, rest=rss, kv=0,
                 target=host_target - bf16_copy),
            dict(phase="start-up, device", how="computed", kv=0, rest=start_rest,
                 shards=sum(shard_numel([s], world) * b for s, b, _ in params + ref_params))] + rows + [
            dict(phase="optimizer step", how="measured", shards=held[True], kv=0,  # measured on the trainable
                 rest=opt_peak - held_bytes([(s, 4, True) for s in trainable], [], world, True)),  # shards only
            dict(phase="save, device", how="computed", shards=held[False], kv=0, rest=save_rest),
            dict(phase="save, host, rank 0", how="computed", shards=0, rest=rss + bf16_copy, kv=0, target=host_target),
            dict(phase="save, host, other ranks", how="computed", shards=0, kv=0,
                 rest=rss + 4 * math.ceil(max(map(math.prod, trainable)) / world), target=host_target - bf16_copy)]
    log(f"  {'phase':46s} {'how':>9s} {'shards':>7s} {'rest':>7s} {'of it KV':>8s} {'peak':>7s} {'target':>7s}  GiB")
    for r in rows:
        r.setdefault("target", budget)
        r.update(peak=r["shards"] + r["rest"])
        r.update({x: r[x] / GIB for x in ("shards", "rest", "kv", "peak", "target")}, fits=r["peak"] <= r["target"])
        log(f"  {r['phase']:46s} {r['how']:>9s} {r['shards']:7.2f} {r['rest']:7.2f} {r['kv']:8.2f} {r['peak']:7.2f} "
            f"{r['target']:7.2f}  {'PASS' if r['fits'] else 'MISS by %.2f' % (r['peak'] - r['target'])}")
    fixes = [f"    {r['phase']}: {fix}" for r in rows if not r["fits"] for fix in [
        remedy(r, a, budget / GIB, parts["gather"] / GIB if r["phase"].startswith("rollouts") else 0)] if fix]
    if fixes:
        log("  what would fit instead (estimates from the figures above, each setting on its own; confirm with a run "
            "of the plan with it):\n" + "\n".join(fixes))
    log("  shards: what each rank keeps (computed); rest: the phase's peak above them (the 'how' column); of it KV: "
        "the KV cache's bytes inside the rollouts' rest (computed from the shapes)")
    log(f"  rollouts, the rest part by part: the gather of every unit {parts['gather'] / GIB:.2f} (measured at full "
        f"depth), the prefill {parts['prefill'] / GIB:.2f}, the decode {parts[True] / GIB:.2f} (one prompt copy), "
        f"{parts[False] / GIB:.2f} (prompt copied per row) GiB")
    log("  shards (computed): " + ("the frozen bf16 base and the fp32 adapters with AdamW's moments (and fp32 "
        "gradients where they exist)" if lora else "the policy's fp32 master weights and AdamW's moments (and fp32 "
        "gradients where they exist) and the reference's bf16 weights") + f", 1/{world} each, FSDP2's padding of dim "
        f"0 included; the tracker saw exactly the policy's and AdamW's at every measured depth: "
        f"{'yes' if agrees else 'NO'}")
    log("  rest, measured: torch's memory trackers under FakeTensorMode, " + (
        "one process, a plain module (LoRA on one GPU: no FSDP2, no gather)" if plain else
        f"this process rank 0 of a fake {world}-rank process group") + ", the real code at the real width, image "
        f"size and token counts with (decoder layers, vision blocks) = {' '.join(f'({x},{y})' for x, y in DEPTHS)}, "
        f"fitted per layer and per block and extrapolated to "
        f"({text.num_hidden_layers},{vision.depth}); the rollouts' gather and the optimizer step at full depth. "
        f"Computed: start-up (rank 0 reads the checkpoint once in bf16, memory-mapped, and broadcasts a tensor at a "
        f"time; the other ranks receive on the device) and save (a parameter at a time gathered in bf16 to rank 0's "
        f"host; DCP writes each rank's own shards), on a process of {rss / GIB:.2f} GiB before any weight (measured "
        f"here)")
    log(f"  not in the figures: the CUDA context, NCCL's and cuBLAS's buffers, the caching allocator's rounding and "
        f"fragmentation (no GPU here); FSDP's overlap on CUDA streams, one unit gathered ahead and one "
        f"reduce-scatter behind (computed: {6 * layer / GIB:.2f} GiB for a decoder layer); the decode attention "
        f"over the rows' own tokens after step 3 (computed: < {R * text.num_attention_heads * T * 8 / GIB:.2f} GiB)")
    log(f"  extrapolation check: the fit on (layers, blocks) = {' '.join(map(str, DEPTHS[:3]))} predicts "
        f"{DEPTHS[-1]}; each phase's peak and its peaks inside each kind of unit are fitted, the highest at full "
        f"depth counts:")
    for c in check:
        log(f"    {c['phase']:46s} predicted {c['predicted_gib']:8.3f} GiB, measured {c['measured_gib']:8.3f} GiB, "
            f"error {c['error']:.2%} ({'the whole phase' if c['part'] == 'Total' else c['part']}: its peak at full "
            f"depth)")
    return dict(world=world, lora=lora, pairs=a.pairs, k=K, completion=T, micro_batch=a.micro_batch,
                grad_checkpointing=setting["checkpointing"], shared_prefix=a.shared_prefix, image=list(setting["size"]),
                prompt_tokens=P, parameters=total, trainable=sum(math.prod(s) for s in trainable), budget_gib=budget /
                GIB, phases=rows, check=check, shards_agree=agrees, fixes=fixes,
                rollout_parts_gib={str(x): v / GIB for x, v in parts.items()}, host_rss_gib=rss / GIB,
                depths=[dict(layers=dp[0], blocks=dp[1], phases={str(x): v for x, v in m[0].items()})
                        for dp, m in measured.items()], seconds=time.time() - t0)


def remedy(r, a, budget, fixed):
    """A setting that brings a missing phase under its target (GiB), estimated from the row's own figures: the
    rollouts' rest less `fixed` (their gathered weights) taken as proportional to the pairs, every other rest as it is
    (measured at 7B: forward + backward's is the same at micro-batch 4 and 8, on 8 and 16 ranks), the shards as
    proportional to 1/world. The fewest ranks first, then the most pairs there."""
    if r["phase"].startswith(("start-up, host", "save, host")):
        return ""  # host RAM: the node's, not a setting's
    rollouts = r["phase"].startswith("rollouts")
    for world in range(a.world, 1025):
        room = budget - r["shards"] * a.world / world - (fixed if rollouts else r["rest"])
        pairs = math.floor(a.pairs * room / (r["rest"] - fixed)) if rollouts and room > 0 else 0
        if pairs >= 1 if rollouts else room >= 0:
            return " ".join(([f"--world {world}"] if world != a.world else [])
                            + ([f"--pairs {min(pairs, a.pairs)}"] if rollouts else []))
    return "none up to 1,024 ranks"


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(1)
    return plan(a.model, a.world, a.pairs, a.k, a.completion, a.micro_batch, a.grad_checkpointing, a.shared_prefix,
                a.image_size, a.budget, a.lora)


if __name__ == "__main__":
    main()
