"""The timed steps: inputs, modules and one zero-argument callable per provider for a Case.

Providers (the names `--backends` takes):

* ``torch``: torch.nn.LSTM / GRU / RNN on the same device (oneDNN / ATen on CPU, cuDNN on GPU);
  every ratio is computed against it. With ``lengths="uniform"`` it gets the same
  PackedSequence as rnntl_fast; in ``frozen`` mode the same frozen weights; in ``clip``
  mode it runs unclipped (torch.nn cannot clip inside its backward), i.e. it is the floor.
* ``torch-hooks``: what users write to clip per step without rnntl_fast: an
  nn.LSTMCell / nn.GRUCell loop with ``register_hook(lambda g: g.clamp(-v, v))`` on every
  h_t and c_t, masking by lengths with ``torch.where``. Clip mode only; no proj_size.
* ``torch-cells``: for a regularizer row (Case.regularizer), what users write without
  rnntl_fast: a Python loop over torch's fused cells (the kernels behind nn.LSTMCell /
  nn.GRUCell / nn.RNNCell) with the same regularizer: h_{t-1} * mask into the recurrent
  product, zoneout blends of fresh draws every step, W_hh * mask as the weight, or
  nn.LayerNorm modules on the two gate products (and the LSTM's cell). One layer, one
  direction, full lengths.
* ``without``: for a regularizer row, the rnntl_fast module (backend "auto") without the
  regularizer: the denominator of the regularizer's cost.
* ``cpu``, ``cuda``, ``triton``, ``reference``: rnntl_fast.LSTM / GRU / RNN with that backend,
  same weights as the torch.nn module (and the row's regularizer).
"""
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from .grids import REGULARIZERS, Case

TORCH = "torch"
HOOKS = "torch-hooks"
CELLS = "torch-cells"
WITHOUT = "without"
RNNTL_BACKENDS = ("cpu", "cuda", "triton", "reference")
PROVIDERS = RNNTL_BACKENDS + (TORCH, HOOKS, CELLS, WITHOUT)
CLIP_VALUE = 1.0  # grad_clip of the "clip" mode, in rnntl_fast and in the hook loop

# The reference step loop runs one Python iteration per step, layer and direction and
# unfused autograd; past these limits one row takes minutes on a small machine, so the
# reference is skipped there with a note.
REFERENCE_MAX_STEPS = 200
REFERENCE_MAX_FORWARD_FLOPS = 2e8


def gates_of(cell: str) -> int:
    return {"lstm": 4, "gru": 3, "rnn": 1}[cell]


# torch.nn module, rnntl_fast module name and torch.nn cell of each bench cell.
TORCH_MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
FAST_MODULES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
TORCH_CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}


def forward_flops(case: Case, lengths: Optional[Tensor]) -> float:
    """Floating-point operations of one forward pass over the valid steps.

    Per step and batch row: LSTM 8*H*(I_l + P) (+ 2*P*H for the projection), GRU
    6*H*(I_l + H), Elman RNN 2*H*(I_l + H), where I_l is the layer's input width and P the
    recurrent width (proj_size or H); elementwise gate math is not counted. Packed rows count only their
    valid steps (sum of lengths).
    """
    row_steps = float(lengths.sum()) if lengths is not None else float(case.T * case.B)
    directions = 2 if case.bidirectional else 1
    recurrent = case.proj_size or case.H
    total = 0.0
    for layer in range(case.layers):
        layer_input = case.I if layer == 0 else directions * recurrent
        per_step = 2 * gates_of(case.cell) * case.H * (layer_input + recurrent)
        if case.proj_size:
            per_step += 2 * case.proj_size * case.H
        total += directions * row_steps * per_step
    return total


# Backward ~ 2x forward (input and weight gradients); with every weight frozen only the
# input-gradient half remains.
MODE_FLOP_FACTOR = {"inference": 1.0, "training": 3.0, "clip": 3.0, "frozen": 2.0}


def step_flops(case: Case, lengths: Optional[Tensor]) -> float:
    return forward_flops(case, lengths) * MODE_FLOP_FACTOR[case.mode]


def reference_steps(case: Case) -> int:
    return case.T * case.layers * (2 if case.bidirectional else 1)


