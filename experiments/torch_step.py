"""A PyTorch reference of one worker's inner step (forward + backward + AdamW), for
experiments/bench.py to time against ours in the same invocation. Not part of the library, and
never imported by it: it runs in a Python that has torch (a separate venv; the project does not
depend on torch).

Two models:
  ours  the same maths as diloco_jax.model with the bench's settings (pre-norm RMSNorm blocks,
        QK-norm per head, rotary positions, causal softmax attention, tanh-GELU or SwiGLU MLP,
        no biases, tied embedding, cross-entropy + z-loss) and our inner optimizer (global-norm
        clip, then AdamW with decoupled weight decay and the warm-up + cosine schedule). Written
        the way a PyTorch user would: one [D, 3·H·K] matrix for q, k, v, `F.rms_norm`,
        `F.scaled_dot_product_attention(is_causal=True)`. It can load our params (an .npz of the
        flattened tree), so the bench checks that both compute the same loss before timing.
  peer  the torchft peer's GPT-2-style model (shared/peers/README.md: LayerNorm, biases,
        learned positions, exact GELU, no z-loss, AdamW lr 1e-3, β = (0.9, 0.95), no decay or
        clipping), written here from that description; for reference only.

Run book:
  standalone, one thread (prints ms of CPU per step):
    $TORCH_VENV/bin/python experiments/torch_step.py --arch=ours --steps=30   # a venv with torch
  as the bench's server: `--serve` reads one JSON command per line on stdin and answers one JSON
  line on stdout: {"cmd": "init", "arch", "params" (an .npz or null), "tokens" (an .npy of
  [n, B, L+1] int32 batches), "model": {...}, "opt": {...}} -> {"losses": [loss of each batch
  at the initial params]}; {"cmd": "time", "steps": n} -> {"cpu_s", "wall_s"} for n steps;
  {"cmd": "quit"}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------- ours
def _rope(x, cos, sin):
  """Rotates the pairs (x[i], x[i + K/2]) of x [B, H, L, K] by the angles [L, K/2]."""
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class OursBlock(nn.Module):

  def __init__(self, D, H, K, Fd, gated, eps):
    super().__init__()
    self.H, self.K, self.eps, self.gated = H, K, eps, gated
    self.attn_norm = nn.Parameter(torch.ones(D))
    self.wqkv = nn.Parameter(torch.randn(D, 3 * H * K) * D**-0.5)
    self.q_norm = nn.Parameter(torch.ones(K))
    self.k_norm = nn.Parameter(torch.ones(K))
    self.wo = nn.Parameter(torch.randn(H * K, D) * (H * K) ** -0.5)
    self.mlp_norm = nn.Parameter(torch.ones(D))
    if gated:
      self.w_gate = nn.Parameter(torch.randn(D, Fd) * D**-0.5)
    self.w_up = nn.Parameter(torch.randn(D, Fd) * D**-0.5)
    self.w_down = nn.Parameter(torch.randn(Fd, D) * Fd**-0.5)

  def forward(self, x, cos, sin):
    B, L, D = x.shape
    H, K, eps = self.H, self.K, self.eps
    h = F.rms_norm(x, (D,), self.attn_norm, eps)
    q, k, v = (h @ self.wqkv).view(B, L, 3, H, K).permute(2, 0, 3, 1, 4)
    q = _rope(F.rms_norm(q, (K,), self.q_norm, eps), cos, sin)
    k = _rope(F.rms_norm(k, (K,), self.k_norm, eps), cos, sin)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + o.transpose(1, 2).reshape(B, L, H * K) @ self.wo
    h = F.rms_norm(x, (D,), self.mlp_norm, eps)
    if self.gated:
      u = F.silu(h @ self.w_gate) * (h @ self.w_up)
    else:
      u = F.gelu(h @ self.w_up, approximate="tanh")
    return x + u @ self.w_down


class Ours(nn.Module):

  def __init__(self, vocab, layers, D, H, Fd, gated=False, eps=1e-6, rope_base=10000.0,
               z_loss=1e-4):
    super().__init__()
    K = D // H
    self.D, self.K, self.eps, self.rope_base, self.z_loss = D, K, eps, rope_base, z_loss
    self.embed = nn.Parameter(torch.randn(vocab, D) * 0.02)
    self.blocks = nn.ModuleList([OursBlock(D, H, K, Fd, gated, eps) for _ in range(layers)])
    self.final_norm = nn.Parameter(torch.ones(D))

  def loss(self, tokens):
    x_in, y = tokens[:, :-1], tokens[:, 1:]
    L = x_in.shape[1]
    freq = self.rope_base ** (-torch.arange(0, self.K, 2, dtype=torch.float32) / self.K)
    angles = torch.arange(L, dtype=torch.float32)[:, None] * freq
    cos, sin = angles.cos(), angles.sin()
    x = self.embed[x_in]
    for blk in self.blocks:
      x = blk(x, cos, sin)
    logits = F.rms_norm(x, (self.D,), self.final_norm, self.eps) @ self.embed.T
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(-1, y[..., None])[..., 0]
    return ce.mean() + self.z_loss * (lse**2).mean()

  def load(self, flat: dict):
    """Copies our params (flattened tree: 'blocks/0/attn/wq' -> array) in; q, k, v are
    concatenated into one matrix (the same maths)."""
    t = lambda name: torch.from_numpy(np.asarray(flat[name], np.float32))
    with torch.no_grad():
      self.embed.copy_(t("embed"))
      self.final_norm.copy_(t("final_norm/scale"))
      for i, blk in enumerate(self.blocks):
        p = f"blocks/{i}/"
        D = self.D
        blk.wqkv.copy_(torch.stack([t(p + f"attn/w{c}").reshape(D, -1) for c in "qkv"], 1)
                       .reshape(D, -1))
        blk.wo.copy_(t(p + "attn/wo").reshape(-1, D))
        blk.attn_norm.copy_(t(p + "attn_norm/scale"))
        blk.mlp_norm.copy_(t(p + "mlp_norm/scale"))
        blk.q_norm.copy_(t(p + "attn/q_norm/scale"))
        blk.k_norm.copy_(t(p + "attn/k_norm/scale"))
        if blk.gated:
          blk.w_gate.copy_(t(p + "mlp/w_gate"))
        blk.w_up.copy_(t(p + "mlp/w_up"))
        blk.w_down.copy_(t(p + "mlp/w_down"))


# ------------------------------------------------------------------------------------- peer
class PeerBlock(nn.Module):

  def __init__(self, D, H, Fd):
    super().__init__()
    self.H = H
    self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
    self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
    self.up, self.down = nn.Linear(D, Fd), nn.Linear(Fd, D)

  def forward(self, x):
    B, L, D = x.shape
    q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.H, D // self.H).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.proj(o.transpose(1, 2).reshape(B, L, D))
    return x + self.down(F.gelu(self.up(self.ln2(x))))


class Peer(nn.Module):

  def __init__(self, vocab, layers, D, H, Fd, seq):
    super().__init__()
    self.tok, self.pos = nn.Embedding(vocab, D), nn.Embedding(seq, D)
    self.blocks = nn.ModuleList([PeerBlock(D, H, Fd) for _ in range(layers)])
    self.ln_f = nn.LayerNorm(D)
    for m in self.modules():
      if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
          nn.init.zeros_(m.bias)

  def loss(self, tokens):
    x_in, y = tokens[:, :-1], tokens[:, 1:]
    h = self.tok(x_in) + self.pos(torch.arange(x_in.shape[1]))
    for blk in self.blocks:
      h = blk(h)
    logits = self.ln_f(h) @ self.tok.weight.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# --------------------------------------------------------------------------------- the step
def _schedule(peak, warmup, total, final_fraction):
  """optax.warmup_cosine_decay_schedule(0, peak, warmup, max(total, warmup + 1), peak·final)
  at optax's count (0 at the first update)."""
  decay = max(total, warmup + 1)
  end = peak * final_fraction

  def lr(count):
    if count < warmup:
      return peak * count / max(warmup, 1)
    frac = min(count - warmup, decay - warmup) / (decay - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))
  return lr


