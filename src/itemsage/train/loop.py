"""Multi-task training of the product tower (docs/METHOD.md).

One plain loop (`train`), nanoGPT style: sample a batch of (query, product) positives across all
tasks, run the tower once over the positives and the random negatives, map each query through its
surface's adapter, update the logQ sketch, take the mixed-negative loss, step the optimiser. Logging
and checkpointing are one call each, outside the maths.

Choices written down here:
- Sampling is with replacement from a fixed distribution over the training rows (natural
  frequency; add_to_cart/checkout rows times `upweight_conversions`), drawn by one seeded numpy
  Generator. Random negatives are R = random_negatives_ratio * B uniform catalog rows; their
  expected draw count R/N gives the constant correction log(R/N). N counts the products on sale in
  the train window: a catalog's `listed_at` leaves later products out (pairs.negative_pool).
- Under DDP every rank draws the SAME global batch from the shared sampler and keeps its slice, so
  the union is exactly what one process would draw. Embeddings are all-gathered with gradient, each
  rank takes the loss of its own rows against the global candidates, with the global weighted-mean
  denominator (losses.mixed_negative_loss `weight_sum`), so DDP's gradient average equals the
  one-process gradient.
- The learning rate is linear warm-up (capped at a tenth of the run) then cosine decay to 0 at
  `total_steps`, computed from the step (no scheduler object); its state is (step, total_steps).
- `max_minutes`: the step count is an estimate, re-made as the run goes. After `_CALIBRATION_STEPS`
  timed steps (the first step excluded) and then every `_REESTIMATE_EVERY` steps, total_steps =
  min(max_steps, step + the steps that fit in the budget left at the recent wall-clock speed, which
  includes evaluations and checkpoints). The budget counts from the first step: loading the data
  (and encoding new search texts once) is not in it; a hard stop at the budget bounds the run.
  The learning rate stays smooth when the estimate moves: the cosine is driven by `progress`, the
  fraction of the decay done, and each step advances it by (1 - progress) / (steps left), i.e.
  what is left of the schedule is spread over the steps now expected to be left. With a fixed step
  count this is exactly the plain cosine of the step; when the count changes only the remaining
  slope changes (no jump), and the decay reaches 0 at whatever final step the run reaches (as well
  as the last estimate predicts it). Progress and the estimate are stored in checkpoints.
- The next batch is drawn and gathered in a background thread while the current step runs
  (`Prefetch`, as nanoGPT's get_batch). Draws come from a copy of the sampler that runs one batch
  ahead; the sampler itself advances when its batch is consumed, so a checkpoint saves exactly the
  state from which a resumed run redraws the same next batch.
- Random negatives are capped at the catalog size (R uniform draws from N < R products would mostly
  repeat products the loss already has).
- Checkpoints are directories `checkpoints/step-XXXXXXXX/` written under a temp name, manifest
  last, then renamed: weights, optimiser, sketch and RNG state (every rank's torch RNG) as
  safetensors tensors plus a JSON of everything else. No pickle.
- The held-out Recall@K is exact: the whole catalog is embedded with the current tower and each
  pair's engaged product is ranked among all products (evaluate.exact_ranks), per task. The sample
  is stratified: an equal share of `eval_sample` per task (all pairs of a smaller task), so the
  sparse conversion tasks get a usable count. It comes from the validation window only (the test
  window is for `itemsage evaluate`), the same seeded sample at every evaluation.
- Model selection: each evaluation whose overall validation Recall@10 beats the best so far saves the
  model to `best/`; the run stops early after `patience` evaluations without a gain, or at the
  step/minute budget. The final `model/` is the best evaluation's model (its step is recorded as
  `best_step` in the training summary), or the last step's when nothing was evaluated (no
  validation rows, or eval_sample 0). Best score, best step and the evaluations since are in each
  checkpoint, so a resumed run selects and stops as the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn

from itemsage import artifacts, schema
from itemsage.config import ConfigError, require, to_dict
from itemsage.data.text import Vocabulary
from itemsage.model.batch import GraphInputs, ProductStore
from itemsage.model.config import model_config
from itemsage.model.model import ItemSageModel, save_model
from itemsage.train.checkpoint import (
    CHECKPOINT_DIR,
    _rng_state,
    _set_rng_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from itemsage.train.clock import Clock
from itemsage.train.config import TrainConfig, TrainResult, _check_resume_config
from itemsage.train.distributed import _all_rng_states, _broadcast_int, _init_distributed, _mean_over_ranks
from itemsage.train.losses import LogQ, MixedNegativeLoss
from itemsage.train.optim import _optimizer, advance, lr_at
from itemsage.train.pairs import (NegativeGroups, Pairs, Prefetch, Sampler, _loss_weights, _mixture, load_pairs,
                                  negative_pool)
from itemsage.train.validation import held_out_recall

log = logging.getLogger(__name__)

MODEL_DIR = "model"
BEST_DIR = "best"  # the best model so far, renamed to MODEL_DIR at the end
TENSORBOARD_DIR = schema.TENSORBOARD_DIR
_PREFETCH_THREAD: bool | None = None  # build batches in a background thread; None = where it can overlap


def _query_groups(queries: dict[str, Tensor], pairs: Pairs, rows: np.ndarray, device: torch.device
                  ) -> list[tuple[str, Tensor, Tensor]]:
    """Pairs `rows` [b] grouped by surface: (surface, positions in rows [b_s], query vectors [b_s, Dq])."""
    groups = []
    for s, table in queries.items():
        pos = np.flatnonzero(pairs.surface[rows] == s)
        if len(pos):
            index = torch.from_numpy(pairs.query_row[rows[pos]]).to(table.device)
            groups.append((s, torch.from_numpy(pos).to(device), table[index].to(device)))
    return groups


# ----------------------------------------------------------------------------------------------
# Logging and progress (one call each from the loop)
# ----------------------------------------------------------------------------------------------


def _log_scalars(writer: Any, step: int, scalars: dict[str, float]) -> None:
    if writer is not None:
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int | None, start: int) -> Iterator[Any]:
    from itemsage.progress import progress_bar

    with progress_bar(enabled, fields="{task.fields[pps]:>8.0f} pairs/s  loss {task.fields[loss]:.4f}") as bar:
        task = bar.add_task("train", total=total, completed=start, pps=0.0, loss=float("nan"))
        yield lambda **kw: bar.update(task, **kw)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require(not name.startswith("cuda") or torch.cuda.is_available(),
            f"train.device is {name!r} but torch sees no CUDA device; use device='cpu' or 'auto'")
    return torch.device(name)


def _load_data(dataset_dir: Path, cfg: TrainConfig, text_fields: tuple[str, ...], max_images: int,
               progress: bool) -> tuple[Vocabulary, ProductStore, Pairs, Pairs | None]:
    vocab = Vocabulary.load(dataset_dir / schema.VOCAB_FILE)
    store = ProductStore.from_dataset(dataset_dir, vocab, text_fields, max_images, progress=progress)
    pairs = load_pairs(dataset_dir, schema.TRAIN_FILE, store, tasks=cfg.tasks, progress=progress)
    require(len(pairs) > 0, f"{dataset_dir / schema.TRAIN_FILE} has no rows for train.tasks "
                            f"{list(cfg.tasks) or 'all'}; check the task names against the dataset manifest's counts")
    if not cfg.eval_sample:
        return vocab, store, pairs, None
    held_out = load_pairs(dataset_dir, schema.VALIDATION_FILE, store, sample=cfg.eval_sample, seed=cfg.seed,
                          progress=progress)
    if not len(held_out):
        log.warning("%s has no rows: no model selection or early stopping, the model is the last step's",
                    dataset_dir / schema.VALIDATION_FILE)
    keep = np.isin(held_out.surface, list(pairs.queries))  # a surface absent from training has no adapter
    held_out = held_out.take(keep)
    for s, q in held_out.queries.items():
        if s in pairs.queries and q.shape[1] != pairs.queries[s].shape[1]:
            raise ValueError(f"{s} queries are {q.shape[1]}-d in {schema.VALIDATION_FILE} but "
                             f"{pairs.queries[s].shape[1]}-d in "
                             "train.parquet; re-run `itemsage ingest`")
    return vocab, store, pairs, held_out


def _attach_graph(dataset_dir: Path, store: ProductStore, cfg: TrainConfig) -> dict[str, Any] | None:
    """Attach the dataset's graph tokens (itemsage/graph) to `store` when it has them and train.graph is
    on -> the model's record of them ({"tokens", "dim", "graph"}: names, width, the artifact's
    fingerprint), else None."""
    from itemsage.graph import graph_dir_of, read_graph_features

    graph_dir = graph_dir_of(dataset_dir)
    if not cfg.graph or not (graph_dir / artifacts.MANIFEST).is_file():
        if cfg.graph:
            log.info("%s has no graph features (`itemsage graph` writes them): the tower reads content alone",
                     dataset_dir)
        return None
    features = read_graph_features(graph_dir, artifacts.fingerprint(dataset_dir))
    store.attach_graph(GraphInputs(features.ids, features.tokens, features.mask))
    present = features.mask.any(1)
    log.info("graph tokens %s (%d-d) for %d of %d products", ", ".join(features.names), features.dim,
             int(present.sum()), len(features))
    return {"tokens": list(features.names), "dim": int(features.dim), "graph": artifacts.fingerprint(graph_dir)}


def train(dataset_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, progress: bool = True,
          resume: bool = False) -> TrainResult:
    """Train the tower and adapters on `dataset_dir` into `out_dir`; the model lands in out_dir/model/.

    Runs as one process, or as one rank of a torchrun job (DDP; gloo on CPU, nccl on CUDA); only
    rank 0 writes. `resume` continues from the newest complete checkpoint in out_dir/checkpoints/.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    artifacts.verify_dataset(dataset_dir)  # refuses an unfinished or corrupted dataset, naming the file
    # The products' frozen query vectors' source, recorded in the model: `embed --catalog` computes them.
    product_query = artifacts.read_manifest(dataset_dir).get(schema.PRODUCT_QUERY)
    rank, world, own_group = _init_distributed(cfg.device)
    device = _resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    lead = rank == 0
    B, R = cfg.batch_size, cfg.num_random_negatives
    require(B % world == 0 and R % world == 0, f"train.batch_size ({B}) and the random negatives ({R}) must "
                                               f"divide evenly over the {world} processes")
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        log.info("no complete checkpoint in %s: starting from step 0", out_dir / CHECKPOINT_DIR)
    if not resume and any((out_dir / CHECKPOINT_DIR).glob("step-*")):
        raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue that run, "
                          "or choose a new --out directory")

    # Data, once. Rank 0 goes first so the text-query cache is computed once, not raced.
    mcfg = model_config(cfg.preset, **cfg.model)
    if world > 1 and not lead:
        dist.barrier()
    vocab, store, pairs, held_out = _load_data(dataset_dir, cfg, mcfg.text_fields, mcfg.max_images, progress and lead)
    if world > 1 and lead:
        dist.barrier()
    notes = []
    if store.image_dim == 0 and "modalities" not in cfg.model and mcfg.modalities != "text":
        # Modalities follow the data: a catalog without images trains a text-only tower. The saved
        # config records the choice, so a re-run from it (or a resume) reads the same features.
        cfg = dataclasses.replace(cfg, model={**cfg.model, "modalities": "text"})
        mcfg = model_config(cfg.preset, **cfg.model)
        notes.append("the catalog has no image vectors (image width 0), so the tower reads text only "
                     "(modalities 'text'); give image_embeddings or image_paths in the catalog to use images")
        log.info("%s", notes[-1])
    graph = _attach_graph(dataset_dir, store, cfg)  # the graph stage's tokens, when the dataset has them
    if graph is not None and "graph_tokens" not in cfg.model:  # recorded, so a re-run reads the same
        cfg = dataclasses.replace(cfg, model={**cfg.model, "graph_tokens": len(graph["tokens"])})
        mcfg = model_config(cfg.preset, **cfg.model)
    pool = negative_pool(dataset_dir, store) if R else None  # [N'] rows on sale in the train window, or all
    pool_size = len(store) if pool is None else len(pool)
    if pool is not None:
        notes.append(f"random negatives are drawn from the {pool_size} of {len(store)} products listed by the "
                     "train window's last engagement (the catalog's listed_at)")
    if R > pool_size:  # uniform draws beyond the catalog size would only repeat products
        capped = pool_size // world * world
        require(capped > 0 or cfg.negatives == "in_batch", f"the catalog has {pool_size} products to draw from, "
                f"too few to draw random negatives over {world} processes; use negatives='in_batch'")
        log.info("random negatives capped at the catalog size: %d a step, not %d (train.random_negatives_ratio "
                 "%g x batch %d)", capped, R, cfg.random_negatives_ratio, B)
        R = capped
    queries = {s: q.to(device) for s, q in pairs.queries.items()}  # surface -> [U_s, Dq] frozen
    loss_weight = torch.from_numpy(_loss_weights(pairs, cfg))  # [N]
    query_key, product_row = torch.from_numpy(pairs.query_key), torch.from_numpy(pairs.product_row)  # [N], [N]

    # Model, optimiser, sketch, sampler. The same seed on every rank gives identical initial weights.
    torch.manual_seed(cfg.seed)
    # The products with a popularity offset: those engaged in the train window (model/popularity.py).
    warm = np.unique(pairs.product_row)  # [W] store rows
    require(mcfg.graph_tokens == 0 or graph is not None,
            f"train.model.graph_tokens is {mcfg.graph_tokens} but {dataset_dir} has no graph features (or "
            "train.graph is false); run `itemsage graph DATASET` first, or set graph_tokens to 0")
    require(graph is None or mcfg.graph_tokens == len(graph["tokens"]),
            f"train.model.graph_tokens ({mcfg.graph_tokens}) differs from the graph's {len(graph['tokens']) if graph else 0} "
            f"tokens; leave it out (it follows the graph)")
    module = ItemSageModel.build(mcfg, len(vocab), store.image_dim, pairs.query_dims,
                                 warm_ids=store.ids[warm].tolist(),
                                 graph_dim=graph["dim"] if graph is not None else 0).to(device)
    warm_row = np.full(len(store), len(warm), np.int64)  # store row -> offset row; len(warm) = none
    warm_row[warm] = np.arange(len(warm))
    if module.popularity is not None and cfg.popularity_init == "log_count" and len(warm):
        positives = np.bincount(pairs.product_row, minlength=len(store))[warm]  # [W]
        start = np.log1p(positives) - np.log1p(positives).mean()
        with torch.no_grad():
            module.popularity.offset.weight[:len(warm), 0] = torch.from_numpy(start).to(module.popularity.offset.weight)
    optimizer = _optimizer(cfg, list(module.named_parameters()))
    logq = LogQ(cfg.sketch_depth, cfg.sketch_width, seed=cfg.seed)
    groups = NegativeGroups.from_dataset(dataset_dir, store, pool) if R and cfg.category_negatives else None
    if R and cfg.category_negatives and groups is None:
        notes.append(f"train.category_negatives is {cfg.category_negatives} but the catalog has no category: "
                     "every random negative is a uniform draw")
    sampler = Sampler(_mixture(pairs, cfg), len(store), cfg.seed, pool=pool, groups=groups,
                      share=cfg.category_negatives)
    torch.manual_seed(cfg.seed + 1 + rank)  # each rank its own dropout stream
    schedule = {"step": 0, "total_steps": cfg.max_steps, "calibrated": False, "progress": 0.0}
    # Model selection on validation Recall@10 (all tasks): the best so far and evaluations since it.
    selection: dict[str, Any] = {"best_recall": None, "best_step": None, "since_best": 0, "recall": {}}
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        _check_resume_config(state["config"], cfg)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        logq.load_state_dict(state["logq"])
        schedule = state["schedule"]
        selection = state.get("selection", selection)
        _set_rng_state(state["rng"], sampler, rank, device)
        log.info("resumed from %s (step %d)", ckpt, schedule["step"])
    step, total_steps = int(schedule["step"]), schedule["total_steps"]
    if selection.get("stopped"):  # the resumed run had stopped early: it is over
        total_steps = step
    if ckpt is not None and cfg.max_steps != state["config"].get("max_steps"):
        total_steps, cfg = _new_step_count(cfg, state["config"].get("max_steps"), step, total_steps, out_dir,
                                           bool(selection.get("stopped")))
    progress_done = 0.0  # fraction of the LR decay done (`advance`); a checkpoint from before it: the step's
    if "progress" in schedule:
        progress_done = float(schedule["progress"])
    elif total_steps:
        w = min(cfg.warmup_steps, total_steps // 10)
        progress_done = min(1.0, max(0.0, (step - w) / max(1, total_steps - w)))
    resumed_from = step if ckpt is not None else None
    ddp = module
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    module.train()
    use_amp = cfg.amp and device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    writer = None
    if lead:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / TENSORBOARD_DIR))
    log_q_neg = torch.full((R,), math.log(R / pool_size) if R else 0.0, device=device)  # [R] uniform draws
    lo, hi, rlo, rhi = rank * B // world, (rank + 1) * B // world, rank * R // world, (rank + 1) * R // world
    loss_fn = MixedNegativeLoss(cfg.negatives, (lo, hi), world)  # this rank's rows of the global batch
    clock = Clock(cfg, world, device, calibrated=bool(schedule["calibrated"]))
    recall: dict[str, dict[str, float]] = {}
    losses = [float("nan")] * 3
    stopped_early = False

    def checkpoint() -> None:
        torch_states, cuda_states = _all_rng_states(world, device)  # a collective: every rank calls it
        if lead:
            save_checkpoint(out_dir, step, {
                "config": to_dict(cfg), "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                "logq": logq.state_dict(), "rng": _rng_state(sampler, torch_states, cuda_states),
                "schedule": {"step": step, "total_steps": total_steps, "calibrated": clock.calibrated,
                             "progress": progress_done},
                "selection": selection}, cfg.keep_checkpoints)

    def save(directory: Path) -> None:
        # What the weights are a function of, and results that follow from them: the model's fingerprint
        # covers config.json, so timings (different in every identical run) go to the manifest instead.
        summary = {"steps": step, "final_loss": losses[0], "world_size": world,
                   "train_pairs": len(pairs), "catalog": len(store),
                   "negative_pool": pool_size if R else 0, "best_step": selection["best_step"],
                   "stopped_early": stopped_early or bool(selection.get("stopped")),
                   "validation_recall": selection["recall"] if selection["best_step"] is not None else recall}
        save_model(directory, module.tower, module.adapters, mcfg, vocab, image_dim=store.image_dim,
                   query_dims=pairs.query_dims, logit_scale=module.logit_scale, popularity=module.popularity,
                   timings={"pairs_per_s": clock.pairs_per_s},
                   extra={"train_config": to_dict(cfg), "training": summary, **({"graph": graph} if graph else {}),
                          **({schema.PRODUCT_QUERY: product_query} if isinstance(product_query, dict) else {})})

    def evaluate() -> bool:
        """Validation Recall@K; a new best is saved to best/. True (on every rank) when patience is spent."""
        nonlocal recall
        stop = 0
        if lead and held_out is not None and len(held_out):
            recall = held_out_recall(module, store, held_out, device)
            _log_scalars(writer, step, {f"validation/recall@10/{t}": r["recall@10"] for t, r in recall.items()})
            log.info("step %d validation Recall@10: %s", step,
                     ", ".join(f"{t} {r['recall@10']:.3f}" for t, r in recall.items()))
            score = recall["all"]["recall@10"]
            if selection["best_step"] == step:  # re-evaluated (the final call after a periodic one)
                pass
            elif selection["best_recall"] is None or score > selection["best_recall"]:
                selection.update(best_recall=score, best_step=step, since_best=0, recall=recall)
                save(out_dir / BEST_DIR)
            else:
                selection["since_best"] += 1
            stop = int(bool(cfg.patience) and selection["since_best"] >= cfg.patience)
            if stop:
                selection["stopped"] = True
                log.info("stopping at step %d: validation Recall@10 has not beaten %.4f (step %d) for %d evaluations",
                         step, selection["best_recall"], selection["best_step"], cfg.patience)
        return bool(_broadcast_int(stop, world, device))

    def log_step(parts: Any, lr: float, scale: Tensor, show: Any) -> list[float]:
        """Progress bar or log line, and TensorBoard scalars, of the step just taken -> the losses."""
        losses = _mean_over_ranks(torch.stack([parts.total, parts.in_batch, parts.random]).detach(), world)
        show(completed=step, total=total_steps, pps=clock.pairs_per_s, loss=float(losses[0]))
        if lead and not progress:
            clock.report(step, total_steps, float(losses[0]))
        _log_scalars(writer, step, {"loss/total": losses[0], "loss/in_batch": losses[1], "loss/random": losses[2],
                                    "lr": lr, "logit_scale": float(scale.detach()), "pairs_per_s": clock.pairs_per_s})
        return losses

    def build(rows: np.ndarray, negs: np.ndarray) -> Any:  # runs in the Prefetch thread: numpy gathers only
        products = store.batch(np.concatenate([pairs.product_row[rows[lo:hi]], negs[rlo:rhi]]), backward=True)
        return products.pin_memory() if device.type == "cuda" else products

    background = _PREFETCH_THREAD if _PREFETCH_THREAD is not None else (
        device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads())  # else it competes with the step
    batches = Prefetch(sampler, B, R, build, background, product_row=pairs.product_row if groups else None)
    with _progress_bar(progress and lead, total_steps, step) as show, contextlib.closing(batches):
        while total_steps is None or step < total_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, total_steps or 10**9, cfg.warmup_steps, cfg.lr, progress_done)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            rows, negs, products = batches.next()  # [B], [R]: the global batch, same on every rank; built ahead
            products = products.to(device, non_blocking=True)  # this rank's positives, then its negatives
            pos_ids = product_row[rows]  # [B] store rows double as product ids
            logq.update(pos_ids)  # count the global batch first, on every rank: identical sketches
            with amp:  # one model call over this rank's queries, positives and random negatives
                own = np.concatenate([pairs.product_row[rows[lo:hi]], negs[rlo:rhi]])  # [b + r] store rows
                q, p, scale, pop = ddp(products, _query_groups(queries, pairs, rows[lo:hi], device), hi - lo,
                                       torch.from_numpy(warm_row[own]))  # [b, D], [b + r, D], [], [b + r] | None
            parts = loss_fn(q.float(), p.float(), ids=pos_ids.to(device), keys=query_key[rows].to(device),
                            log_q=logq.log_q(pos_ids, batch_size=B).to(device), weights=loss_weight[rows].to(device),
                            logit_scale=scale, neg_ids=torch.from_numpy(negs).to(device) if R else None,
                            log_q_neg=(log_q_neg if groups is None else torch.from_numpy(
                                sampler.log_q(negs, pairs.product_row[rows], R)).to(device)) if R else None,
                            popularity=None if pop is None else pop.float())  # DDP gathering inside (losses.py)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            optimizer.step()
            module.logit_scale.clamp_()  # the temperature cap, on the stored parameter (model.LogitScale)
            progress_done = advance(progress_done, step, total_steps or 10**9, cfg.warmup_steps)
            step += 1

            total_steps = clock.tick(step, total_steps, time.perf_counter() - t0)
            losses = log_step(parts, lr, scale, show)
            last = step >= total_steps if total_steps is not None else False
            stopped_early = bool(cfg.eval_every and step % cfg.eval_every == 0 and not last and evaluate())
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not last and not stopped_early:
                checkpoint()
            if stopped_early:
                break

    if not stopped_early:  # the last step's evaluation (an early stop has just had it)
        evaluate()
    checkpoint()
    model_dir = out_dir / MODEL_DIR
    if lead:
        _publish_model(out_dir, module, selection, save)
        writer.close()
    if world > 1:
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
    return TrainResult(model_dir=model_dir, steps=step, pairs_per_s=clock.pairs_per_s,
                       final_recall=selection["recall"] if selection["best_step"] is not None else recall,
                       final_loss=losses[0], elapsed_s=time.perf_counter() - clock.start, resumed_from=resumed_from,
                       median_step_s=float(np.median(clock.step_times)) if clock.step_times else float("nan"),
                       best_step=selection["best_step"], stopped_early=bool(selection.get("stopped")), notes=notes)


