"""The training loop shared by pretraining and fine-tuning: DistributedDataParallel when
launched by torchrun (gloo on CPU, nccl on GPU), DistributedSampler sharding, gradual
unfreezing, optional regulariser, and exact resumption from atomic checkpoints.

Resumption is exact: a checkpoint holds model, optimizer, scheduler, every rank's RNG
states and (epoch, step within epoch, global step); the sampler's order is a function of
(seed, epoch), so a resumed run skips the batches already seen and continues with the
same batches and the same dropout masks as an uninterrupted run.
"""
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


# -- distributed ------------------------------------------------------------------------

@dataclass
class Distributed:
    """Where this process sits: rank, world size, device; `active` when a process group runs."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    active: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def setup_distributed(device: Optional[str] = None) -> Distributed:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1): gloo for CPU,
    nccl for CUDA. Otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size <= 1:
        return Distributed(device=torch.device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, device=chosen, active=True)


def teardown_distributed(place: Distributed) -> None:
    if place.active and dist.is_initialized():
        dist.destroy_process_group()


# -- RNG and checkpoints -----------------------------------------------------------------

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: a run killed while
    writing leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str) -> dict:
    # weights_only=False: checkpoints hold python RNG state and plain dicts written by us.
    return torch.load(path, map_location="cpu", weights_only=False)


def quiet_generator() -> torch.Generator:
    """A generator for DataLoaders: without one, every `iter(loader)` draws a base seed
    from the global RNG, which would shift the dropout stream of a resumed run."""
    return torch.Generator().manual_seed(0)


# -- progress ------------------------------------------------------------------------------

class LineProgress:
    """Progress for logs (stderr is not a terminal): a plain line every `every` steps and at
    the last step, instead of a bar's carriage-return redraws. The subset of tqdm's
    interface that `Trainer` uses."""

    def __init__(self, total: int, initial: int, label: str, enabled: bool, lines: int = 10):
        self.total, self.count, self.label, self.enabled = total, initial, label, enabled
        self.every = max(1, total // lines)
        self.postfix = ""
        self.started = time.perf_counter()

    def update(self, steps: int = 1) -> None:
        self.count += steps
        if self.enabled and (self.count % self.every == 0 or self.count == self.total):
            self.write(f"{self.label}: step {self.count}/{self.total}{self.postfix}, "
                       f"{time.perf_counter() - self.started:.0f} s")

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {name} {value}" for name, value in values.items())

    @staticmethod
    def write(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, label: str, enabled: bool):
    """A tqdm bar on stderr when it is a terminal, else a LineProgress (also when disabled,
    since `Trainer` writes its per-epoch lines through it)."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=label, unit="step", dynamic_ncols=True, leave=True)
    return LineProgress(total, initial, label, enabled)


# -- the loop ------------------------------------------------------------------------------

LossFn = Callable[[nn.Module, Tuple[Tensor, ...]], Tuple[Tensor, int]]


