"""`rnntl_fast.LSTM`, `rnntl_fast.GRU` and `rnntl_fast.RNN`: drop-in replacements for
torch.nn.LSTM / GRU / RNN.

Same constructor, parameter names, shapes, gate order, registration order and
initialisation as torch.nn (so state_dicts load both ways with strict=True and the same
seed gives the same weights), same inputs and outputs ([T, B, I], batch_first [B, T, I],
unbatched [T, I], PackedSequence in -> PackedSequence out, optional hx). Extra keyword
arguments, all off by default: grad_clip, grad_clip_mode, backend, the regularizers
recurrent_dropout, zoneout and weight_drop, for LSTM and GRU layer_norm, and for LSTM
cell_clip and proj_clip (docs/semantics.md, section 10). layer_norm adds parameters, so
its state_dict is torch.nn's plus the layer-norm gains.

They are plain nn.Modules (not torch.nn.LSTM subclasses) so that torch.compile traces them
without the graph break Dynamo applies to torch.nn's recurrent modules.
"""
import math
import numbers
import warnings
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import ops
from .ops.checks import check_clip, check_grad_clip_mode, normalize_lengths
from .ops.draws import bernoulli_draws
from .ops.reference import LayerNormWeights

HiddenLSTM = Tuple[Tensor, Tensor]


class _PackedLayout:
    """Where each row of a PackedSequence's data sits in the padded [T, B] layout of the
    kernels (flat index t * B + j, j in packed = sorted order), and the lengths. One
    index_copy / index_select moves the data (and one scatter its gradient), where
    pad_packed_sequence and pack_padded_sequence copy step by step, forward and backward.
    Used for CPU data (the gradient's scatter is index_add, which need not be deterministic
    on CUDA)."""

    def __init__(self, data: Tensor, batch_sizes: Tensor):
        batch_sizes = batch_sizes.to("cpu", torch.int64)
        self.steps, self.batch = batch_sizes.numel(), int(batch_sizes[0])
        step_of_row = torch.repeat_interleave(torch.arange(self.steps), batch_sizes)  # [N]
        first_row_of_step = torch.cumsum(batch_sizes, 0) - batch_sizes  # [T]
        column = torch.arange(step_of_row.numel()) - first_row_of_step[step_of_row]  # [N]
        self.positions = (step_of_row * self.batch + column).to(data.device)  # [N]
        self.lengths = (batch_sizes.unsqueeze(1) > torch.arange(self.batch).unsqueeze(0)).sum(0)  # [B]

    def pad(self, data: Tensor) -> Tensor:
        """data [N, *] -> [T, B, *], zeros past each length."""
        rest = tuple(data.shape[1:])
        padded = data.new_zeros((self.steps * self.batch,) + rest).index_copy(0, self.positions, data)
        return padded.view((self.steps, self.batch) + rest)

    def pack(self, output: Tensor) -> Tensor:
        """output [T, B, *] -> [N, *] in the packed order."""
        return output.reshape((self.steps * self.batch,) + tuple(output.shape[2:])).index_select(0, self.positions)


def _check_packed(input: PackedSequence) -> None:
    """A PackedSequence as pack_padded_sequence makes it: integer batch_sizes [T] on the CPU,
    positive and non-increasing, summing to the rows of data [N, I]."""
    batch_sizes = input.batch_sizes
    if not isinstance(batch_sizes, Tensor) or batch_sizes.dtype.is_floating_point or batch_sizes.dtype == torch.bool:
        raise TypeError(f"PackedSequence batch_sizes must be an integer tensor, got "
                        f"{batch_sizes.dtype if isinstance(batch_sizes, Tensor) else type(batch_sizes).__name__}")
    if batch_sizes.dim() != 1 or batch_sizes.numel() == 0:
        raise ValueError(f"PackedSequence batch_sizes must be a non-empty 1-D tensor, got shape "
                         f"{list(batch_sizes.shape)}")
    sizes = batch_sizes.to("cpu", torch.int64)
    if int(sizes.min()) <= 0 or bool((sizes[1:] > sizes[:-1]).any()):
        raise ValueError(f"PackedSequence batch_sizes must be positive and non-increasing, got {sizes.tolist()}")
    if input.data.dim() < 2 or input.data.shape[0] != int(sizes.sum()):
        raise ValueError(f"PackedSequence data must have shape [sum(batch_sizes)={int(sizes.sum())}, input_size], "
                         f"got {list(input.data.shape)}")