def _new_step_count(cfg: TrainConfig, saved: int | None, step: int, total_steps: int | None, out_dir: Path,
                    stopped: bool) -> tuple[int | None, TrainConfig]:
    """(the step count, the config) of a run resumed with another `max_steps`. An unfinished run
    continues to it: what is left of the learning-rate decay is spread over the steps now left (as
    when a minute budget re-estimates the count: no jump), and the warm-up stays the one the run had
    (at most a tenth of its first count). A finished run is refused with how to train longer."""
    over = stopped or (total_steps is not None and step >= total_steps)
    if over:
        why = ("stopped early (no better validation Recall@10 for train.patience evaluations)" if stopped else
               "finished its schedule (the learning rate decayed to 0)")
        raise ConfigError(f"train.max_steps ({cfg.max_steps}) differs from the checkpoint's ({saved}), but the run "
                          f"in {out_dir} {why} at step {step}: a resume cannot add steps to it. To train "
                          f"{cfg.max_steps} steps, start a new run with its options: itemsage train DATASET --out "
                          f"NEW_DIR --config {out_dir / MODEL_DIR / 'config.json'} --steps {cfg.max_steps}")
    require(cfg.max_steps is None or cfg.max_steps > step,
            f"train.max_steps ({cfg.max_steps}) must be above the checkpoint's step ({step}) to resume")
    log.info("resumed with train.max_steps %s instead of %s: the rest of the learning-rate decay is spread over "
             "the steps now left", cfg.max_steps, saved)
    if cfg.max_minutes is not None or total_steps is None:  # a budget keeps its estimate, capped at the next one
        return total_steps, cfg
    return cfg.max_steps, dataclasses.replace(cfg, warmup_steps=min(cfg.warmup_steps, total_steps // 10))


def _publish_model(out_dir: Path, module: ItemSageModel, selection: dict[str, Any], save: Any) -> None:
    """out_dir/model/ := the best evaluation's weights (from best/), or the last step's when nothing
    was evaluated. Loads the best weights into `module` (training is over)."""
    best = out_dir / BEST_DIR
    if selection["best_step"] is not None and not best.is_dir() and (out_dir / MODEL_DIR / artifacts.MANIFEST).is_file():
        return  # a finished run resumed: model/ holds the best already
    try:  # best/ must be complete and from the recorded step (a kill can leave a torn or newer one)
        artifacts.verify_manifest(best, kind="model")
        saved_step = json.loads((best / "config.json").read_text())["extra"]["training"]["steps"]
    except (artifacts.ArtifactError, OSError, ValueError, KeyError):
        saved_step = None
    if selection["best_step"] is not None and saved_step == selection["best_step"]:
        module.load_state_dict(load_file(str(best / "model.safetensors")))  # keys tower.*, adapters.*, logit_scale.*
        log.info("model: the step-%d weights, validation Recall@10 %.4f", selection["best_step"],
                 selection["best_recall"])
    elif selection["best_step"] is not None:
        log.warning("%s does not hold the step-%d model; the model is the last step's", best, selection["best_step"])
        selection.update(best_step=None)
    else:
        log.info("no validation evaluation: the model is the last step's")
    save(out_dir / MODEL_DIR)
    shutil.rmtree(best, ignore_errors=True)
