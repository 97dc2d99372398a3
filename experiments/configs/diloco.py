"""DiLoCo family (SPEC §1): M workers train independently and sync every H inner steps.

Run book:
  tiny (quick start; 2 CPU cores, ~1-2 minutes, simulated workers on the embedded synthetic source):
    python -m diloco_jax.main --config=experiments/configs/diloco.py:tiny --workdir=runs/tiny
  its data-parallel twin (same model, data and steps; compare bits_sent_per_worker):
    ... --config=experiments/configs/diloco.py:tiny --config.algorithm=dp --workdir=runs/tiny_dp
  byte-level text instead of the synthetic source:
    ... :tiny --config.data.source=text --config.data.paths="('../shared/data/english-pd/*.txt',)"
  35m (the paper's smallest model; needs an accelerator and real data, e.g. C4 as text files):
    ... --config=experiments/configs/diloco.py:35m --config.data.paths=...

Expected (tiny, seed 0, M=4, H=20, 300 steps): final eval loss about 0.1-0.3 nats above the source's
entropy floor, printed in the summary.
"""

import ml_collections


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "diloco"           # "dp" (data-parallel baseline), "diloco", "streaming"
  c.seed = 0                       # params init, data order, stochastic rounding

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"          # "tiny" or the paper family "35M" ... "4B" (SPEC §4)
  c.model.num_layers = 0           # transformer blocks; 0: the preset's
  c.model.vocab_size = 0           # 0: the data source's vocabulary
  c.model.mlp = ""                 # "swiglu" or "gelu"; "": the preset's
  c.model.tied_embeddings = True
  c.model.dtype = "float32"        # compute dtype ("float32", "bfloat16"); params are fp32
  c.model.remat = "none"           # "none" or "block": recompute each block's activations in
                                   # the backward pass (less activation memory, more compute)
  c.model.attention = "dense"      # "dense" ([L, L] scores), "blockwise" (flash-style tiles,
                                   # O(L·block) memory, the same numbers to 1e-5), "cudnn"
                                   # (GPU kernel), "splash" (TPU kernel), "ring" (the sequence
                                   # split over mesh.context)
  c.model.attention_block = 128    # blockwise/splash: positions per tile; must divide seq_len
  # RoPE for length (SPEC §6.2): the base (0: 10000), and "linear" (position interpolation:
  # positions / s) or "yarn" (per-frequency ramp and logit temperature) with factor s.
  c.model.rope_base = 0.0
  c.model.rope_scaling = "none"
  c.model.rope_scaling_factor = 1.0
  c.model.rope_original_length = 0  # yarn: the training length
  c.model.yarn_beta_fast = 32.0
  c.model.yarn_beta_slow = 1.0
  c.model.d_model = 0              # 0: the preset's (also num_heads, ffn_dim)
  c.model.num_heads = 0
  c.model.ffn_dim = 0
  # Sparse mixture-of-experts feed-forward (SPEC §6.1; experiments/configs/moe.py sets it up).
  c.model.moe = ml_collections.ConfigDict()
  c.model.moe.num_experts = 0      # E; 0: a dense model (the rest of this section is unused)
  c.model.moe.top_k = 2            # k experts per token
  c.model.moe.ffn_dim = 0          # per-expert hidden size; 0: model.ffn_dim
  c.model.moe.every = 1            # MoE feed-forward in every n-th block (n-1, 2n-1, ...)
  c.model.moe.mlp = "swiglu"       # each expert: "swiglu" or "gelu"
  c.model.moe.shared_expert = False  # plus a dense MLP every token passes through
  c.model.moe.combine = "topk_softmax"  # or "softmax_topk" (Switch/GShard)
  c.model.moe.dispatch = "capacity"  # "capacity" (token dropping) or "dropless" (grouped matmul)
  c.model.moe.grouped_matmul = "ragged_dot"  # dropless: "ragged_dot" or "megablox" (TPU)
  c.model.moe.capacity_factor = 1.25  # training; C = ceil(k T / E * factor)
  c.model.moe.eval_capacity_factor = 2.0
  c.model.moe.router_init_scale = 0.1  # router std = this / sqrt(d_model)
  c.model.moe.load_balance_weight = 0.01  # Switch's balance loss, summed over MoE blocks
  c.model.moe.router_z_weight = 1e-3  # ST-MoE's router z-loss, summed over MoE blocks

  c.diloco = ml_collections.ConfigDict()
  c.diloco.num_workers = 4         # M, replicas
  c.diloco.inner_steps = 20        # H, inner steps between syncs
  c.diloco.outer_optimizer = "nesterov"  # "nesterov", "sgd" (momentum 0, lr 1: FedAvg), "adam"
  c.diloco.outer_lr = 0.7          # η (DiLoCo 0.7; Streaming DiLoCo 0.4)
  c.diloco.outer_momentum = 0.9    # μ
  c.diloco.outer_lr_schedule = "constant"  # or "cosine": η decayed like the inner lr, over the
                                   # T / H outer steps (docs/results/README.md, budget section)
  c.diloco.router_sync_every = 0   # MoE: routers as their own fragment synced every k steps
                                   # (k dividing H); 0: with their block's fragment
  c.diloco.offload_outer = False   # keep every fragment's θ_g, outer optimizer state and
                                   # in-flight Δ in host memory (pinned_host); only the fragment
                                   # being synced is on the device. False for "dp"
  c.diloco.delayed = False         # the all-reduce overlaps a whole outer round: the mean sent
                                   # at round r is applied at r+1 as it is (naive delay)
  c.diloco.eager = False           # ... with eager updates (SPEC §5): each worker applies its
                                   # own fresh Δ_m plus the others' one-round-stale ones
  c.diloco.drop_prob = 0.0         # faults: each worker's outer gradient is dropped with this
                                   # probability at every sync (the mean is over the others)
  c.diloco.outages = ()            # faults: ((worker, step, duration), ...): gone for those
                                   # steps, back at step + duration (restarted from θ_g)
  c.diloco.rejoin_reset_inner_opt = False  # ... and with fresh Adam moments
  c.diloco.quarantine = True       # a worker whose Δ has a NaN/inf is left out of that sync
                                   # and restarted from θ_g (counted in quarantined/p)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 300          # T, inner steps per worker
  c.train.batch_size = 8           # sequences per worker per step
  c.train.learning_rate = 3e-3     # peak inner AdamW learning rate
  c.train.warmup_steps = 30        # linear warm-up (paper: 1000)
  c.train.final_lr_fraction = 0.05  # cosine decay to this fraction of peak
  c.train.weight_decay = -1.0      # AdamW decay; -1: 1/T as in the scaling-laws paper
  c.train.b1 = 0.9
  c.train.b2 = 0.99
  c.train.grad_clip = 1.0          # global-norm clip of inner gradients; 0: off
  c.train.log_every = 20           # steps between progress lines / metrics rows
  c.train.init_from = ""           # a finished run's workdir: start from its latest outer
                                   # params, fresh optimizer state ("train short, continue long")
  c.train.final_sync = True        # after step T, flush every fragment into the outer copy θ_g
  c.train.allow_fewer_workers = False   # True: resume a checkpoint of more workers with the first M
                                   # (pending receives land; fragments not sent at T sync once
                                   # more), so the evaluated θ_g is not up to H steps stale

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"      # "synthetic" (embedded, no files) or "text" (UTF-8 bytes)
  c.data.paths = ()                # files or globs for "text"
  c.data.seq_len = 64              # L, tokens per sequence
  c.data.vocab_size = 128          # synthetic vocabulary
  c.data.num_classes = 16          # synthetic word classes (its hidden syntax)
  c.data.tokenizer = "bytes"       # text: "bytes" (vocab 256) or a SentencePiece .model
                                   # (python -m diloco_jax.tokenizer train); its shards are
                                   # prepared once under data.token_cache and reused
  c.data.token_cache = ""          # "": ~/.cache/diloco_jax/tokens
  # text: needle-in-a-haystack episodes packed into a fraction of the training windows
  # (diloco_jax/retrieval.py; the held-out loss stays plain text).
  c.data.retrieval = ml_collections.ConfigDict()
  c.data.retrieval.fraction = 0.0          # of training windows that are episode packs
  c.data.retrieval.variants = ("single",)  # "single", "multikey", "multivalue", "multiquery"
  c.data.retrieval.num_needles = 4         # needles of the multi-needle variants
  c.data.retrieval.value_digits = 7        # digits of each needle's number (RULER)
  c.data.retrieval.min_length = 64         # shortest episode prompt, bytes
  c.data.retrieval.answer_weight = 5.0     # loss weight of the answer bytes (others 1)

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 100         # 0: only at the end
  c.eval.num_batches = 4           # held-out batches per evaluation
  c.eval.batch_size = 32           # sequences per held-out batch
  c.eval.params = "outer"          # "outer" (θ_g, the paper's choice), "worker_mean", "worker0"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100   # 0: only at the end
  c.checkpoint.max_to_keep = 2

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1                  # devices per worker for its batch
  c.mesh.model = 1                 # devices per worker for the model
  c.mesh.expert = 1                # devices per worker over which the experts are split
  c.mesh.context = 1               # devices per worker over which the sequence is split (ring
                                   # attention, model.attention="ring")
  c.mesh.num_cpu_devices = 0       # simulated host devices on CPU; 0: M * data * expert * model

  if arg == "tiny":
    pass
  elif arg == "35m":
    c.model.preset = "35M"
    c.diloco.num_workers = 2
    c.diloco.inner_steps = 30
    c.train.num_steps = 88_000      # about 700M tokens at 4 x 1024 tokens per worker-step, M=2
    c.train.batch_size = 4
    c.train.learning_rate = 4e-4
    c.train.warmup_steps = 1000
    c.train.log_every = 100
    c.data.source = "text"
    c.data.seq_len = 1024
    c.eval.every_steps = 2000
    c.checkpoint.every_steps = 2000
  else:
    raise ValueError(f"config argument must be 'tiny' or '35m', got {arg!r}")
  return c
