"""PyTorch checkpoints -> rnntl_fast modules, and the encoder built / saved from them."""
import pytest
import torch
from torch import nn

from rnntl_fast import GRU, LSTM
from rnntl_fast.pretrained import (PretrainedFormatError, RecurrentEncoder, UnsupportedLayerError, build_encoder,
                                   encoder_from_checkpoint, load_encoder, load_torch, save_encoder)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 6, padding_idx=0)
        self.rnn = nn.LSTM(6, 5, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
        self.gru = nn.GRU(6, 4, batch_first=True)
        self.cell = nn.LSTMCell(4, 3)
        self.head = nn.Linear(4, 2)


def _assert_same_module(fast, reference, x):
    with torch.no_grad():
        out_fast, state_fast = fast(x)
        out_ref, state_ref = reference(x)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(state_fast if isinstance(state_fast, tuple) else (state_fast,),
                    state_ref if isinstance(state_ref, tuple) else (state_ref,)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_nested_dataparallel_checkpoint(tmp_path):
    model = Tagger()
    wrapped = {f"module.{key}": value for key, value in model.state_dict().items()}   # DataParallel keys
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "model": wrapped, "optimizer": {"lr": 0.1}}, path)

    layers = load_torch(str(path), batch_first=True)
    assert list(layers) == ["rnn", "gru", "cell"]
    assert [type(m) for m in layers.values()] == [LSTM, GRU, LSTM]
    rnn = layers["rnn"]
    assert (rnn.num_layers, rnn.bidirectional, rnn.proj_size, rnn.batch_first) == (2, True, 3, True)
    x = torch.randn(2, 7, 6)
    _assert_same_module(rnn, model.rnn, x)
    _assert_same_module(layers["gru"], model.gru, x)
    # the LSTMCell's keys (no _l0) become a one-layer LSTM
    cell_input = torch.randn(1, 4)
    with torch.no_grad():
        h, c = model.cell(cell_input)
        _, (h_fast, c_fast) = layers["cell"](cell_input.unsqueeze(1))
    torch.testing.assert_close(h_fast[0], h, atol=1e-6, rtol=1e-5)
    assert "weight_hr_l0" in "\n".join(layers.reports["rnn"].mappings)

    assert list(load_torch(model, prefix="gru")) == ["gru"]
    assert list(load_torch(torch.compile(model).state_dict(), prefix="rnn")) == ["rnn"]   # "_orig_mod."


def test_torch_refusals():
    with pytest.raises(UnsupportedLayerError, match="vanilla RNN"):
        load_torch(nn.RNN(3, 4))
    with pytest.raises(PretrainedFormatError, match="no LSTM/GRU weights"):
        load_torch(nn.Linear(3, 4))
    bad = nn.LSTM(3, 4).state_dict()
    bad["weight_ih_l0"] = torch.zeros(10, 3)
    with pytest.raises(PretrainedFormatError, match="not a multiple"):
        load_torch(bad)


def test_encoder_from_checkpoint_save_and_load(tmp_path):
    model = Tagger()
    tokens = torch.tensor([[3, 4, 5, 6, 0], [7, 8, 0, 0, 0]])
    lengths = torch.tensor([4, 2])
    encoder = encoder_from_checkpoint({"state_dict": model.state_dict()}, prefix="rnn",
                                      embedding_key="embedding.weight")
    assert isinstance(encoder, RecurrentEncoder) and len(encoder.layers) == 1
    encoder.eval()
    with torch.no_grad():
        output, states = encoder(tokens)
        reference, _ = model.rnn(model.embedding(tokens))
        torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-4)
        packed_output, _ = encoder(tokens, lengths)
        assert not packed_output[1, 2:].any()   # padded steps are zero
        torch.testing.assert_close(packed_output[0, :4], encoder(tokens[:1, :4])[0][0], atol=1e-5, rtol=1e-4)

    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path)
    restored = load_encoder(path).eval()
    assert restored.config == encoder.config
    with torch.no_grad():
        torch.testing.assert_close(restored(tokens, lengths)[0], packed_output)


def test_build_encoder_stacks_layers_and_keeps_extras():
    first = LSTM(6, 5, batch_first=True, cell_clip=2.0)
    second = GRU(5, 4, bidirectional=True, batch_first=True)
    embedding = torch.randn(11, 6)
    encoder = build_encoder(embedding, {"a": first, "b": second}, padding_idx=0)
    assert encoder.config["layers"][0]["cell_clip"] == 2.0 and encoder.output_size == 8
    tokens = torch.randint(1, 11, (3, 4))
    with torch.no_grad():
        expected = second(first(embedding[tokens])[0])[0]
        torch.testing.assert_close(encoder(tokens)[0], expected)
    with pytest.raises(ValueError, match="expects 7 input features"):
        build_encoder(embedding, [LSTM(7, 3)])


def test_stacked_encoder_round_trip_keeps_weights_and_vocab(tmp_path):
    torch.manual_seed(0)
    encoder = RecurrentEncoder.stacked(6, 4, 5, num_layers=2, cell="gru", dropout=0.2)
    words = ["<pad>", "<unk>", "<eos>", "a", "b", "c"]
    path = tmp_path / "encoder.pt"
    save_encoder(encoder, path, vocab=words)
    restored = load_encoder(path)
    assert restored.config == encoder.config and restored.vocab == words
    for name, value in encoder.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    save_encoder(restored, tmp_path / "again.pt")  # the vocabulary travels with the encoder
    assert load_encoder(tmp_path / "again.pt").vocab == words
    with pytest.raises(ValueError, match="vocab has 2 words; the embedding has 6 rows"):
        save_encoder(encoder, path, vocab=["x", "y"])


def test_load_encoder_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(PretrainedFormatError, match="save_encoder"):
        load_encoder(path)


def test_pickled_module_needs_weights_only_false(tmp_path):
    path = tmp_path / "whole_module.pt"
    source = Tagger()
    torch.save(source, path)   # a pickled custom class: torch.load(weights_only=True) refuses it
    with pytest.raises(PretrainedFormatError, match="weights_only=False"):
        load_torch(str(path))
    layers = load_torch(str(path), weights_only=False, batch_first=True)
    _assert_same_module(layers["gru"], source.gru, torch.randn(5, 2, 6))
    source = nn.GRU(3, 4)
    torch.save(source, path)
    layers = load_torch(str(path), weights_only=False)
    _assert_same_module(layers[""], source, torch.randn(5, 2, 3))
