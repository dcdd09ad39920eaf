"""The default loss and the unpacking of a model's output (losses): a readout cross entropy down to
two features, MSE for one, float64 kept, auxiliary tensors skipped. Oracles: torch's own functions."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from stabilitycheck.losses import NUM_CLASSES, DefaultLoss, unpack


def test_the_default_loss_of_two_outputs_is_cross_entropy_of_a_readout() -> None:
    """The last dimension has >= 2 entries: cross-entropy of a readout N(0, 1/2) to NUM_CLASSES
    classes (torch.randn on generator(seed + 1)) against labels drawn from the seed (torch.randint on
    generator(seed)), as F.cross_entropy computes it."""
    from stabilitycheck.losses import NUM_CLASSES, DefaultLoss

    out = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1]], dtype=torch.float64)
    readout = torch.randn(NUM_CLASSES, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (3,), generator=torch.Generator().manual_seed(7))
    expected = F.cross_entropy(out @ (readout / 2**0.5).T, labels)
    assert torch.allclose(DefaultLoss(7)(out), expected, rtol=1e-15)


def test_a_float64_output_keeps_float64_for_its_loss() -> None:
    from stabilitycheck.losses import accumulate

    x = torch.tensor([1.0 + 2.0**-40], dtype=torch.float64)
    assert accumulate(x).dtype == torch.float64 and accumulate(x).item() == 1.0 + 2.0**-40
    assert accumulate(x.half()).dtype == torch.float32


def test_the_default_loss_is_a_readout_cross_entropy_down_to_two_features_with_its_own_stream() -> None:
    """DefaultLoss on an output whose last dimension has >= 2 entries (2 here): cross-entropy of a fixed
    N(0, 1/features) readout drawn from generator(seed + READOUT_STREAM) (READOUT_STREAM = 1), against
    labels drawn from generator(seed); a float64 output keeps float64. Oracle: those draws by torch."""
    seed, out = 5, torch.randn(3, 2, dtype=torch.float64)
    weight = torch.randn(
        NUM_CLASSES, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    labels = torch.randint(0, NUM_CLASSES, (3,), generator=torch.Generator().manual_seed(seed))
    want = torch.nn.functional.cross_entropy(out @ (weight / math.sqrt(2)).T, labels)
    got = DefaultLoss(seed)(out)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_the_default_loss_of_one_feature_is_mse_to_normal_targets_from_the_seed() -> None:
    """With one entry in the last dimension: MSE to fixed targets N(0, 1) drawn from generator(seed)."""
    out = torch.randn(4, 1)
    targets = torch.randn(4, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    torch.testing.assert_close(DefaultLoss(3)(out), torch.nn.functional.mse_loss(out, targets))


def test_unpack_skips_a_0d_auxiliary_loss_takes_1d_logits_and_notes_only_several_tensors() -> None:
    """unpack: the output tensor is `logits` when it has a dimension, else the first tensor with one
    (a 0-d auxiliary loss is no output); the note names it only when the output held several."""
    aux, hidden, logits = torch.tensor(0.5), torch.randn(2, 3), torch.randn(5)
    tensor, loss, note = unpack((aux, hidden))
    assert tensor is hidden and loss is None and "output[1]" in note
    assert unpack({"hidden": hidden, "logits": logits})[0] is logits  # logits first, wherever it is
    alone = unpack((hidden,))
    assert alone[0] is hidden and alone[1:] == (None, "")


def test_a_namedtuple_is_read_by_its_field_names_as_a_dict_is() -> None:
    """A namedtuple (aux_logits, logits) was read by position, its loss on aux_logits, where a dict or
    an object with the same fields is read on logits (found by an audit of torchvision's models, whose
    InceptionOutputs hold logits first). Its `logits` and `loss` fields are read by name."""
    from typing import NamedTuple

    class Outputs(NamedTuple):
        aux_logits: torch.Tensor
        logits: torch.Tensor

    class WithLoss(NamedTuple):
        loss: torch.Tensor
        hidden: torch.Tensor

    aux, logits, hidden, total = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 2), torch.tensor(1.5)
    tensor, loss, note = unpack(Outputs(aux, logits))
    assert tensor is logits and loss is None and note == ""
    tensor, loss, _ = unpack(WithLoss(total, hidden))
    assert tensor is hidden and loss is total

    # without logits, the note names the entry read as it indexes a namedtuple: by position
    class Plain(NamedTuple):
        aux: torch.Tensor
        hidden: torch.Tensor

    tensor, _, note = unpack(Plain(total, hidden))
    assert tensor is hidden and "loss on output[1] " in note


def test_an_integer_output_is_named_as_such_not_as_a_detached_one() -> None:
    """A model returning self.l(x).long() got 'the loss does not require grad ... (was the output
    detached or computed under torch.no_grad()?)': the default loss made a float loss of the integers,
    with no graph (found by a new user's trial). Its dtype is named, in one line."""
    import pytest

    from stabilitycheck.errors import UsageError
    from stabilitycheck.losses import OutputLoss

    loss = OutputLoss(DefaultLoss(0), "model.py")
    out = torch.nn.Linear(4, 4)(torch.randn(3, 4))
    assert loss(out, None).requires_grad  # the float output, as before
    for dtype in (torch.long, torch.int32, torch.bool):
        with pytest.raises(
            UsageError, match=f"output has dtype {str(dtype)[6:]}, which carries no gradient"
        ) as e:
            loss(out.to(dtype), None)
        assert "\n" not in str(e.value)


def test_integer_predictions_beside_the_logits_are_not_the_output_read() -> None:
    """An output (preds, logits), preds an int64 argmax, was read on preds and refused as an integer
    output though the float logits were there (found by a review): the first floating tensor with a
    dimension is read; integers alone are still refused."""
    import pytest

    from stabilitycheck.errors import UsageError
    from stabilitycheck.losses import OutputLoss

    logits = torch.nn.Linear(4, 4)(torch.randn(3, 4))
    tensor, _, note = unpack((logits.argmax(-1), logits))
    assert tensor is logits and "output[1]" in note
    assert OutputLoss(DefaultLoss(0), "model.py")((logits.argmax(-1), logits), None).requires_grad
    with pytest.raises(UsageError, match="output has dtype int64"):
        OutputLoss(DefaultLoss(0), "model.py")((logits.argmax(-1), logits.argmax(-1)), None)