def _check_drop_probability(value, name: str) -> float:
    """A dropout probability of recurrent_dropout / weight_drop: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(value).__name__}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1) (the probability of dropping a unit; 1 would drop every one), "
                         f"got {value}")
    return float(value)


def _check_zoneout_probability(value, name: str = "zoneout") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1] (the probability of keeping a unit's previous value), got {value}")
    return float(value)


def _bernoulli_draws(shape, probability: float, like: Tensor) -> Tensor:
    """[shape] of 0/1 draws, 1 with `probability`, in like's dtype and device, from the default
    generator of like's device (docs/semantics.md section 10, rnntl_fast/ops/draws.py)."""
    return bernoulli_draws(shape, probability, 1.0, like)


def _dropout_mask(shape, p: float, like: Tensor) -> Tensor:
    """[shape] of Bernoulli(1 - p) / (1 - p) draws from the default generator of like's device."""
    return bernoulli_draws(shape, 1 - p, 1 / (1 - p), like)


def _packed_layout(data: Tensor, batch_sizes: Tensor) -> Optional["_PackedLayout"]:
    if data.device.type != "cpu":
        return None  # pad_packed_sequence: index_add (the layout's backward) need not be deterministic on CUDA
    return _PackedLayout(data, batch_sizes)


class _RecurrentStack(nn.Module):
    """What LSTM, GRU and RNN share: parameters laid out exactly as torch.nn.RNNBase does, input
    forms (batch_first, unbatched, PackedSequence), the regularizers, and the layer/direction loop."""

    mode = ""  # "LSTM", "GRU" or "RNN"
    gates = 0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, grad_clip: Optional[float] = None,
                 grad_clip_mode: str = "state", backend: str = "auto", recurrent_dropout: float = 0.0,
                 zoneout: Union[float, Tuple[float, float]] = 0.0, weight_drop: float = 0.0,
                 layer_norm: bool = False) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of an "
                             f"element being zeroed, got {dropout}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("proj_size", proj_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if input_size < 0:
            raise ValueError("input_size must be non-negative")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.grad_clip = check_clip(grad_clip, "grad_clip")
        self.grad_clip_mode = check_grad_clip_mode(grad_clip_mode)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend
        self.recurrent_dropout = _check_drop_probability(recurrent_dropout, "recurrent_dropout")
        self.weight_drop = _check_drop_probability(weight_drop, "weight_drop")
        self.zoneout = self._check_zoneout(zoneout)
        if not isinstance(layer_norm, bool):
            raise TypeError(f"layer_norm must be a bool, got {type(layer_norm).__name__}")
        self.layer_norm = layer_norm
        directions = 2 if bidirectional else 1
        gate_size = self.gates * hidden_size
        real_hidden = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: List[str] = []  # torch.nn's parameters only
        self._all_weights: List[List[str]] = []
        self._layer_norm_names: List[str] = []
        for layer in range(num_layers):
            for direction in range(directions):
                layer_input = input_size if layer == 0 else real_hidden * directions
                suffix = "_reverse" if direction == 1 else ""
                shapes = [("weight_ih", (gate_size, layer_input)), ("weight_hh", (gate_size, real_hidden))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                names = []
                for base, shape in shapes:
                    name = f"{base}_l{layer}{suffix}"
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
                if layer_norm:  # right after the layer-direction's torch.nn parameters
                    for base, size in self._layer_norm_sizes():
                        name = f"layer_norm_{base}_l{layer}{suffix}"
                        setattr(self, name, nn.Parameter(torch.empty(size, **factory)))
                        self._layer_norm_names.append(name)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch.nn.RNNBase's initialisation, in parameter registration order (so the same seed gives
        # torch.nn's weights, with or without layer norm); layer-norm gains 1 and biases 0.
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self._flat_weights:
            nn.init.uniform_(weight, -bound, bound)
        for name in self._layer_norm_names:
            nn.init.constant_(getattr(self, name), 0.0 if "_bias_" in name else 1.0)

    def _check_zoneout(self, zoneout) -> float:
        return _check_zoneout_probability(zoneout)

    def _layer_norm_sizes(self) -> List[Tuple[str, int]]:
        """(name, size) of the layer-norm parameters of one layer-direction, in registration order."""
        gate_size = self.gates * self.hidden_size
        return [("ih_weight", gate_size), ("hh_weight", gate_size)]

    def _zoneout_states(self) -> List[Tuple[str, float, int]]:
        """(op argument, probability, width) of each zoned state."""
        return [("zoneout", self.zoneout, self.hidden_size)]

    def flatten_parameters(self) -> None:
        """No-op: the kernels read the parameters where they are (cuDNN's packed buffer is not needed)."""

    @property
    def _flat_weights(self) -> List[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _layer_weights(self, layer: int, direction: int):
        suffix = "_reverse" if direction == 1 else ""
        get = lambda base: getattr(self, f"{base}_l{layer}{suffix}", None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")

    def _layer_norm_weights(self, layer: int, direction: int) -> Optional[LayerNormWeights]:
        if not self.layer_norm:
            return None
        suffix = "_reverse" if direction == 1 else ""
        get = lambda base: getattr(self, f"layer_norm_{base}_l{layer}{suffix}", None)  # noqa: E731
        return LayerNormWeights(get("ih_weight"), get("hh_weight"), get("cell_weight"), get("cell_bias"))

    def _regularizers(self, x: Tensor, weights, layer_norm: Optional[LayerNormWeights]):
        """(weights with weight_hh drop-connected, the op's regularizer arguments) of one
        layer-direction and forward call, for x [T, B, *]. Training draws, in this order, the
        recurrent-dropout mask [B, P], the weight-drop mask (weight_hh's shape) and the zoneout
        keep weights [T, B, *] (h, then c) from the default generator of x's device; evaluation
        draws nothing (zoneout keeps with weight z). Only the options that are on appear."""
        extras = {}
        steps, batch = x.shape[0], x.shape[1]
        weight_hh = weights[1]
        if self.training and self.recurrent_dropout > 0:
            extras["recurrent_mask"] = _dropout_mask((batch, weight_hh.shape[1]), self.recurrent_dropout, x)
        if self.training and self.weight_drop > 0:
            # autograd makes weight_hh's gradient mask * (the gradient of the effective weight)
            weights = (weights[0], weight_hh * _dropout_mask(weight_hh.shape, self.weight_drop, weight_hh),
                       *weights[2:])
        for name, z, width in self._zoneout_states():
            if z > 0:
                shape = (steps, batch, width)
                extras[name] = (_bernoulli_draws(shape, z, x) if self.training
                                else x.new_full((1, 1, 1), z).expand(shape))
        if layer_norm is not None:
            extras["layer_norm"] = layer_norm
        return weights, extras

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        for name, default in self._extra_defaults().items():
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)!r}"
        return s

    def _extra_defaults(self):
        return {"grad_clip": None, "grad_clip_mode": "state", "backend": "auto", "recurrent_dropout": 0.0,
                "zoneout": 0.0, "weight_drop": 0.0, "layer_norm": False}

    def _torch_nn_incompatible(self) -> List[str]:
        """The options on that torch.nn's module cannot run (convert(inverse=True) refuses them)."""
        on = {"recurrent_dropout": self.recurrent_dropout > 0,
              "zoneout": any(z > 0 for _, z, _ in self._zoneout_states()),
              "weight_drop": self.weight_drop > 0, "layer_norm": self.layer_norm}
        return [f"{name}={getattr(self, name)!r}" for name, value in on.items() if value]

    def __setstate__(self, state):
        super().__setstate__(state)
        for name, default in self._extra_defaults().items():
            self.__dict__.setdefault(name, default)
        self.__dict__.setdefault("_layer_norm_names", [])

    # -- input forms ------------------------------------------------------------------
    def _state_sizes(self) -> List[Tuple[str, int]]:
        raise NotImplementedError

    def _prepare(self, input, hx, lengths):
        """Returns (time-major input [T, B, I], lengths or None, hx tuple in batch order or None,
        a function that turns (output [T,B,*], states) back into the caller's forms)."""
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise TypeError(f"{self.mode}: lengths= is for padded Tensor input; a PackedSequence carries its "
                                "own lengths")
            _check_packed(input)
            sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
            # Padded in the packed (sorted) order; the kernels mask by lengths.
            layout = _packed_layout(input.data, input.batch_sizes)
            if layout is not None:
                padded, lengths = layout.pad(input.data), layout.lengths
            else:
                padded, lengths = pad_packed_sequence(PackedSequence(input.data, input.batch_sizes))
            self._check_input(padded, batched=True)
            hx = self._check_hx(hx, padded.shape[1], padded, batched=True)
            if hx is not None and sorted_indices is not None:
                hx = tuple(h.index_select(1, sorted_indices) for h in hx)

            def finish(output, states):
                if layout is not None:
                    out = PackedSequence(layout.pack(output), input.batch_sizes, sorted_indices, unsorted_indices)
                else:
                    packed = pack_padded_sequence(output, lengths, enforce_sorted=True)
                    out = PackedSequence(packed.data, packed.batch_sizes, sorted_indices, unsorted_indices)
                if unsorted_indices is not None:
                    states = tuple(s.index_select(1, unsorted_indices) for s in states)
                return out, states
            return padded, lengths, hx, finish

        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{self.mode}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        self._check_input(x, batched)
        hx = self._check_hx(hx, x.shape[1], x, batched)
        if lengths is not None:
            if not batched:
                raise ValueError(f"{self.mode}: lengths= needs batched 3-D input, got 2-D (unbatched) input")
            lengths = normalize_lengths(lengths, x.shape[0], x.shape[1])

        def finish(output, states):
            if not batched:
                return output.squeeze(1), tuple(s.squeeze(1) for s in states)
            if self.batch_first:
                output = output.transpose(0, 1)
            return output, states
        return x, lengths, hx, finish

    def _check_input(self, x: Tensor, batched: bool) -> None:
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {x.shape[-1]}")
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype and self._autocast_dtype(x.device, packed=False) is None:
            raise ValueError(f"input dtype {x.dtype} does not match the module's parameters' dtype {weight.dtype}; "
                             "convert one of them (e.g. module.to(input.dtype))")
        if x.device != weight.device:
            raise RuntimeError(f"input is on {x.device} but the module's parameters are on {weight.device}")

    def _check_hx(self, hx, batch: int, x: Tensor, batched: bool):
        if hx is None:
            return None
        sizes = self._state_sizes()
        states = hx if isinstance(hx, (tuple, list)) else (hx,)
        if len(states) != len(sizes):
            raise TypeError(f"{self.mode}: hx must be {'a tuple (h_0, c_0)' if len(sizes) == 2 else 'a Tensor'}, "
                            f"got {type(hx).__name__} of {len(states)}")
        checked = []
        for index, (state, (name, width)) in enumerate(zip(states, sizes)):
            if not isinstance(state, Tensor):
                raise TypeError(f"{self.mode}: {name} must be a Tensor, got {type(state).__name__}")
            if batched and state.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, {name} should also be 3-D but got {state.dim()}-D tensor")
            if not batched and state.dim() != 2:
                raise RuntimeError(f"For unbatched 2-D input, {name} should also be 2-D but got {state.dim()}-D tensor")
            state = state if batched else state.unsqueeze(1)
            expected = (self.num_layers * self.num_directions, batch, width)
            if tuple(state.shape) != expected:
                label = f"hidden[{index}]" if len(sizes) == 2 else "hidden"
                raise RuntimeError(f"Expected {label} size {expected}, got {list(state.shape)}")
            if state.dtype != x.dtype or state.device != x.device:
                raise RuntimeError(f"{name} must have the input's dtype and device ({x.dtype}, {x.device}), "
                                   f"got ({state.dtype}, {state.device})")
            checked.append(state)
        return tuple(checked)

    def _autocast_dtype(self, device: torch.device, packed: bool) -> Optional[torch.dtype]:
        """The dtype torch.nn's module runs in under torch.autocast, or None where autocast
        leaves it alone: on CUDA every cell in the autocast dtype (cuDNN's RNN is on the
        lower-precision list); on CPU the LSTM with padded input only (oneDNN's LSTM layer is),
        the GRU and packed input stay in the parameters' dtype."""
        if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
            return None
        if device.type == "cuda" or (self.mode == "LSTM" and not packed):
            return torch.get_autocast_dtype(device.type)
        return None

    def _stack(self, x: Tensor, lengths: Optional[Tensor], hx, run_layer, packed: bool = False):
        """Runs all layers and directions; run_layer(x, weights, states, lengths, reverse, extras) ->
        (out, new_states), extras being the op's regularizer arguments."""
        if torch.jit.is_tracing():
            raise RuntimeError(f"rnntl_fast.{self.mode} cannot be traced with torch.jit.trace (the fused ops are "
                               "not TorchScript); use torch.compile or torch.export.export, which support it")
        compute_dtype = self._autocast_dtype(x.device, packed)
        if compute_dtype is not None:
            with torch.autocast(x.device.type, enabled=False):
                cast = lambda t: t.to(compute_dtype) if t is not None else None  # noqa: E731
                hx = None if hx is None else tuple(cast(h) for h in hx)
                return self._run_layers(cast(x), lengths, hx, run_layer, weight_cast=cast)
        return self._run_layers(x, lengths, hx, run_layer, weight_cast=None)

    def _run_layers(self, x: Tensor, lengths: Optional[Tensor], hx, run_layer, weight_cast):
        finals: List[List[Tensor]] = [[] for _ in self._state_sizes()]
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                states = None if hx is None else tuple(h[index] for h in hx)
                weights = self._layer_weights(layer, direction)
                layer_norm = self._layer_norm_weights(layer, direction)
                if weight_cast is not None:
                    weights = tuple(weight_cast(w) for w in weights)
                    layer_norm = None if layer_norm is None else LayerNormWeights(*map(weight_cast, layer_norm))
                weights, extras = self._regularizers(layer_input, weights, layer_norm)
                out, new_states = run_layer(layer_input, weights, states, lengths, direction == 1, extras)
                outputs.append(out)
                for store, state in zip(finals, new_states):
                    store.append(state)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        return layer_input, tuple(torch.stack(store) for store in finals)


class LSTM(_RecurrentStack):
    r"""Drop-in replacement for :class:`torch.nn.LSTM` running fused rnntl_fast kernels.

    Args: exactly torch.nn.LSTM's (input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, proj_size=0, device=None,
    dtype=None), plus keyword-only extras, all off by default:
        grad_clip: clamp gradients inside the backward to [-grad_clip, grad_clip].
        grad_clip_mode: "state" (dL/dh_t, dL/dc_t at every step) or "gates" (gate pre-activations).
        cell_clip: clamp the cell state after every update.
        proj_clip: clamp the (projected) hidden state after every update.
        backend: "auto", "cpu", "cuda", "triton" or "reference".
        recurrent_dropout: p in [0, 1): variational dropout of h_{t-1} where it enters
            W_hh h_{t-1}, one mask per forward call and layer-direction (training only).
        zoneout: z or (z_h, z_c) in [0, 1]: each step each unit keeps its previous h (c) with
            probability z_h (z_c) in training; evaluation uses the expectation.
        weight_drop: p in [0, 1): DropConnect on weight_hh, one mask per forward call and
            layer-direction (training only); the parameter itself stays unmasked.
        layer_norm: layer-normalised gate products and cell state, with the parameters
            layer_norm_{ih,hh}_weight_l{k}[_reverse] [4H] (ones) and
            layer_norm_cell_{weight,bias}_l{k}[_reverse] [H] (ones, zeros; no bias when bias=False).
        weight_drop runs on every backend; which backend runs the others: BACKEND_RUNS in
        rnntl_fast/ops/backend.py (docs/semantics.md, section 10).

    Inputs: input [T, B, I] ([B, T, I] if batch_first, [T, I] unbatched, or a
    PackedSequence), optional (h_0, c_0) each [D*num_layers, B, H_out] / [D*num_layers, B, H].
    Keyword lengths: [B] ints with padded batched input, the alternative to a PackedSequence
    (same results: output zero past each row's length, h_n / c_n from each row's last step).
    Outputs: output [T, B, D*H_out] (same form as the input), (h_n, c_n).
    H_out = proj_size or hidden_size; D = 2 if bidirectional else 1.
    """

    mode = "LSTM"
    gates = 4

    def __init__(self, *args, grad_clip: Optional[float] = None, grad_clip_mode: str = "state",
                 cell_clip: Optional[float] = None, proj_clip: Optional[float] = None, backend: str = "auto",
                 **kwargs) -> None:
        super().__init__(*args, grad_clip=grad_clip, grad_clip_mode=grad_clip_mode, backend=backend, **kwargs)
        self.cell_clip = check_clip(cell_clip, "cell_clip")
        self.proj_clip = check_clip(proj_clip, "proj_clip")

    def _check_zoneout(self, zoneout):
        """A number, or a pair (z_h, z_c)."""
        if isinstance(zoneout, (tuple, list)):
            if len(zoneout) != 2:
                raise ValueError(f"zoneout must be a number or a pair (z_h, z_c), got {len(zoneout)} values")
            return (_check_zoneout_probability(zoneout[0], "zoneout[0] (z_h)"),
                    _check_zoneout_probability(zoneout[1], "zoneout[1] (z_c)"))
        return _check_zoneout_probability(zoneout)

    def _layer_norm_sizes(self):
        cell = [("cell_weight", self.hidden_size)] + ([("cell_bias", self.hidden_size)] if self.bias else [])
        return super()._layer_norm_sizes() + cell

    def _zoneout_states(self):
        z_h, z_c = self.zoneout if isinstance(self.zoneout, tuple) else (self.zoneout, self.zoneout)
        return [("zoneout_h", z_h, self.proj_size or self.hidden_size), ("zoneout_c", z_c, self.hidden_size)]

    def _extra_defaults(self):
        return {**super()._extra_defaults(), "cell_clip": None, "proj_clip": None}

    def _state_sizes(self):
        return [("hx", self.proj_size if self.proj_size > 0 else self.hidden_size), ("cx", self.hidden_size)]

    def forward(self, input: Union[Tensor, PackedSequence], hx: Optional[HiddenLSTM] = None, *,
                lengths: Optional[Union[Tensor, List[int]]] = None):
        x, lengths, hx, finish = self._prepare(input, hx, lengths)

        def run_layer(layer_input, weights, states, lengths, reverse, extras):
            weight_ih, weight_hh, bias_ih, bias_hh, weight_hr = weights
            h0, c0 = states if states is not None else (None, None)
            out, h_n, c_n = ops.lstm(layer_input, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, h0, c0, lengths,
                                     reverse=reverse, cell_clip=self.cell_clip, proj_clip=self.proj_clip,
                                     grad_clip=self.grad_clip, grad_clip_mode=self.grad_clip_mode,
                                     backend=self.backend, **extras)
            return out, (h_n, c_n)

        output, states = self._stack(x, lengths, hx, run_layer, packed=isinstance(input, PackedSequence))
        output, (h_n, c_n) = finish(output, states)
        return output, (h_n, c_n)


class GRU(_RecurrentStack):
    r"""Drop-in replacement for :class:`torch.nn.GRU` running fused rnntl_fast kernels.

    Args: exactly torch.nn.GRU's (input_size, hidden_size, num_layers=1, bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None), plus
    keyword-only extras, all off by default: grad_clip, grad_clip_mode, backend,
    recurrent_dropout, weight_drop, zoneout (a number: h is the only state) and layer_norm
    (parameters layer_norm_{ih,hh}_weight_l{k}[_reverse] [3H]), as LSTM.

    Inputs: input [T, B, I] ([B, T, I] if batch_first, [T, I] unbatched, or a
    PackedSequence), optional h_0 [D*num_layers, B, H]; keyword lengths as LSTM.
    Outputs: output [T, B, D*H] (same form as the input), h_n [D*num_layers, B, H].
    """

    mode = "GRU"
    gates = 3

    def __init__(self, *args, **kwargs) -> None:
        if "proj_size" in kwargs or len(args) > 7:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__(*args, **kwargs)

    def _state_sizes(self):
        return [("hx", self.hidden_size)]

    def forward(self, input: Union[Tensor, PackedSequence], hx: Optional[Tensor] = None, *,
                lengths: Optional[Union[Tensor, List[int]]] = None):
        x, lengths, hx, finish = self._prepare(input, hx, lengths)

        def run_layer(layer_input, weights, states, lengths, reverse, extras):
            weight_ih, weight_hh, bias_ih, bias_hh, _ = weights
            h0 = states[0] if states is not None else None
            out, h_n = ops.gru(layer_input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths, reverse=reverse,
                               grad_clip=self.grad_clip, grad_clip_mode=self.grad_clip_mode, backend=self.backend,
                               **extras)
            return out, (h_n,)

        output, states = self._stack(x, lengths, hx, run_layer, packed=isinstance(input, PackedSequence))
        output, (h_n,) = finish(output, states)
        return output, h_n


class RNN(_RecurrentStack):
    r"""Drop-in replacement for :class:`torch.nn.RNN` (Elman RNN, tanh or relu).

    Args: exactly torch.nn.RNN's (input_size, hidden_size, num_layers=1, nonlinearity='tanh',
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None),
    plus keyword-only extras, all off by default: grad_clip, grad_clip_mode ("state" clamps
    dL/dh_t, "gates" the gradient of the pre-activation), backend, recurrent_dropout,
    weight_drop and zoneout (a number), as LSTM. layer_norm is not defined for it.

    Backends "cpu" (the default "auto" on CPU tensors), "cuda", "triton" and "reference" run it
    with every option.

    Inputs: input [T, B, I] ([B, T, I] if batch_first, [T, I] unbatched, or a
    PackedSequence), optional h_0 [D*num_layers, B, H]; keyword lengths as LSTM.
    Outputs: output [T, B, D*H] (same form as the input), h_n [D*num_layers, B, H].
    """

    mode = "RNN"
    gates = 1

    def __init__(self, *args, **kwargs) -> None:
        if "proj_size" in kwargs or len(args) > 8:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:  # torch.nn.RNN's positional order: nonlinearity comes fourth
            nonlinearity, args = args[3], args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if nonlinearity not in ops.NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        if kwargs.get("layer_norm", False) is not False:
            raise ValueError("layer_norm is not defined for the Elman RNN (rnntl_fast.RNN); rnntl_fast.LSTM and "
                             "rnntl_fast.GRU take it")
        super().__init__(*args, **kwargs)
        self.nonlinearity = nonlinearity

    def _state_sizes(self):
        return [("hx", self.hidden_size)]

    def forward(self, input: Union[Tensor, PackedSequence], hx: Optional[Tensor] = None, *,
                lengths: Optional[Union[Tensor, List[int]]] = None):
        x, lengths, hx, finish = self._prepare(input, hx, lengths)

        def run_layer(layer_input, weights, states, lengths, reverse, extras):
            weight_ih, weight_hh, bias_ih, bias_hh, _ = weights
            h0 = states[0] if states is not None else None
            out, h_n = ops.rnn(layer_input, weight_ih, weight_hh, bias_ih, bias_hh, h0, lengths,
                               nonlinearity=self.nonlinearity, reverse=reverse, grad_clip=self.grad_clip,
                               grad_clip_mode=self.grad_clip_mode, backend=self.backend, **extras)
            return out, (h_n,)

        output, states = self._stack(x, lengths, hx, run_layer, packed=isinstance(input, PackedSequence))
        output, (h_n,) = finish(output, states)
        return output, h_n


def run_with_lengths(module: nn.Module, input: Tensor, lengths: Optional[Tensor], hx=None):
    """Runs an LSTM/GRU/RNN module on padded input with per-row lengths [B] (or None): rnntl_fast
    modules take the lengths directly; torch.nn modules (baselines, converted models) get the
    PackedSequence they need, and their output is padded back to input's length."""
    if lengths is None:
        return module(input, hx)
    if isinstance(module, _RecurrentStack):
        return module(input, hx, lengths=lengths)
    packed = pack_padded_sequence(input, torch.as_tensor(lengths).cpu(), batch_first=module.batch_first,
                                  enforce_sorted=False)
    output, state = module(packed, hx)
    steps = input.shape[1 if module.batch_first else 0]
    output, _ = pad_packed_sequence(output, batch_first=module.batch_first, total_length=steps)
    return output, state


_PAIRS = ((nn.LSTM, LSTM), (nn.GRU, GRU), (nn.RNN, RNN))
_CONSTRUCTOR_FIELDS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")


def _swap(module: nn.Module, inverse: bool, extras) -> nn.Module:
    for torch_class, fast_class in _PAIRS:
        source, target = (fast_class, torch_class) if inverse else (torch_class, fast_class)
        if type(module) is not source:
            continue
        if inverse and module._torch_nn_incompatible():
            raise ValueError(f"convert(inverse=True): this rnntl_fast.{module.mode} has "
                             f"{', '.join(module._torch_nn_incompatible())}, which torch.nn.{module.mode} cannot run")
        kwargs = {name: getattr(module, name) for name in _CONSTRUCTOR_FIELDS}
        if torch_class is nn.LSTM:
            kwargs["proj_size"] = module.proj_size
        if torch_class is nn.RNN:
            kwargs["nonlinearity"] = module.nonlinearity
        reference = next(iter(module.parameters()))
        kwargs.update(device=reference.device, dtype=reference.dtype)
        if not inverse:
            kwargs.update(extras)
        replacement = target(**kwargs)
        # torch.nn's parameters come from `module`; layer-norm ones (layer_norm=True) keep their initial values
        replacement.load_state_dict({**replacement.state_dict(), **module.state_dict()}, strict=True)
        replacement.train(module.training)
        for name, parameter in module.named_parameters():
            getattr(replacement, name).requires_grad_(parameter.requires_grad)
        return replacement
    return module


def convert(model: nn.Module, inverse: bool = False, **extras) -> nn.Module:
    """Swaps every torch.nn.LSTM / GRU / RNN inside `model` for rnntl_fast.LSTM / GRU / RNN with
    the same configuration, weights, requires_grad flags and training mode (in place; the
    model is also returned, which matters when `model` itself is one of them).
    `inverse=True` swaps back, and refuses a module with a regularizer or layer_norm on
    (torch.nn cannot run them). `extras` (grad_clip, backend, layer_norm, ...) go to the new
    modules; layer-norm parameters start at their initial values."""
    if inverse and extras:
        raise ValueError(f"convert(inverse=True) takes no extra arguments, got {sorted(extras)}")
    swapped = _swap(model, inverse, extras)
    if swapped is not model:
        return swapped
    for name, child in list(model.named_children()):
        replacement = convert(child, inverse, **extras)
        if replacement is not child:
            setattr(model, name, replacement)
    return model