@dataclass
class History:
    """What a run records: per step (global step, train loss, lr of the top group) and per
    epoch evaluation results."""
    steps: List[int] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)
    epochs: List[Dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class DatasetBatches:
    """A map-style dataset as the Trainer's batch source: a DistributedSampler shards it over
    the ranks and shuffles by (seed, epoch); `batch_size` is the global batch."""

    def __init__(self, dataset: Dataset, collate_fn, batch_size: int, seed: int, place: Distributed):
        self.sampler = DistributedSampler(dataset, num_replicas=place.world_size, rank=place.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.loader = DataLoader(dataset, batch_size=batch_size // place.world_size, sampler=self.sampler,
                                 collate_fn=collate_fn, drop_last=True, generator=quiet_generator())
        if len(self.loader) == 0:
            raise ValueError(f"{len(dataset)} examples make no full batch of {batch_size}")

    def steps(self, epoch: int) -> int:
        return len(self.loader)

    def epoch_batches(self, epoch: int, start: int = 0):
        """(index, batch) for the batches start, start+1, ... of `epoch`."""
        self.sampler.set_epoch(epoch)
        for index, batch in enumerate(self.loader):
            if index >= start:  # earlier ones were seen before the checkpoint this run resumed from
                yield index, batch


class StopRequested(Exception):
    """Raised inside `fit` when `stop_after_steps` is reached (after the checkpoint is written)."""


class Trainer:
    """Trains `model` for `epochs` over `dataset`.

    Args:
        model: the module (not wrapped); DDP wrapping is done here when `place.active`.
        optimizer, scheduler: the scheduler steps once per optimizer step (or None).
        loss_fn(model, batch) -> (mean loss, token count of the batch).
        dataset, collate_fn, batch_size: batch_size is the GLOBAL batch; each of the
            world_size ranks takes batch_size / world_size rows of it. `dataset` may
            instead be a batch source that shards itself (see DatasetBatches for the
            interface: steps(epoch), epoch_batches(epoch, start); corpus.TokenStreams is
            one); its state_dict()/load_state_dict(), when it has them, go into the
            checkpoint, one per rank.
        seed: shuffling order is a function of (seed, epoch).
        unfreezer: a GradualUnfreezer stepped at every epoch start, or None.
        regularizer: callable(model) -> scalar added to the loss (e.g. L2SP), or None.
        evaluate: callable(model) -> dict of metrics, run at every epoch end, or None.
        checkpoint_path: where to write checkpoints (rank 0), or None.
        checkpoint_every: also checkpoint every this many steps (0: only at epoch ends).
        stop_after_steps: checkpoint and raise StopRequested once the global step count
            reaches this (simulates a killed run), or None.
        max_grad_norm: clip the total gradient norm (None: no clipping).
        find_unused_parameters: for DDP, when some trainable parameters may get no gradient
            in a step (e.g. adaptive-softmax tail clusters with no target in the batch).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loss_fn: LossFn,
                 dataset: Dataset, collate_fn, batch_size: int, epochs: int, seed: int = 0,
                 place: Optional[Distributed] = None, unfreezer=None, regularizer=None, evaluate=None,
                 checkpoint_path: Optional[str] = None, checkpoint_every: int = 0,
                 stop_after_steps: Optional[int] = None, max_grad_norm: Optional[float] = None,
                 progress_label: str = "train", extra_state: Optional[dict] = None, show_progress: bool = True,
                 find_unused_parameters: bool = False):
        self.place = place or Distributed()
        if batch_size % self.place.world_size:
            raise ValueError(f"the global batch size {batch_size} must be divisible by the number of processes "
                             f"{self.place.world_size}")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.source = dataset if hasattr(dataset, "epoch_batches") else \
            DatasetBatches(dataset, collate_fn, batch_size, seed, self.place)
        self.epochs = epochs
        self.unfreezer = unfreezer
        self.regularizer = regularizer
        self.evaluate = evaluate
        self.checkpoint_path = checkpoint_path
        self.checkpoint_every = checkpoint_every
        self.stop_after_steps = stop_after_steps
        self.max_grad_norm = max_grad_norm
        self.progress_label = progress_label
        self.extra_state = extra_state or {}
        self.show_progress = show_progress and self.place.is_main
        self.find_unused_parameters = find_unused_parameters
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.finished = False
        self.history = History()
        self._wrapped: Optional[nn.Module] = None

    @property
    def total_steps(self) -> int:
        return sum(self.source.steps(epoch) for epoch in range(self.epochs))

    def _wrap(self) -> nn.Module:
        """The module to run: DDP over the trainable parameters when distributed. Rebuilt
        whenever the set of trainable parameters changes (DDP registers them once)."""
        if not self.place.active:
            return self.model
        device_ids = [self.place.device.index] if self.place.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids,
                                       find_unused_parameters=self.find_unused_parameters)

    # -- checkpoints ----------------------------------------------------------------------
    def _gather(self, value) -> list:
        """`value` of every rank, in rank order (collective under DDP)."""
        if not self.place.active:
            return [value]
        values = [None] * self.place.world_size
        dist.all_gather_object(values, value)
        return values

    def state_dict(self) -> dict:
        states = self._gather(rng_state())
        source = self._gather(self.source.state_dict()) if hasattr(self.source, "state_dict") else None
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "regularizer": self.regularizer.state_dict() if isinstance(self.regularizer, nn.Module) else None,
            "rng": states,
            "batch_source": source,
            "world_size": self.place.world_size,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "finished": self.finished,
            "history": self.history.state_dict(),
            "trainable": [p.requires_grad for p in self.model.parameters()],
            **self.extra_state,
        }

    def save(self) -> None:
        if self.checkpoint_path is None:
            return
        state = self.state_dict()  # collective under DDP: every rank takes part
        if self.place.is_main:
            atomic_save(state, self.checkpoint_path)
        self.place.barrier()

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.place.world_size:
            raise ValueError(f"the checkpoint was written by {state['world_size']} processes, this run has "
                             f"{self.place.world_size}; resume with the same number")
        self.model.load_state_dict(state["model"])
        for parameter, trainable in zip(self.model.parameters(), state["trainable"]):
            parameter.requires_grad_(trainable)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["regularizer"] is not None:
            self.regularizer.load_state_dict(state["regularizer"])
        set_rng_state(state["rng"][self.place.rank])
        if state.get("batch_source") is not None:
            self.source.load_state_dict(state["batch_source"][self.place.rank], self.place.device)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.finished = state["global_step"], state["finished"]
        self.history.load_state_dict(state["history"])
        if self.unfreezer is not None:
            self.unfreezer.trainable_groups = self.unfreezer.trainable_count(self.epoch)

    def resume_from(self, path: str) -> bool:
        """Loads `path` if it exists; True when it did."""
        if not os.path.isfile(path):
            return False
        self.load_state_dict(load_checkpoint(path))
        return True

    # -- training -------------------------------------------------------------------------
    def fit(self) -> History:
        """Runs the remaining epochs. Raises StopRequested at `stop_after_steps`."""
        if self.stop_after_steps is not None and self.stop_after_steps <= self.global_step and not self.finished:
            # the step budget ran out in an earlier phase: stop before taking any step here
            raise StopRequested(f"{self.progress_label}: stopped before its first step (step budget used up)")
        bar = progress_bar(self.total_steps, self.global_step, self.progress_label, self.show_progress)
        try:
            while self.epoch < self.epochs and not self.finished:
                self._run_epoch(bar)
        finally:
            bar.close()
        self.finished = True
        return self.history

    def _run_epoch(self, bar) -> None:
        if self.unfreezer is not None:
            self.unfreezer.step(self.epoch)
        wrapped = self._wrap()
        wrapped.train()
        started = time.perf_counter()
        for index, batch in self.source.epoch_batches(self.epoch, self.step_in_epoch):
            batch = tuple(t.to(self.place.device) for t in batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss, tokens = self.loss_fn(wrapped, batch)
            total = loss + self.regularizer(self.model) if self.regularizer is not None else loss
            total.backward()
            if self.max_grad_norm is not None:
                trainable = [p for p in self.model.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(trainable, self.max_grad_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.global_step += 1
            self.step_in_epoch = index + 1
            self.history.steps.append(self.global_step)
            self.history.losses.append(float(loss.detach()))
            self.history.lrs.append(float(self.optimizer.param_groups[-1]["lr"]))
            self.history.tokens += int(tokens) * self.place.world_size
            bar.update(1)
            bar.set_postfix(loss=f"{self.history.losses[-1]:.3f}", epoch=self.epoch + 1)
            if self.stop_after_steps is not None and self.global_step >= self.stop_after_steps:
                self.history.seconds += time.perf_counter() - started
                self.save()
                raise StopRequested(f"{self.progress_label}: stopped after {self.global_step} steps "
                                    f"(checkpoint {self.checkpoint_path})")
            if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
                self.save()
        self.history.seconds += time.perf_counter() - started
        self.epoch += 1
        self.step_in_epoch = 0
        self.finished = self.epoch >= self.epochs
        if self.evaluate is not None:
            metrics = {"epoch": self.epoch, "step": self.global_step, **self.evaluate(self.model)}
            self.history.epochs.append(metrics)
            if self.place.is_main:  # also without progress bars: one line per epoch
                bar.write(f"{self.progress_label} epoch {self.epoch}: " +
                          ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        self.save()
