"""A plain-PyTorch (eager) reference of our DINO and POA training steps (GitHub issue 12).

Written from REFERENCE.md §1 (POA) and §2 (DINO) and from the semantics our docstrings state,
with PyTorch's standard fast paths and none of our Keras layers: it is the baseline that
``benchmarks/step.py`` can time against our trainers, and the independent check of their
arithmetic that ``tests/test_torch_reference.py`` runs (same losses, same student and teacher
weights after a few steps).

What it computes, per step (``ReferenceTrainer.train_step``):

* Elastic ViT (``TorchElasticViT``): strided-conv patch embedding, cls token, learned position
  embedding (resized for other grids with ``F.interpolate(mode="bicubic",
  align_corners=False, size=...)``), pre-norm blocks ``x + ls1 * attn(norm1(x))``,
  ``x + ls2 * mlp(norm2(x))`` (fused qkv, ``F.scaled_dot_product_attention``, exact GELU),
  final LayerNorm; outputs the final-norm cls token. A subnet (w, d) keeps the first w channels
  of every weight (q, k and v sliced separately), the blocks ``floor((D - 1) j / (d - 1))``
  (block 0 for d = 1), multiplies every elastic linear's input by ``alpha = max_in / active_in``
  (folded into the sliced weight; biases unscaled; the patch conv's inputs are never sliced)
  and normalises each LayerNorm over the active channels only.
* Heads (``TorchDINOHead``; POA's MultiProjectionHead = a list of them): elastic first linear
  (first w input columns times in_dim / w), Linear-GELU-...-Linear, L2 normalisation
  (``F.normalize``), weight-normalised last linear without bias (``torch._weight_norm``, the
  op behind ``nn.utils.weight_norm``), gain g fixed at 1 when ``norm_last_layer``.
* Teacher targets: Sinkhorn-Knopp on exp(logits / T) (the DINOv2 iteration; the global max is
  subtracted before exp, which every normalisation cancels) or DINO centering
  ``softmax((t - c) / T)`` with ``c <- m c + (1 - m) mean(t)`` after the targets were made.
* DINO loss: sum over (teacher global view i, student view j != i) of the batch-mean
  cross-entropy with ``log_softmax(s / student_temp)``, divided by n_terms = 2 (2 + v) - 2.
* POA loss, per head: ``[λ CE(intact) + (1 - λ) CE(elastic)]`` over the same pairs / n_terms,
  plus ``(1 - λ)`` times the same-view term CE(softmax(intact.detach() / same_view_temp),
  elastic) on the global views (batch-mean over 2B) plus the same on the local views; mean over
  heads; plus koleo_weight x KoLeo of the global CLS tokens (each global view on its own,
  summed over the two views, averaged over the intact and the elastic student).
* Update: ``loss.backward()``; DINO's frozen steps set the last layer's ``.grad`` to None
  (DINO's cancel_gradients_last_layer); ``clip_grad_norm_(..., foreach=True)`` (scale
  ``min(1, clip / (norm + 1e-6))``; without clipping the norm is only measured);
  ``torch.optim.AdamW(foreach=True)`` with one parameter group per (lr multiplier, decayed or
  not, heads' last layer or not): lr multiplier = layer decay x patch-embed multiplier
  (DINOv2/POA layer ids: patch embed and tokens 0, block i i + 1, final norm depth + 1; heads
  1), times the step's ``last_layer_lr_scale`` for the heads' last layers (POA's freeze); weight
  decay 0 for ndim <= 1 parameters in OUR layout (the weight-norm gain g, (K, 1) here as in
  torch's weight_norm, is a (K,) vector there: not decayed). Then the EMA teacher
  ``t = m t + (1 - m) s`` over every backbone and head tensor (``torch._foreach_mul_`` /
  ``torch._foreach_add_``).

Inputs that come from our trainer (so both sides run the same experiment): the initial
weights (numpy copies of the freshly built Keras trainer's student and teacher), every per-step
value (``keras_trainer.step_hyperparameters(step)``: learning_rate, weight_decay, momentum,
teacher_temp, lambda_ie, koleo_weight, last_layer_lr_scale), the recipe's method settings and
the plan sequence (a fresh ``backbone.sampler(seed=recipe["sampler_seed"],
net_select_scale=recipe["net_select_scale"])``, which draws what our trainer's own sampler
draws).

Adam conventions (``adam_convention``). Keras' Adam/AdamW adds epsilon to sqrt(v) BEFORE the
bias correction (``lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps)``) and counts t with the
optimizer's global iteration counter; PyTorch adds it after (``lr / (1 - b1^s) m /
(sqrt(v) / sqrt(1 - b2^s) + eps)``) and counts s per parameter, skipping steps where the
parameter had no gradient (DINO's frozen last layer). ``"keras"`` (the default, to compare
with our trainer) sets each group's lr, eps and weight decay every step so that
``torch.optim.AdamW`` computes exactly Keras' update: ``lr_g = m lr sqrt(1 - b2^t) (1 - b1^s)
/ ((1 - b1^t) sqrt(1 - b2^s))``, ``eps_g = eps / sqrt(1 - b2^s)``, ``wd_g = wd m lr / lr_g``
(m = the group's multiplier). ``"torch"`` uses ``lr_g = m lr``, ``eps_g = eps``, ``wd_g = wd``:
plain PyTorch/DINO semantics. Both are the same work per step. Keras SGD (no momentum, no
nesterov) maps to ``torch.optim.SGD(foreach=True)`` (its coupled weight decay equals Keras'
decoupled one when there is no momentum).

Not covered: iBOT (``ibot_weight`` > 0), stochastic depth (drop-path rate > 0: random draws
cannot match), families other than ElasticViT, multiple devices.

Use from a benchmark (e.g. benchmarks/step.py, after building ``poa`` and ``dino`` there and
BEFORE their first step, so both start from the same weights)::

    import torch_reference                      # benchmarks/ is on sys.path for scripts there
    ref = torch_reference.ReferenceTrainer.from_trainer(poa, device="cuda")  # or "cpu"
    logs = ref.train_step(data)                 # numpy batch {"global", "local"} as ours
    logs = ref.train_step(data, plan=spec)      # a pinned plan (ViTSubnet or (w, d))
    seconds, logs = ref.timed_step(data, plan=spec)   # one step, synchronised, timed
    ref.forced_plan = spec; _step(ref, data)    # step.py's own timing helper works as is:
                                                # ref.train_on_batch(data, return_dict=True)

``train_step`` returns Python floats (it waits for the device), as ``train_on_batch`` does;
``last_plan`` and ``forced_plan`` behave as on step.py's ``PinnedPOA``. The device defaults to
CUDA when available (our torch backend's choice too); pass ``device="cpu"`` to compare on CPU.
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- the backbone
def _param(*shape):
    """A parameter of zeros (every value is copied in from the Keras trainer)."""
    return nn.Parameter(torch.zeros(*shape))


def kept_blocks(max_depth, depth):
    """Blocks a depth-`depth` subnet of a `max_depth` ViT runs: floor((D - 1) j / (d - 1))."""
    if depth == 1:
        return [0]
    return [((max_depth - 1) * j) // (depth - 1) for j in range(depth)]


class TorchBlock(nn.Module):
    """Pre-norm ViT block; weights in PyTorch layout (Linear: (out, in))."""

    def __init__(self, dim, head_dim, hidden, layer_scale, eps, qkv_bias, proj_bias, ffn_bias):
        super().__init__()
        self.dim, self.head_dim, self.hidden, self.eps = dim, head_dim, hidden, eps
        self.ratio = hidden // dim
        p = _param
        self.norm1_weight, self.norm1_bias = p(dim), p(dim)
        self.qkv_weight = p(3 * dim, dim)
        self.qkv_bias = p(3 * dim) if qkv_bias else None
        self.proj_weight = p(dim, dim)
        self.proj_bias = p(dim) if proj_bias else None
        self.norm2_weight, self.norm2_bias = p(dim), p(dim)
        self.fc1_weight = p(hidden, dim)
        self.fc1_bias = p(hidden) if ffn_bias else None
        self.fc2_weight = p(dim, hidden)
        self.fc2_bias = p(dim) if ffn_bias else None
        self.ls1 = p(dim) if layer_scale else None
        self.ls2 = p(dim) if layer_scale else None

    def forward(self, x, width=None):
        d = self.dim
        w = d if width is None else width
        b, n, _ = x.shape
        if w == d:  # the intact block: full weights, no slicing
            qkv_w, qkv_b = self.qkv_weight, self.qkv_bias
            proj_w, proj_b = self.proj_weight, self.proj_bias
            fc1_w, fc1_b, fc2_w, fc2_b = self.fc1_weight, self.fc1_bias, self.fc2_weight, \
                self.fc2_bias
            n1w, n1b, n2w, n2b = self.norm1_weight, self.norm1_bias, self.norm2_weight, \
                self.norm2_bias
            ls1, ls2 = self.ls1, self.ls2
            h = self.hidden
        else:
            alpha = d / w                       # every elastic linear: max_in / active_in
            h = self.ratio * w
            qkv_w = self.qkv_weight.view(3, d, d)[:, :w, :w].reshape(3 * w, w) * alpha
            qkv_b = None if self.qkv_bias is None else \
                self.qkv_bias.view(3, d)[:, :w].reshape(3 * w)
            proj_w = self.proj_weight[:w, :w] * alpha
            proj_b = None if self.proj_bias is None else self.proj_bias[:w]
            fc1_w = self.fc1_weight[:h, :w] * alpha
            fc1_b = None if self.fc1_bias is None else self.fc1_bias[:h]
            fc2_w = self.fc2_weight[:w, :h] * (self.hidden / h)
            fc2_b = None if self.fc2_bias is None else self.fc2_bias[:w]
            n1w, n1b = self.norm1_weight[:w], self.norm1_bias[:w]
            n2w, n2b = self.norm2_weight[:w], self.norm2_bias[:w]
            ls1 = None if self.ls1 is None else self.ls1[:w]
            ls2 = None if self.ls2 is None else self.ls2[:w]
        heads = w // self.head_dim
        y = F.layer_norm(x, (w,), n1w, n1b, self.eps)
        qkv = F.linear(y, qkv_w, qkv_b).view(b, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])      # (B, heads, N, hd)
        y = F.linear(y.transpose(1, 2).reshape(b, n, w), proj_w, proj_b)
        x = x + (y if ls1 is None else y * ls1)
        y = F.layer_norm(x, (w,), n2w, n2b, self.eps)
        y = F.linear(F.gelu(F.linear(y, fc1_w, fc1_b)), fc2_w, fc2_b)
        return x + (y if ls2 is None else y * ls2)


class TorchElasticViT(nn.Module):
    """The elastic ViT; ``forward(images (N, C, H, W), subnet=None) -> final-norm cls (N, w)``."""

    def __init__(self, image_size, patch_size, embed_dim, depth, head_dim, mlp_ratio=4.0,
                 layer_scale=True, eps=1e-6, in_channels=3, mask_token=True, qkv_bias=True,
                 proj_bias=True, ffn_bias=True):
        super().__init__()
        self.patch_size, self.dim, self.depth = int(patch_size), int(embed_dim), int(depth)
        self.grid = int(image_size) // self.patch_size
        self.eps = float(eps)
        hidden = int(embed_dim * mlp_ratio)
        if hidden % embed_dim:
            raise NotImplementedError("the reference slices the MLP as ratio * w: it needs an "
                                      "integer mlp_ratio")
        p = _param
        self.patch_weight = p(embed_dim, in_channels, patch_size, patch_size)
        self.patch_bias = p(embed_dim)
        self.cls_token = p(1, 1, embed_dim)
        self.pos_embed = p(1, 1 + self.grid ** 2, embed_dim)
        # Only iBOT's masked views use the mask token (not covered here): no gradient, but the
        # teacher still averages it.
        self.mask_token = nn.Parameter(torch.zeros(embed_dim), requires_grad=False) \
            if mask_token else None
        self.blocks = nn.ModuleList(
            TorchBlock(embed_dim, head_dim, hidden, layer_scale, eps, qkv_bias, proj_bias,
                       ffn_bias) for _ in range(depth))
        self.norm_weight, self.norm_bias = p(embed_dim), p(embed_dim)

    def layer_id(self, name):
        """DINOv2/POA's layer id of a parameter (by its name here)."""
        if name.startswith(("patch_", "cls_token", "pos_embed", "mask_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def _pos_embed(self, gh, gw, w):
        pos = self.pos_embed if w == self.dim else self.pos_embed[..., :w]
        if (gh, gw) == (self.grid, self.grid):
            return pos
        patch = pos[:, 1:].reshape(1, self.grid, self.grid, w).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(gh, gw), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, w)
        return torch.cat([pos[:, :1], patch], dim=1)

    def forward(self, images, subnet=None):
        w, d = (self.dim, self.depth) if subnet is None else (int(subnet[0]), int(subnet[1]))
        if w == self.dim:
            kernel, bias, cls = self.patch_weight, self.patch_bias, self.cls_token
            norm_w, norm_b, width = self.norm_weight, self.norm_bias, None
        else:
            kernel, bias, cls = self.patch_weight[:w], self.patch_bias[:w], \
                self.cls_token[..., :w]
            norm_w, norm_b, width = self.norm_weight[:w], self.norm_bias[:w], w
        x = F.conv2d(images, kernel, bias, stride=self.patch_size)     # (N, w, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                # (N, gh gw, w)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self._pos_embed(gh, gw, w)
        blocks = range(self.depth) if d == self.depth else kept_blocks(self.depth, d)
        for i in blocks:
            x = self.blocks[i](x, width)
        return F.layer_norm(x[:, 0], (w,), norm_w, norm_b, self.eps)   # the cls row only


# ------------------------------------------------------------------------------- the heads
class TorchDINOHead(nn.Module):
    """DINO head with an elastic first linear; ``forward(x (N, w)) -> logits (N, K)``."""

    def __init__(self, in_dim, out_dim, hidden_dim, bottleneck_dim, num_layers=3,
                 norm_last_layer=True, use_bias=True):
        super().__init__()
        self.in_dim = int(in_dim)
        widths = [int(in_dim)] + [int(hidden_dim)] * (num_layers - 1) + [int(bottleneck_dim)]
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(o, i))
                                        for i, o in itertools.pairwise(widths))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(o)) for o in widths[1:]) \
            if use_bias else None
        self.last_v = nn.Parameter(torch.zeros(out_dim, bottleneck_dim))
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x):
        w = x.shape[-1]
        for i, weight in enumerate(self.weights):
            if i == 0 and w != self.in_dim:
                weight = weight[:, :w] * (self.in_dim / w)
            if i:
                x = F.gelu(x)
            x = F.linear(x, weight, None if self.biases is None else self.biases[i])
        x = F.normalize(x, dim=-1, eps=1e-12)
        return F.linear(x, torch._weight_norm(self.last_v, self.last_g, 0))