class Workload:
    """Everything the providers of one Case share, built once with a fixed seed.

    x: [T, B, I] input (requires grad unless inference); lengths: [B] int64 on CPU or None;
    grad_padded: [T, B, D*P] gradient of the output, zero past each row's length;
    grad_packed: the same in PackedSequence.data order (or None without lengths).
    """

    def __init__(self, case: Case, seed: int = 0) -> None:
        self.case = case
        self.device = torch.device(case.device)
        self.dtype = getattr(torch, case.dtype)
        generator = torch.Generator().manual_seed(seed)
        self.training = case.mode != "inference"
        self.x = torch.randn(case.T, case.B, case.I, generator=generator).to(self.device, self.dtype)
        self.x.requires_grad_(self.training)
        self.lengths = None
        if case.lengths == "uniform":
            shortest = math.ceil(case.T / 2)
            self.lengths = torch.randint(shortest, case.T + 1, (case.B,), generator=generator)
            self.lengths[torch.randint(0, case.B, (1,), generator=generator)] = case.T  # padded length is T
        torch.manual_seed(seed)  # same initial weights for every provider and every run
        torch_class = TORCH_MODULES[case.cell]
        extra = {"proj_size": case.proj_size} if case.proj_size else {}
        self.torch_module = torch_class(case.I, case.H, case.layers, bidirectional=case.bidirectional, **extra)
        self.torch_module.to(self.device, self.dtype)
        self._prepare(self.torch_module)
        width = (2 if case.bidirectional else 1) * (case.proj_size or case.H)
        grad = torch.randn(case.T, case.B, width, generator=generator).to(self.device, self.dtype)
        if self.lengths is not None:
            valid = torch.arange(case.T).unsqueeze(1) < self.lengths.unsqueeze(0)  # [T, B]
            grad = grad * valid.unsqueeze(2).to(self.device, self.dtype)
        self.grad_padded = grad
        self.grad_packed = (pack_padded_sequence(grad, self.lengths, enforce_sorted=False).data
                            if self.lengths is not None else None)

    def _prepare(self, module: nn.Module) -> nn.Module:
        if self.case.mode == "frozen":
            module.requires_grad_(False)
        module.train(self.training)
        return module

    def flops(self) -> float:
        return step_flops(self.case, self.lengths)

    def _module_input(self):
        if self.lengths is None:
            return self.x
        # Packing is part of what a packed-input user pays on both sides.
        return pack_padded_sequence(self.x, self.lengths, enforce_sorted=False)

    def rnntl_module(self, backend: str, regularized: bool = True) -> nn.Module:
        """rnntl_fast's module with torch.nn's weights (and, if `regularized`, the row's regularizer;
        layer_norm's own parameters keep their initial ones and zeros)."""
        import rnntl_fast  # noqa: F401  (rnntl_fast.bench is imported before the package body)
        fast_class = getattr(rnntl_fast, FAST_MODULES[self.case.cell])
        case = self.case
        extra = {"proj_size": case.proj_size} if case.proj_size else {}
        if regularized and case.regularizer:
            extra.update(REGULARIZERS[case.regularizer])
        module = fast_class(case.I, case.H, case.layers, bidirectional=case.bidirectional, backend=backend,
                            grad_clip=CLIP_VALUE if case.mode == "clip" else None, **extra)
        module.to(self.device, self.dtype)
        missing, unexpected = module.load_state_dict(self.torch_module.state_dict(), strict=False)
        if unexpected or any(not name.startswith("layer_norm_") for name in missing):
            raise RuntimeError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        return self._prepare(module)

    def module_step(self, module: nn.Module) -> Callable[[], None]:
        """One inference forward, or one forward + backward with fresh gradients."""
        make_input = self._module_input
        if not self.training:
            def inference_step():
                with torch.no_grad():
                    module(make_input())
            return inference_step
        x = self.x
        trainable = [p for p in module.parameters() if p.requires_grad]
        grad = self.grad_packed if self.lengths is not None else self.grad_padded
        packed = self.lengths is not None

        def training_step():
            x.grad = None
            for parameter in trainable:
                parameter.grad = None
            output, _ = module(make_input())
            torch.autograd.backward(output.data if packed else output, grad)
        return training_step

    def hooks_step(self) -> Callable[[], None]:
        """The per-step clipping loop over nn.LSTMCell / nn.GRUCell / nn.RNNCell (clip mode)."""
        case = self.case
        lstm = case.cell == "lstm"
        cell_class = TORCH_CELLS[case.cell]
        directions = 2 if case.bidirectional else 1
        cells: List[List[nn.Module]] = []
        for layer in range(case.layers):
            row = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                weight_ih = getattr(self.torch_module, "weight_ih" + suffix)
                cell = cell_class(weight_ih.shape[1], case.H, device=self.device, dtype=self.dtype)
                with torch.no_grad():
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        getattr(cell, name).copy_(getattr(self.torch_module, name + suffix))
                row.append(self._prepare(cell))
            cells.append(row)
        masks = None
        if self.lengths is not None:
            masks = [(self.lengths > t).unsqueeze(1).to(self.device) for t in range(case.T)]
        clamp = lambda g: g.clamp(-CLIP_VALUE, CLIP_VALUE)  # noqa: E731
        x, grad = self.x, self.grad_padded
        trainable = [p for row in cells for cell in row for p in cell.parameters() if p.requires_grad]

        def run_direction(cell, inputs: Tensor, reverse: bool) -> Tensor:
            h = inputs.new_zeros(case.B, case.H)
            c = inputs.new_zeros(case.B, case.H)
            outputs = [None] * case.T
            for t in (range(case.T - 1, -1, -1) if reverse else range(case.T)):
                if lstm:
                    h_new, c_new = cell(inputs[t], (h, c))
                else:
                    h_new, c_new = cell(inputs[t], h), c
                if masks is not None:  # rows past their length keep their state, output zeros
                    h_new = torch.where(masks[t], h_new, h)
                    c_new = torch.where(masks[t], c_new, c) if lstm else c_new
                    outputs[t] = h_new * masks[t]
                else:
                    outputs[t] = h_new
                h_new.register_hook(clamp)
                if lstm:
                    c_new.register_hook(clamp)
                h, c = h_new, c_new
            return torch.stack(outputs)

        def hooks_training_step():
            x.grad = None
            for parameter in trainable:
                parameter.grad = None
            layer_input = x
            for row in cells:
                outs = [run_direction(cell, layer_input, direction == 1) for direction, cell in enumerate(row)]
                layer_input = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
            torch.autograd.backward(layer_input, grad)
        return hooks_training_step


    def cells_step(self) -> Callable[[], None]:
        """One fwd+bwd of the torch cell loop with the row's regularizer (see the module docstring).
        Masks are drawn in the step, as the modules draw theirs."""
        case, module = self.case, self.torch_module
        name, options = case.regularizer, REGULARIZERS[case.regularizer]
        w_ih, w_hh = module.weight_ih_l0, module.weight_hh_l0
        b_ih, b_hh = module.bias_ih_l0, module.bias_hh_l0
        gates = gates_of(case.cell) * case.H
        lstm, norms = case.cell == "lstm", {}
        if name == "layer_norm":  # gains only on the gate products; gain and bias on the LSTM's cell
            norms = {"ih": nn.LayerNorm(gates, bias=False), "hh": nn.LayerNorm(gates, bias=False),
                     "cell": nn.LayerNorm(case.H)}
            for norm in norms.values():
                norm.to(self.device, self.dtype)
        trainable = [p for p in module.parameters() if p.requires_grad]
        trainable += [p for norm in norms.values() for p in norm.parameters()]
        x, grad, B, H = self.x, self.grad_padded, case.B, case.H
        draw = lambda shape, keep: torch.bernoulli(torch.full(shape, keep, device=self.device, dtype=self.dtype))  # noqa: E731

        def fresh_state(h, x_t, c, w_hh_used, mask):
            """The cell's new (h~, c~) from h_{t-1}, x_t, c_{t-1}."""
            h_in = h * mask if mask is not None else h
            if not norms and lstm:
                return torch.lstm_cell(x_t, (h_in, c), w_ih, w_hh_used, b_ih, b_hh)
            if case.cell == "rnn":
                return torch.rnn_tanh_cell(x_t, h_in, w_ih, w_hh_used, b_ih, b_hh), c
            # gru_cell blends with the h it is given: the unmasked state must be blended, so
            # the masked one goes only through the recurrent product (and layer norm needs the products).
            x_part, h_part = F.linear(x_t, w_ih), F.linear(h_in, w_hh_used)
            if norms:
                x_part, h_part = norms["ih"](x_part), norms["hh"](h_part)
            x_part, h_part = x_part + b_ih, h_part + b_hh
            if lstm:
                i, f, g, o = (x_part + h_part).chunk(4, 1)
                c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                return torch.sigmoid(o) * torch.tanh(norms["cell"](c_new)), c_new
            x_r, x_z, x_n = x_part.chunk(3, 1)
            h_r, h_z, h_n = h_part.chunk(3, 1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            return (1 - z) * torch.tanh(x_n + r * h_n) + z * h, c

        def cells_training_step():
            x.grad = None
            for parameter in trainable:
                parameter.grad = None
            w_hh_used, mask = w_hh, None
            if name == "weight_drop":
                keep = 1 - options["weight_drop"]
                w_hh_used = w_hh * (draw(tuple(w_hh.shape), keep) / keep)
            if name == "recurrent_dropout":
                keep = 1 - options["recurrent_dropout"]
                mask = draw((B, H), keep) / keep
            h, c = x.new_zeros(B, H), x.new_zeros(B, H)
            outputs = []
            for t in range(case.T):
                h_new, c_new = fresh_state(h, x[t], c, w_hh_used, mask)
                if name == "zoneout":
                    z = options["zoneout"]
                    d = draw((B, H), z)
                    h_new = d * h + (1 - d) * h_new
                    if lstm:
                        e = draw((B, H), z)
                        c_new = e * c + (1 - e) * c_new
                h, c = h_new, c_new
                outputs.append(h)
            torch.autograd.backward(torch.stack(outputs), grad)
        return cells_training_step


def provider_description(name: str, device: str) -> str:
    if name == TORCH:
        return "torch.nn (cuDNN)" if device.startswith("cuda") else "torch.nn (oneDNN/ATen)"
    if name == HOOKS:
        return "torch cell loop + clamp hooks"
    if name == CELLS:
        return "torch cell loop + the regularizer"
    if name == WITHOUT:
        return "rnntl_fast without the regularizer"
    return f"rnntl_fast {name}"


def build_steps(workload: Workload, providers: List[str]) -> Dict[str, object]:
    """provider -> step callable, or provider -> "skipped: why" for those that cannot run this case."""
    case = workload.case
    steps: Dict[str, object] = {}
    for name in providers:
        if name == TORCH:
            steps[name] = workload.module_step(workload.torch_module)
        elif name == HOOKS:
            if case.mode != "clip":
                continue  # only meaningful against grad_clip; not a note-worthy skip
            if case.proj_size:
                steps[name] = "skipped: nn.LSTMCell has no proj_size"
            else:
                steps[name] = workload.hooks_step()
        elif name in (CELLS, WITHOUT):
            if not case.regularizer or case.mode == "inference":
                continue  # only meaningful for a regularizer in training; not a note-worthy skip
            if name == WITHOUT:
                steps[name] = workload.module_step(workload.rnntl_module("auto", regularized=False))
            elif case.layers != 1 or case.bidirectional or case.proj_size or case.lengths != "full":
                steps[name] = "skipped: the cell loop covers one layer, one direction, full lengths, no proj_size"
            else:
                steps[name] = workload.cells_step()
        elif name == "reference" and reference_steps(case) > REFERENCE_MAX_STEPS:
            steps[name] = (f"skipped: T*layers*directions = {reference_steps(case)} > {REFERENCE_MAX_STEPS} "
                           "(the reference loop is slow)")
        elif name == "reference" and forward_flops(case, workload.lengths) > REFERENCE_MAX_FORWARD_FLOPS:
            steps[name] = (f"skipped: forward FLOPs {forward_flops(case, workload.lengths):.2g} > "
                           f"{REFERENCE_MAX_FORWARD_FLOPS:.0e} (the reference loop is slow)")
        else:
            try:
                steps[name] = workload.module_step(workload.rnntl_module(name))
            except (RuntimeError, TypeError, ValueError) as error:
                steps[name] = f"skipped: {error}"
    return steps