class Stepper:
  """The model, its optimizer and a few fixed batches; `run(n)` does n inner steps."""

  def __init__(self, arch: str, model: dict, opt: dict, tokens: np.ndarray, params=None):
    torch.manual_seed(0)
    V, NL, D, H, Fd = (model[k] for k in ("vocab_size", "num_layers", "d_model", "num_heads",
                                          "ffn_dim"))
    self.arch, self.count = arch, 0
    if arch == "ours":
      self.model = Ours(V, NL, D, H, Fd, gated=model.get("mlp", "gelu") == "swiglu",
                        eps=model.get("norm_eps", 1e-6), rope_base=model.get("rope_base", 1e4),
                        z_loss=model.get("z_loss", 1e-4))
      if params is not None:
        self.model.load(params)
      self.clip = opt.get("grad_clip") or None
      self.lr = _schedule(opt["learning_rate"], opt["warmup_steps"], opt["num_steps"],
                          opt["final_lr_fraction"])
      self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr(0),
                                   betas=(opt["b1"], opt["b2"]), eps=1e-8,
                                   weight_decay=opt["weight_decay"])
    elif arch == "peer":
      self.model = Peer(V, NL, D, H, Fd, tokens.shape[-1] - 1)
      self.clip, self.lr = None, lambda count: 1e-3
      self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                   eps=1e-8, weight_decay=0.0)
    else:
      raise ValueError(f"arch must be 'ours' or 'peer', got {arch!r}")
    self.batches = [torch.from_numpy(np.asarray(b, np.int64)) for b in tokens]

  def losses(self) -> list[float]:
    with torch.no_grad():
      return [float(self.model.loss(b)) for b in self.batches]

  def step(self, tokens):
    loss = self.model.loss(tokens)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.clip:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    for g in self.opt.param_groups:
      g["lr"] = self.lr(self.count)
    self.opt.step()
    self.count += 1
    return loss

  def run(self, n: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
      loss = self.step(self.batches[i % len(self.batches)])
    float(loss.detach())
    return time.perf_counter() - wall, time.process_time() - cpu


def serve():
  """The bench's line protocol (see the module docstring)."""
  stepper = None
  for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "quit":
      break
    if msg["cmd"] == "init":
      params = dict(np.load(msg["params"])) if msg.get("params") else None
      stepper = Stepper(msg["arch"], msg["model"], msg["opt"], np.load(msg["tokens"]), params)
      out = {"losses": stepper.losses(), "threads": torch.get_num_threads(),
             "torch": torch.__version__}
    elif msg["cmd"] == "time":
      wall, cpu = stepper.run(int(msg["steps"]))
      out = {"wall_s": wall, "cpu_s": cpu}
    else:
      out = {"error": f"unknown command {msg['cmd']!r}"}
    print(json.dumps(out), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--serve", action="store_true")
  p.add_argument("--arch", default="ours", choices=("ours", "peer"))
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  a = p.parse_args()
  torch.set_num_threads(a.threads)
  torch.set_num_interop_threads(1)
  if a.serve:
    return serve()
  model = dict(vocab_size=256, num_layers=2, d_model=128, num_heads=4, ffn_dim=512, mlp="gelu")
  opt = dict(learning_rate=1e-3, warmup_steps=10, num_steps=1000, final_lr_fraction=0.05,
             b1=0.9, b2=0.99, weight_decay=1e-3, grad_clip=1.0)
  tokens = np.random.default_rng(0).integers(0, 256, (4, a.batch, a.seq + 1))
  s = Stepper(a.arch, model, opt, tokens)
  n = sum(x.numel() for x in s.model.parameters())
  s.run(3)
  cpu = sorted(s.run(a.steps)[1] / a.steps for _ in range(a.repeats))
  print(f"{a.arch}: {n:,} params, B={a.batch}, L={a.seq}, {a.threads} thread(s): "
        f"{cpu[len(cpu) // 2] * 1e3:.1f} ms of CPU per step (median of {a.repeats})")


if __name__ == "__main__":
  main()