class TorchHeads(nn.Module):
    """One or more DINO heads reading the same features (POA's MultiProjectionHead)."""

    def __init__(self, heads):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x):
        return [head(x) for head in self.heads]


# ---------------------------------------------------------------------------- the losses
def sinkhorn_knopp(logits, temp, iterations):
    """DINOv2's Sinkhorn-Knopp on Q = exp(logits / T)^T (K, B); returns (B, K) targets."""
    q = torch.exp((logits - logits.max()) / temp).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def cross_view_ce(probs, log_q):
    """Sum over (teacher view i, student view j != i) of the batch-mean CE; (total, n_terms).

    probs (G, B, K) teacher targets (the first G student views are the same crops), log_q
    (V, B, K) student log-probabilities."""
    g, v, b = probs.shape[0], log_q.shape[0], probs.shape[1]
    pair = torch.einsum("gbk,vbk->gv", probs, log_q)            # sum over batch and prototypes
    # every pair minus the same-view ones (i, i), i < g: no boolean indexing (no device sync)
    return -(pair.sum() - torch.diagonal(pair).sum()) / b, g * v - g


def koleo(x, eps=1e-8):
    """-mean log(distance to the nearest other sample + eps) of L2-normalised x (B, D)."""
    x = F.normalize(x, dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.t()
        sims.fill_diagonal_(-2.0)                                # never the sample itself
        nearest = sims.argmax(dim=1)
    return -torch.log((x - x[nearest]).norm(dim=-1) + eps).mean()


# ---------------------------------------------------------------------- Keras -> PyTorch
def _numpy(variable):
    import keras
    return np.asarray(keras.ops.convert_to_numpy(variable), dtype=np.float32)


# layout converters: Keras array -> torch array, and back
_TO_TORCH = {
    "plain": lambda a: a,
    "dense": lambda a: a.T,                          # (in, out) -> (out, in)
    "conv": lambda a: a.transpose(3, 2, 0, 1),       # (kh, kw, cin, cout) -> (cout, cin, kh, kw)
    "gain": lambda a: a.reshape(-1, 1),              # (K,) -> (K, 1)
}
_TO_KERAS = {
    "plain": lambda a: a,
    "dense": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "gain": lambda a: a.reshape(-1),
}


def _vit_entries(kb):
    """[(keras variable, torch parameter name, layout)] of an ElasticViT."""
    out = [(kb.patch_embed.proj.kernel, "patch_weight", "conv"),
           (kb.patch_embed.proj.bias, "patch_bias", "plain"),
           (kb.cls_token, "cls_token", "plain"), (kb.pos_embed, "pos_embed", "plain")]
    if kb.mask_token is not None:
        out.append((kb.mask_token, "mask_token", "plain"))
    for i, blk in enumerate(kb.blocks):
        pre = f"blocks.{i}."
        out += [(blk.norm1.norm.gamma, pre + "norm1_weight", "plain"),
                (blk.norm1.norm.beta, pre + "norm1_bias", "plain"),
                (blk.norm2.norm.gamma, pre + "norm2_weight", "plain"),
                (blk.norm2.norm.beta, pre + "norm2_bias", "plain")]
        for layer, name in ((blk.attn.qkv, "qkv"), (blk.attn.proj, "proj"),
                            (blk.mlp.fc1, "fc1"), (blk.mlp.fc2, "fc2")):
            out.append((layer.dense.kernel, pre + name + "_weight", "dense"))
            if layer.use_bias:
                out.append((layer.dense.bias, pre + name + "_bias", "plain"))
        if blk.ls1 is not None:
            out += [(blk.ls1.gamma, pre + "ls1", "plain"), (blk.ls2.gamma, pre + "ls2", "plain")]
    out += [(kb.norm.norm.gamma, "norm_weight", "plain"),
            (kb.norm.norm.beta, "norm_bias", "plain")]
    return out


def _head_entries(khead, prefix=""):
    out = []
    for i, layer in enumerate(khead.mlp):
        dense = layer.dense if hasattr(layer, "dense") else layer     # ElasticDense or Dense
        out.append((dense.kernel, f"{prefix}weights.{i}", "dense"))
        if khead.use_bias:
            out.append((dense.bias, f"{prefix}biases.{i}", "plain"))
    out += [(khead.last_layer.weight_v, f"{prefix}last_v", "dense"),
            (khead.last_layer.weight_g, f"{prefix}last_g", "gain")]
    return out


def _keras_heads(khead):
    return list(khead.heads) if hasattr(khead, "heads") else [khead]


def _torch_backbone(kb):
    from poa_keras import ElasticViT
    if not isinstance(kb, ElasticViT):
        raise NotImplementedError(f"the reference covers ElasticViT only, got {type(kb)}")
    if kb.drop_path_rate:
        raise NotImplementedError("stochastic depth (random draws) cannot be reproduced")
    return TorchElasticViT(kb.image_size, kb.patch_size, kb.embed_dim, kb.depth, kb.head_dim,
                           kb.mlp_ratio, bool(kb.layer_scale_init), kb.norm_epsilon,
                           kb.in_channels, kb.use_mask_token, kb.qkv_bias, kb.proj_bias,
                           kb.ffn_bias)


def _torch_heads(khead):
    return TorchHeads([TorchDINOHead(h.in_dim, h.out_dim, h.hidden_dim, h.bottleneck_dim,
                                     h.num_layers, h.norm_last_layer, h.use_bias)
                       for h in _keras_heads(khead)])


def _all_head_entries(khead):
    out = []
    for i, h in enumerate(_keras_heads(khead)):
        out += _head_entries(h, prefix=f"heads.{i}.")
    return out


class _Mirror:
    """A torch module and the Keras variables its parameters came from."""

    def __init__(self, module, entries, keras_layer):
        self.module = module
        params = dict(module.named_parameters())
        self.entries = [(v.path, name, kind) for v, name, kind in entries]
        covered = {id(v) for v, _, _ in entries}
        from poa_keras.quantization import activation_quantizers

        # the activation quantizers' calibrated ranges are state of PTQ, unused in float
        # training: nothing to mirror
        ranges = {id(q.range) for q in activation_quantizers(keras_layer)}
        missing = [v.path for v in keras_layer.weights
                   if id(v) not in covered and id(v) not in ranges]
        if missing or len(covered) != len(entries) or set(params) != {n for _, n, _ in entries}:
            raise ValueError(f"the reference does not mirror {keras_layer.name}: Keras "
                             f"variables not mapped {missing}; torch parameters "
                             f"{sorted(set(params) ^ {n for _, n, _ in entries})}")
        with torch.no_grad():
            for v, name, kind in entries:
                value = torch.from_numpy(np.ascontiguousarray(_TO_TORCH[kind](_numpy(v))))
                if tuple(value.shape) != tuple(params[name].shape):
                    raise ValueError(f"{v.path}: shape {tuple(value.shape)} for torch "
                                     f"{name} {tuple(params[name].shape)}")
                params[name].copy_(value)

    def weights(self):
        params = dict(self.module.named_parameters())
        return {path: np.array(_TO_KERAS[kind](params[name].detach().cpu().numpy()),
                               order="C", copy=True)   # never a view of a live parameter
                for path, name, kind in self.entries}


# -------------------------------------------------------------------------- the trainer
class ReferenceTrainer:
    """Plain-PyTorch DINO or POA training steps mirroring one of our Keras trainers.

    Build with ``from_trainer(keras_trainer)`` (a DINO or POA trainer, before its first step).
    ``train_step(batch, plan=None)`` runs one step and returns its logs as floats (the names of
    our trainer's logs); ``student_weights()`` / ``teacher_weights()`` give {Keras variable
    path: numpy array in Keras layout}; ``centers()`` the DINO centers (one per head).
    """

    def __init__(self, keras_trainer, device=None, adam_convention="keras"):
        from poa_keras.methods import DINO, POA
        if isinstance(keras_trainer, POA):
            self.method = "poa"
        elif isinstance(keras_trainer, DINO):
            self.method = "dino"
        else:
            raise TypeError(f"expected a poa_keras DINO or POA trainer, got "
                            f"{type(keras_trainer).__name__}")
        if adam_convention not in ("keras", "torch"):
            raise ValueError(f"adam_convention must be 'keras' or 'torch', got "
                             f"{adam_convention!r}")
        self.keras_trainer = keras_trainer
        # The per-step values: our trainer's own (a callable step -> dict; replaceable, e.g.
        # by a test that checks a wrong schedule is caught).
        self.step_hyperparameters = keras_trainer.step_hyperparameters
        self.adam_convention = adam_convention
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        recipe = dict(keras_trainer.recipe)
        self.recipe = recipe
        if self.method == "poa" and float(recipe.get("ibot_weight") or 0.0) > 0.0:
            raise NotImplementedError("the reference does not implement iBOT")
        if recipe["centering"] not in ("center", "sinkhorn"):
            raise ValueError(f"unknown centering {recipe['centering']!r}")
        kt = keras_trainer
        self.backbone = _torch_backbone(kt.backbone)
        self.heads = _torch_heads(kt.head)
        self.teacher_backbone = _torch_backbone(kt.teacher_backbone)
        self.teacher_heads = _torch_heads(kt.teacher_head)
        self._mirrors = {
            "student": [_Mirror(self.backbone, _vit_entries(kt.backbone), kt.backbone),
                        _Mirror(self.heads, _all_head_entries(kt.head), kt.head)],
            "teacher": [_Mirror(self.teacher_backbone, _vit_entries(kt.teacher_backbone),
                                kt.teacher_backbone),
                        _Mirror(self.teacher_heads, _all_head_entries(kt.teacher_head),
                                kt.teacher_head)]}
        for module in (self.backbone, self.heads, self.teacher_backbone, self.teacher_heads):
            module.to(self.device)
        for p in list(self.teacher_backbone.parameters()) + list(self.teacher_heads.parameters()):
            p.requires_grad_(False)
        self.out_dims = [h.last_v.shape[0] for h in self.heads.heads]
        self.centers_ = [torch.zeros(1, k, device=self.device) for k in self.out_dims] \
            if recipe["centering"] == "center" else []

        # EMA pairs: every backbone and head tensor, trainable or not.
        self._ema_student = [p for m in (self.backbone, self.heads) for p in m.parameters()]
        self._ema_teacher = [p for m in (self.teacher_backbone, self.teacher_heads)
                             for p in m.parameters()]

        # Parameter groups: (lr multiplier, weight decay on?, heads' last layer?).
        decay = float(recipe.get("layer_decay", 1.0))
        pe_mult = float(recipe.get("patch_embed_lr_mult", 1.0))
        self._multiplier = {}
        named = [("backbone." + n, p, self.backbone.layer_id(n), n.startswith("patch_"))
                 for n, p in self.backbone.named_parameters()] + \
                [("heads." + n, p, None, False) for n, p in self.heads.named_parameters()]
        groups = {}
        for name, p, layer_id, patch in named:
            if not p.requires_grad:
                continue
            mult = 1.0 if layer_id is None else decay ** (self.backbone.depth + 1 - layer_id)
            if patch:
                mult *= pe_mult
            leaf = name.split(".")[-1]
            last = leaf in ("last_v", "last_g")
            # Weight decay on ndim > 1 in OUR (Keras) layout: the gain g is (K, 1) here, as in
            # torch's weight_norm, but a vector (K,) there, so it is not decayed.
            key = (mult, p.ndim > 1 and leaf != "last_g", last)
            groups.setdefault(key, []).append(p)
            self._multiplier[name] = mult
        self._group_keys = list(groups)
        self._group_steps = [0] * len(groups)      # optimizer steps each group took part in
        self._last_layer_params = [p for key, ps in groups.items() if key[2] for p in ps]
        self._params = [p for ps in groups.values() for p in ps]
        self._params_not_last = [p for key, ps in groups.items() if not key[2] for p in ps]
        self.optimizer = self._make_optimizer(kt.optimizer, groups)

        self.clip_grad = kt.clip_grad
        self.freeze_steps = int(round(float(recipe.get("freeze_last_layer_epochs") or 0.0)
                                      * int(recipe["steps_per_epoch"])))
        self.step = 0
        self.forced_plan = None
        self.last_plan = None
        self._subnet_class = type(kt.backbone.full_subnet)
        if self.method == "poa":
            self.sampler = kt.backbone.sampler(seed=int(recipe["sampler_seed"]),
                                               net_select_scale=recipe["net_select_scale"])

    @classmethod
    def from_trainer(cls, keras_trainer, device=None, adam_convention="keras"):
        return cls(keras_trainer, device=device, adam_convention=adam_convention)

    # -------------------------------------------------------------------------- optimizer
    def _make_optimizer(self, keras_optimizer, groups):
        import keras
        opt = keras_optimizer
        if opt is None:
            raise ValueError("compile the Keras trainer (its optimizer sets the reference's)")
        for attr in ("clipnorm", "clipvalue", "global_clipnorm"):
            if getattr(opt, attr, None) is not None:
                raise NotImplementedError(f"optimizer {attr} is not mirrored")
        param_groups = [dict(params=ps) for ps in groups.values()]
        if isinstance(opt, (keras.optimizers.Adam, keras.optimizers.AdamW)):
            if getattr(opt, "amsgrad", False):
                raise NotImplementedError("amsgrad is not mirrored")
            self._kind = "adam"
            self._betas = (float(opt.beta_1), float(opt.beta_2))
            self._eps = float(opt.epsilon)
            return torch.optim.AdamW(param_groups, lr=0.0, betas=self._betas, eps=self._eps,
                                     weight_decay=0.0, foreach=True)
        if isinstance(opt, keras.optimizers.SGD) and not float(opt.momentum) and \
                not opt.nesterov:
            self._kind = "sgd"
            return torch.optim.SGD(param_groups, lr=0.0, weight_decay=0.0, foreach=True)
        raise NotImplementedError(f"optimizer {type(opt).__name__} is not mirrored (Adam, "
                                  "AdamW, SGD without momentum are)")

    def _set_group_hyperparameters(self, lr, wd, last_layer_scale, frozen):
        t = self.step + 1                                    # Keras' global step count
        for i, (group, (mult, decayed, last)) in enumerate(zip(self.optimizer.param_groups,
                                                               self._group_keys)):
            m = mult * (last_layer_scale if last else 1.0)
            group_wd = wd if decayed else 0.0
            if self._kind == "sgd" or self.adam_convention == "torch":
                group["lr"], group["weight_decay"] = m * lr, group_wd
                continue
            if last and frozen:   # no gradient: torch.optim skips these parameters
                continue
            self._group_steps[i] += 1
            s = self._group_steps[i]                         # torch's per-parameter count
            b1, b2 = self._betas
            lr_g = m * lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * (1 - b1 ** s) / \
                math.sqrt(1 - b2 ** s)
            group["lr"] = lr_g
            group["eps"] = self._eps / math.sqrt(1 - b2 ** s)
            group["weight_decay"] = group_wd * m * lr / lr_g if lr_g else 0.0

    # ------------------------------------------------------------------------------ data
    def _images(self, x):
        """(V, B, H, W, C) numpy/tensor, channels-last -> (V B, C, H, W) float32 on device."""
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        x = x.to(self.device, torch.float32, non_blocking=True)
        return x.reshape(-1, *x.shape[2:]).permute(0, 3, 1, 2).contiguous()

    def _split(self, batch):
        if isinstance(batch, dict):
            g, loc = batch["global"], batch.get("local")
        else:
            g, loc = batch[0], (batch[1] if len(batch) > 1 else None)
        n_local = 0 if loc is None else int(loc.shape[0])
        return self._images(g), (self._images(loc) if n_local else None), n_local

    def _spec(self, plan):
        """A ViTSubnet from a ViTSubnet or a (width, depth) pair."""
        return plan if isinstance(plan, self._subnet_class) else self._subnet_class(*plan)

    def next_plan(self):
        """POA: the elastic student's subnet (``forced_plan`` if set, else the sampler's);
        DINO: whether this step freezes the last layer (our trainers' plans)."""
        if self.method == "dino":
            return self.step < self.freeze_steps
        if self.forced_plan is not None:
            return self._spec(self.forced_plan)
        return self.sampler.next()

    # ------------------------------------------------------------------------- the step
    def _targets(self, logits, center_index, temp):
        if self.recipe["centering"] == "sinkhorn":
            return sinkhorn_knopp(logits, temp, int(self.recipe["sinkhorn_iterations"]))
        center = self.centers_[center_index]
        probs = F.softmax((logits - center) / temp, dim=-1)
        m = float(self.recipe["center_momentum"])
        self.centers_[center_index] = center * m + (1 - m) * logits.mean(dim=0, keepdim=True)
        return probs

    def _student(self, g, loc, n_local, subnet):
        """(global cls (2B, w), per head [(2, B, K) logits, (v, B, K) logits or None])."""
        g_cls = self.backbone(g, subnet)
        g_logits = self.heads(g_cls)
        l_logits = self.heads(self.backbone(loc, subnet)) if loc is not None else \
            [None] * len(g_logits)
        out = []
        for gl, ll in zip(g_logits, l_logits):
            out.append((gl.view(2, -1, gl.shape[-1]),
                        None if ll is None else ll.view(n_local, -1, ll.shape[-1])))
        return g_cls, out

    def train_step(self, batch, plan=None):
        """One training step; returns the logs (floats) under our trainer's names."""
        values = {k: float(np.float32(v)) for k, v in
                  self.step_hyperparameters(self.step).items()}
        g, loc, n_local = self._split(batch)
        st = float(self.recipe["student_temp"])
        temp = values["teacher_temp"]
        with torch.no_grad():
            t_logits = self.teacher_heads(self.teacher_backbone(g))
            targets = [self._targets(t, i, temp).view(2, -1, t.shape[-1])
                       for i, t in enumerate(t_logits)]

        frozen = False
        if self.method == "dino":
            frozen = self.last_plan = self.next_plan()
            _, views = self._student(g, loc, n_local, None)
            gl, ll = views[0]
            s = gl if ll is None else torch.cat([gl, ll])
            total, n_terms = cross_view_ce(targets[0], F.log_softmax(s / st, dim=-1))
            loss = total / n_terms
            logs = {"dino": loss}
            last_scale = 1.0
        else:
            spec = self.next_plan() if plan is None else self._spec(plan)
            self.last_plan = spec
            subnet = (int(spec.width), int(spec.depth))
            lam = values["lambda_ie"]
            sv_temp = float(self.recipe["same_view_temp"])
            intact_cls, intact = self._student(g, loc, n_local, None)
            elastic_cls, elastic = self._student(g, loc, n_local, subnet)
            dino_i = dino_e = same = 0.0
            for target, (ig, il), (eg, el) in zip(targets, intact, elastic):
                all_i = ig if il is None else torch.cat([ig, il])
                all_e = eg if el is None else torch.cat([eg, el])
                ce_i, n_terms = cross_view_ce(target, F.log_softmax(all_i / st, dim=-1))
                ce_e, _ = cross_view_ce(target, F.log_softmax(all_e / st, dim=-1))
                dino_i = dino_i + lam * ce_i / n_terms
                dino_e = dino_e + (1 - lam) * ce_e / n_terms
                same_h = 0.0
                for si, se in ((ig, eg), (il, el)):
                    if si is None:
                        continue
                    p = F.softmax(si.detach() / sv_temp, dim=-1)
                    same_h = same_h - (p * F.log_softmax(se / st, dim=-1)).sum(-1).mean()
                same = same + (1 - lam) * same_h
            n_heads = len(targets)
            dino_i, dino_e, same = dino_i / n_heads, dino_e / n_heads, same / n_heads
            loss = dino_i + dino_e + same
            kw = values.get("koleo_weight", 0.0)
            if float(self.recipe.get("koleo_weight") or 0.0):
                per_student = [koleo(c[:c.shape[0] // 2]) + koleo(c[c.shape[0] // 2:])
                               for c in (intact_cls, elastic_cls)]
                k = kw * 0.5 * (per_student[0] + per_student[1])
            else:
                k = torch.zeros((), device=self.device)
            loss = loss + k
            logs = {"dino_intact": dino_i, "dino_elastic": dino_e, "same_view": same,
                    "koleo": k}
            last_scale = values.get("last_layer_lr_scale", 1.0)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = self._params
        if frozen:                              # DINO's cancel_gradients_last_layer
            for p in self._last_layer_params:   # the heads' last layers: 1 or 2 tensors each
                p.grad = None
            params = self._params_not_last
        if self.clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, float(self.clip_grad), foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None], foreach=True)
        self._set_group_hyperparameters(values["learning_rate"], values["weight_decay"],
                                        last_scale, frozen)
        self.optimizer.step()
        with torch.no_grad():
            m = values["momentum"]
            torch._foreach_mul_(self._ema_teacher, m)
            torch._foreach_add_(self._ema_teacher, self._ema_student, alpha=1.0 - m)
        self.step += 1

        names = ["loss"] + list(logs) + ["grad_norm"]
        numbers = torch.stack([loss.detach()] + [torch.as_tensor(v).detach().reshape(())
                                                 for v in logs.values()] + [norm.detach()])
        out = dict(zip(names, numbers.float().cpu().tolist()))   # one device sync
        out.update(teacher_temp=values["teacher_temp"], momentum=values["momentum"])
        if self.method == "poa":
            out.update(width=float(subnet[0]), depth=float(subnet[1]))
        return out

    def train_on_batch(self, x, y=None, return_dict=False):
        """``train_step(x)`` under Keras' name (for timing loops written for our trainers,
        e.g. benchmarks/step.py's ``_step``; the plan comes from ``forced_plan`` or the
        sampler). Returns the logs dict, or with ``return_dict=False`` the loss."""
        logs = self.train_step(x)
        return logs if return_dict else logs["loss"]

    @property
    def num_compilations(self):
        """Nothing is compiled (eager PyTorch)."""
        return 0

    def timed_step(self, batch, plan=None):
        """(seconds, logs) of one ``train_step`` (synchronised before and after)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        logs = self.train_step(batch, plan)
        return time.perf_counter() - start, logs

    # --------------------------------------------------------------------------- read-back
    def student_weights(self):
        """{Keras path of the student variable: numpy array in Keras layout}."""
        out = {}
        for mirror in self._mirrors["student"]:
            out.update(mirror.weights())
        return out

    def teacher_weights(self):
        """{Keras path of the teacher variable: numpy array in Keras layout}."""
        out = {}
        for mirror in self._mirrors["teacher"]:
            out.update(mirror.weights())
        return out

    def centers(self):
        """The DINO centers, one (1, K) array per head (empty with Sinkhorn targets)."""
        return [c.detach().cpu().numpy().copy() for c in self.centers_]

    def lr_multipliers(self):
        """{Keras path of a trainable student variable: its lr multiplier (without the
        last-layer freeze)}."""
        out = {}
        for mirror, prefix in zip(self._mirrors["student"], ("backbone.", "heads.")):
            for path, name, _ in mirror.entries:
                if prefix + name in self._multiplier:
                    out[path] = self._multiplier[prefix + name]
        return out
