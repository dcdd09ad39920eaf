"""The user's model file as a Subject: the examples probe, every misuse is a one-line UsageError."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.errors import UsageError
from stabilitycheck.losses import NUM_CLASSES, DefaultLoss, unpack
from stabilitycheck.modelfile import ModelFile, ModelFileError, load
from stabilitycheck.searching import check

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FILES = Path(__file__).resolve().parent / "modelfiles"
EXAMPLE_NAMES = ("mlp", "rnn_lm", "fixed_model", "transformer")


@pytest.fixture(autouse=True)
def _no_onednn_rnn(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN's CPU RNN costs ~1 s per call on small CI machines (2 ms without): keep these tests fast."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


def example(name: str) -> ModelFile:
    return load(str(EXAMPLES / f"{name}.py"))


def broken(name: str) -> str:
    return str(FILES / f"{name}.py")


def check_defaults(subject: ModelFile) -> None:
    """The pre-search check at the file's defaults (a model that cannot run is a one-line UsageError)."""
    check(subject, subject.config())


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --- the examples --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_loads_and_probes(name: str) -> None:
    subject = example(name)
    m = probe(subject.config(steps=1), subject)
    assert Path(subject.name).name.startswith(f"{name}.py:")
    assert m.layer_names and m.first_nonfinite is None
    assert all(math.isfinite(v) for v in m.loss + m.grad_norm)
    assert m.steps_run == 1


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_check_at_the_defaults_passes_and_probes_one_seed(name: str) -> None:
    subject = example(name)
    assert check_defaults(subject) is None  # type: ignore[func-returns-value]
    m = probe(subject.config(), subject)
    assert m == probe(subject.config(seeds=1), subject)  # probe() is one seed whatever run.seeds says


def test_example_knobs_and_bounds() -> None:
    mlp = example("mlp")
    assert mlp.knobs == {"depth": 4, "width": 64, "init_scale": 1.0}
    assert mlp.bounds["init_scale"] == (0.25, 4.0, 0.25)
    assert mlp.init_knob == "init_scale" and not mlp.scales_weights  # the factory's own parameter
    rnn = example("rnn_lm")
    # init_scale is added as a knob where the factory has none: it scales the built weights
    assert rnn.knobs == {"width": 64, "num_layers": 1, "seq_len": 32, "batch_size": 8, "init_scale": 1.0}
    assert rnn.scales_weights
    assert example("fixed_model").knobs == {"init_scale": 1.0}
    assert example("transformer").knobs["norm_first"] == 0


def test_knobs_reach_the_factory_and_batch() -> None:
    rnn = example("rnn_lm")
    built = rnn.build(rnn.config(seq_len=5, batch_size=3, width=16))
    assert built.inputs.shape == (3, 6)  # seq_len + 1 tokens
    assert built.model.rnn.hidden_size == 16  # type: ignore[union-attr]
    tf = example("transformer")
    built = tf.build(tf.config(num_layers=3, norm_first=1))
    assert [name for name, _ in built.blocks] == [f"encoder.layers.{i}" for i in range(3)]
    assert built.model.encoder.layers[0].norm_first  # type: ignore[index,union-attr]


def test_a_batch_parameter_without_default_gets_the_factorys_knob(tmp_path: Path) -> None:
    """`def batch(model, depth)` beside `def build(depth=4)` was refused, saying SPACE does not bound
    depth where it did (found in an audit): the factory's knob is passed to batch() whatever its own
    default. Oracle: the shapes batch() makes from the depth it is given."""
    path = tmp_path / "model.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "SPACE = {'depth': (1, 8)}\n"
        "def build(depth=4):\n    return nn.Sequential(*(nn.Linear(3, 3) for _ in range(depth)))\n"
        "def batch(model, depth):\n    return torch.ones(depth, 3)\n"
    )
    subject = load(str(path))
    assert subject.knobs == {"depth": 4, "init_scale": 1.0}
    assert subject.build(subject.config(depth=6)).inputs.shape == (6, 3)
    path.write_text(path.read_text().replace("def batch(model, depth)", "def batch(model, depth, rows)"))
    with pytest.raises(ModelFileError, match="batch\\(\\) parameter 'rows' has no default and SPACE"):
        load(str(path))


PAD_LM = """
import torch
from torch import nn
class Block(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(w), nn.Linear(w, w)
    def forward(self, x):
        return x + self.fc(self.ln(x))
class LM(nn.Module):
    def __init__(self, depth, w=32, V=50):
        super().__init__()
        self.emb = nn.Embedding(V, w, padding_idx=PAD)
        self.blocks = nn.ModuleList(Block(w) for _ in range(depth))
        self.head = nn.Linear(w, V)
    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)
def build(depth=2, seq_len=64):
    return LM(depth)
"""


@pytest.mark.parametrize("pad", [0, -1])
def test_inferred_token_ids_leave_the_pad_out(tmp_path: Path, pad: int) -> None:
    """Inferred ids held the embedding's padding_idx (found by a user's trial): its row is zero, and
    block 0's LayerNorm of a zero row has gain 1/sqrt(eps), so a pre-norm LM read growth 127 at depth
    2, a false explosion. Oracle: the ids drawn (every id but the pad, from 1,024 draws) and torch's
    own gradients: the growth is the ratio of dL/d(embedding output) to dL/d(last block's output)."""
    path = tmp_path / "padlm.py"
    path.write_text(PAD_LM.replace("PAD", str(pad)))
    subject = load(str(path))
    built = subject.build(subject.config(seq_len=1024))
    assert set(built.inputs.unique().tolist()) == set(range(50)) - {pad % 50}
    for seed in range(3):
        built = subject.build(subject.config(seed=seed))
        model = built.model
        h0 = model.emb(built.inputs).detach().requires_grad_()  # type: ignore[operator]
        h = h0
        for block in model.blocks:  # type: ignore[union-attr]
            h = block(h)
            h.retain_grad()
        built.loss_fn(model.head(h), built.inputs).backward()  # type: ignore[operator]
        assert h0.grad is not None and h.grad is not None
        oracle = (h0.grad.norm() / h.grad.norm()).item()
        assert oracle < 10
        assert probe(subject.config(seed=seed), subject).growth == pytest.approx(oracle, rel=1e-4)


def test_a_factorys_own_dtype_cast_to_the_runs_is_said(tmp_path: Path) -> None:
    """A factory returning model.half() was probed in float32 with no word of it (found by a user's
    trial: a float16 overflow at depth 4 read stable). The run's dtype is the one probed, and the
    note says the cast. Oracle: the parameters' dtypes torch reports."""
    path = tmp_path / "half.py"
    path.write_text(
        "from torch import nn\ndef build(depth=2):\n    return nn.Sequential(nn.Linear(4, 4)).half()\n"
    )
    subject = load(str(path))
    built = subject.build(subject.config())
    assert {p.dtype for p in built.model.parameters()} == {torch.float32}
    assert "the factory made float16 weights, cast to float32" in built.blocks_note
    assert "cast" not in subject.build(subject.config(dtype="float16")).blocks_note
    plain = example("mlp")  # torch's default dtype is no choice of the factory's
    assert "cast" not in plain.build(plain.config(dtype="float64")).blocks_note


def test_config_holds_the_files_knobs_in_order_and_run_settings_in_run() -> None:
    c = example("mlp").config(depth=8, seed=3, dtype="float64")
    path, _, factory = c.subject.rpartition(":")
    assert Path(path).is_absolute() and path.endswith("mlp.py") and factory == "build"
    assert c.knobs == (("depth", 8), ("width", 64), ("init_scale", 1.0))
    assert (c.run.seed, c.run.dtype) == (3, "float64")
    assert Config.from_json(c.to_json()) == c


def test_space_has_one_axis_per_space_bound_in_order() -> None:
    space = example("transformer").space()
    assert "examples/transformer.py" in space.label
    assert [a.name for a in space.axes] == ["num_layers", "norm_first", "seq_len"]
    assert list(space.axes[1].values) == [0, 1]
    assert space.base == example("transformer").config()
    fixed = example("fixed_model").space()  # no SPACE: the init knob over x0.5..x4 its default
    assert [a.name for a in fixed.axes] == ["init_scale"]
    assert min(fixed.axes[0].values) == 0.5 and max(fixed.axes[0].values) == 4.0


def test_a_space_point_reaches_a_knob_named_like_a_config_field() -> None:
    subject = example("mlp")
    config = subject.space().config((7, 0, 0))  # depth 8
    assert subject.values(config)["depth"] == 8


def test_device_and_dtype_apply_to_floating_tensors_only() -> None:
    rnn = example("rnn_lm")
    built = rnn.build(rnn.config(dtype="float64"))
    assert all(p.dtype == torch.float64 for p in built.model.parameters())
    assert built.inputs.dtype == torch.long
    mlp = example("mlp")
    assert mlp.build(mlp.config(dtype="float64")).inputs.dtype == torch.float64


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_same_config_gives_equal_measurements(name: str) -> None:
    subject = example(name)
    c = subject.config(steps=2, seed=5)
    assert probe(c, subject) == probe(c, subject)
    assert probe(c, example(name)) == probe(c, subject)  # a fresh import builds the same thing


def test_seed_changes_the_model_and_inputs() -> None:
    mlp = example("mlp")
    a, b = mlp.build(mlp.config(seed=0)), mlp.build(mlp.config(seed=1))
    assert not torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.model.layers[0].weight, b.model.layers[0].weight)  # type: ignore[index,union-attr]


def test_build_leaves_the_global_rng_alone() -> None:
    mlp = example("mlp")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mlp.build(mlp.config(seed=7))
    assert torch.equal(torch.rand(3), expected)


# --- init_scale ----------------------------------------------------------------------------------


def test_init_scale_multiplies_rank_2_weights_of_a_fixed_model() -> None:
    fixed = example("fixed_model")
    base = weights(fixed.build(fixed.config()).model)
    config = fixed.config(init_scale=2.5)
    assert config.values == {"init_scale": 2.5}
    scaled = weights(fixed.build(config).model)
    for name, value in base.items():
        factor = 2.5 if value.dim() >= 2 else 1.0
        torch.testing.assert_close(scaled[name], value * factor, rtol=0, atol=0)
    assert torch.equal(fixed.module.model[0].weight, base["0.weight"])  # the user's model is untouched


def test_init_scale_field_scales_a_factory_without_init_scale() -> None:
    rnn = example("rnn_lm")
    base = weights(rnn.build(rnn.config()).model)
    scaled = weights(rnn.build(rnn.config(init_scale=3.0)).model)
    assert rnn.scales_weights  # build() has no init_scale parameter
    assert rnn.config().with_knobs(init_scale=3.0) == rnn.config(init_scale=3.0)  # Space's way
    for name, value in base.items():
        torch.testing.assert_close(scaled[name], value * (3.0 if value.dim() >= 2 else 1.0))


@pytest.mark.parametrize("scale", [0.0, -2.0, float("inf")])
def test_an_init_scale_the_weights_cannot_be_multiplied_by_is_refused(scale: float) -> None:
    """init_scale multiplies the weights: 0, a negative or an infinite one was taken (a search over
    -8..-1 reported "stable (tried up to init_scale=-1)", its smallest multiplier, found by a trial),
    where the zoo refuses it. Now a one-line error naming the file, as the zoo's."""
    rnn = example("rnn_lm")
    with pytest.raises(ModelFileError, match=r"knob init_scale=.* must be a finite number > 0"):
        rnn.build(rnn.config(init_scale=scale))


def test_init_scale_scales_the_weights_of_lazy_layers_drawn_alike() -> None:
    """Oracle: the weights at init_scale 1 times the scale. Lazy layers get their weights at their
    first call: scaling them raised on an uninitialised parameter (reported as the model's error), and
    drawn at the probe's first call they would differ between scales by more than the factor."""
    lazy = load(broken("lazy"))
    base = weights(lazy.build(lazy.config()).model)
    scaled = weights(lazy.build(lazy.config(init_scale=3.0)).model)
    assert base and base.keys() == scaled.keys()
    for name, value in base.items():
        torch.testing.assert_close(scaled[name], value * (3.0 if value.dim() >= 2 else 1.0))
    check(lazy, lazy.config(init_scale=0.5))  # the search's first check: no UsageError


def test_a_factory_with_init_scale_gets_it_as_a_knob_and_no_extra_scaling() -> None:
    mlp = example("mlp")
    one = mlp.build(mlp.config()).model.layers[0].weight  # type: ignore[index,union-attr]
    two = mlp.build(mlp.config(init_scale=2.0)).model.layers[0].weight  # type: ignore[index,union-attr]
    torch.testing.assert_close(two, 2 * one)  # the factory's own N(0, 2²/width), not scaled twice


# --- outputs and the default loss ----------------------------------------------------------------


@pytest.mark.parametrize("factory", ["as_tuple", "as_dict", "as_attrs"])
def test_packed_outputs_measure_like_the_plain_tensor(factory: str) -> None:
    plain = load(f"{broken('outputs')}:plain")
    packed = load(f"{broken('outputs')}:{factory}")
    assert packed.name.endswith(f"outputs.py:{factory}")
    assert probe(packed.config(), packed).loss == probe(plain.config(), plain).loss


@pytest.mark.parametrize(("factory", "entry"), [("aux_dict", "output['out']"), ("aux_tuple", "output[1]")])
def test_a_0d_auxiliary_loss_first_in_the_output_is_not_taken_for_the_output(
    factory: str, entry: str
) -> None:
    """{"aux_loss": (h**2).mean(), "out": logits}: the 0-d aux loss was the output (MSE to a random
    target). The logits are used, so the loss is the plain model's, and the report names the entry."""
    plain = load(f"{broken('outputs')}:plain")
    packed = load(f"{broken('outputs')}:{factory}")
    m = probe(packed.config(), packed)
    assert m.loss == probe(plain.config(), plain).loss
    assert f"loss on {entry} (of 2 tensors" in m.blocks_note and "; " in m.blocks_note
    assert "loss on" not in probe(plain.config(), plain).blocks_note


def test_unpack_prefers_logits_then_the_first_tensor_with_a_dimension() -> None:
    big, logits, aux = torch.zeros(4, 64), torch.zeros(4, 5), torch.tensor(1.0)
    assert unpack({"hidden": big, "logits": logits})[0] is logits  # named: no note
    assert unpack({"hidden": big, "logits": logits})[2] == ""
    assert unpack((aux, (logits, big)))[0] is logits  # nested, position order (not the largest)
    assert unpack((aux, (logits, big)))[2].startswith("loss on output[1][0] (of 3 tensors")
    assert unpack({"loss": aux, "out": big})[1:] == (aux, "")  # the model's own loss: no output chosen
    assert unpack((aux,))[0] is aux  # only a 0-d tensor: it is the output, as before


def test_a_loss_in_the_output_is_used_as_the_loss() -> None:
    subject = load(f"{broken('outputs')}:with_loss")
    built = subject.build(subject.config())
    expected = built.model.layers(built.inputs).logsumexp(dim=-1).mean()  # type: ignore[operator]
    assert probe(subject.config(), subject).loss[0] == pytest.approx(expected.item())


def test_default_loss_is_cross_entropy_of_a_readout_of_the_last_dimension() -> None:
    loss = DefaultLoss(seed=0)
    zeros = torch.zeros(4, 7, 5, requires_grad=True)
    value = loss(zeros)
    assert value.item() == pytest.approx(math.log(NUM_CLASSES))  # uniform; the mean square would be 0
    value.backward()
    assert zeros.grad is not None and zeros.grad.abs().sum() > 0
    assert loss(zeros).item() == value.item() and len(loss.cache) == 2  # readout and labels drawn once


def test_default_loss_is_mse_to_fixed_targets_for_one_output() -> None:
    subject = load(broken("scalar_output"))
    built = subject.build(subject.config())
    out = built.model(built.inputs)
    first = built.loss_fn(out, built.inputs)
    assert built.loss_fn(out, built.inputs).item() == first.item()
    assert first.item() != pytest.approx(out.pow(2).mean().item())
    targets = next(iter(DefaultLoss(0).cache.values()), None)
    assert targets is None  # a fresh DefaultLoss has drawn nothing yet
    assert torch.equal(
        DefaultLoss(0)(out.detach()), F.mse_loss(out.detach(), DefaultLoss(0).target("mse", (6, 1), 0, out))
    )


def test_default_labels_depend_on_the_seed_only() -> None:
    out = torch.zeros(3, 4)
    a, b, c = DefaultLoss(1), DefaultLoss(1), DefaultLoss(2)
    b(torch.zeros(9, 9))  # another shape drawn first does not change these labels
    assert torch.equal(a.target("ce", (3,), 4, out), b.target("ce", (3,), 4, out))
    assert not torch.equal(a.target("ce", (50,), 4, out), c.target("ce", (50,), 4, out))


def test_a_model_that_makes_nan_is_a_finding_not_an_error() -> None:
    subject = load(broken("nan_model"))
    check_defaults(subject)
    m = probe(subject.config(seeds=1), subject)
    assert m.first_nonfinite is not None and m.first_nonfinite.layer == "(after the last block)"


# --- file handling -------------------------------------------------------------------------------


def test_sibling_imports_work_and_sys_path_is_restored() -> None:
    before = list(sys.path)
    subject = load(broken("sibling"))
    assert sys.path == before
    assert len(subject.build(subject.config(depth=5)).blocks) == 5


def test_a_bounded_parameter_without_default_starts_at_its_lower_bound() -> None:
    subject = load(broken("space_bounded"))
    assert subject.knobs == {
        "depth": 2,
        "width": 8,
        "init_scale": 1.0,
    }  # str and bool parameters are not knobs
    assert len(subject.build(subject.config()).blocks) == 2


def test_seq_dim_cuts_or_tiles_every_matching_input() -> None:
    subject = load(broken("sequence"))
    assert subject.knobs == {"seq_len": 5, "init_scale": 1.0}
    assert subject.bounds == {"seq_len": (1, 64), "init_scale": (0.5, 4.0)}  # init_scale: the added knob
    short = subject.build(subject.config(seq_len=3)).inputs
    assert short["ids"].tolist() == [[0, 1, 2], [5, 6, 7]] and short["mask"].shape == (2, 3)
    long = subject.build(subject.config(seq_len=12)).inputs
    assert long["ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert long["mask"].shape == (2, 12)
    assert probe(subject.config(seq_len=12), subject).first_nonfinite is None


# --- errors --------------------------------------------------------------------------------------


def assert_one_line(
    exc: pytest.ExceptionInfo[UsageError], file: str, *fragments: str, kind: type[UsageError] = ModelFileError
) -> None:
    message = str(exc.value)
    assert isinstance(exc.value, kind)
    assert "\n" not in message, message
    assert Path(file).name in message, message
    for fragment in fragments:
        assert fragment in message, message


LOAD_ERRORS = [
    ("raises_on_import", ("raises_on_import.py:6:", "RuntimeError: cannot find the dataset")),
    ("exits_on_import", ("sys.exit(3)", "if __name__ == '__main__'")),
    ("no_factory", ("no top-level `build`", "['WIDTH', 'make_net']", "def build(")),
    ("no_default", ("parameter 'depth' has no default", "SPACE = {'depth': (1, 64)}")),
    ("space_reversed", ("SPACE['depth']=(5, 1) is empty (lo > hi)", "'depth': (1, 5)")),
    ("space_unknown", ("SPACE names 'detph'", "knobs are ['depth', 'init_scale']")),
    ("space_malformed", ("SPACE['depth']=8 is malformed", "(lo, hi)")),
    ("bad_seq_dim", ("SEQ_DIM=3", "e.g. SEQ_DIM = 1")),
    ("model_without_input", ("no `example_input`", "torch.randn")),
    ("model_not_module", ("`model` is a str, not an nn.Module",)),
    ("run_named_knob", ("build() parameter 'steps' has the name of a run setting", "model_steps=2")),
    ("run_named_batch_knob", ("batch() parameter 'clip' has the name of a run setting", "model_clip=3.0")),
]


@pytest.mark.parametrize(("name", "fragments"), LOAD_ERRORS, ids=[e[0] for e in LOAD_ERRORS])
def test_load_errors_are_one_line(name: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(UsageError) as exc:
        load(broken(name))
    assert_one_line(exc, name, *fragments)


BUILD_ERRORS = [
    ("returns_int", ("build(width=8) returned an int, not an nn.Module",)),
    ("batch_not_tensors", ("batch(model, batch_size=2) is a list", "not tensors")),
    ("loss_vector", ("loss_vector.py: loss(output, inputs) (line 11)", "shape (16,), not a scalar")),
    ("loss_detached", ("does not require grad",)),
    ("loss_raises", ("loss(output, inputs) raised AttributeError",)),
    ("no_parameters", ("no parameters that require grad",)),
    ("frozen", ("no parameters that require grad",)),
    ("no_tensor_output", ("output is a dict with no tensor in it", "def loss(output, inputs)")),
    ("forward_raises", ("raised RuntimeError", "batch()")),  # the rest of the message is torch's
    ("scripted", ("the model is a TorchScript module",)),
    ("scripted_block", ("0 is a TorchScript module",)),
]


TORCHSCRIPT = pytest.mark.filterwarnings("ignore::DeprecationWarning")
"""The scripted* model files build TorchScript modules on purpose (to check they are refused); torch
2.13 deprecates torch.jit.script with a DeprecationWarning, which is no error of theirs. (By category,
not by torch's wording; only these parameters carry the mark.)"""


@pytest.mark.parametrize(
    ("name", "fragments"),
    [pytest.param(*e, id=e[0], marks=TORCHSCRIPT if "scripted" in e[0] else ()) for e in BUILD_ERRORS],
)
def test_check_errors_are_one_line(name: str, fragments: tuple[str, ...]) -> None:
    subject = load(broken(name))
    with pytest.raises(UsageError) as exc:
        check_defaults(subject)
    assert_one_line(exc, name, *fragments, kind=UsageError)


def test_probe_raises_usage_errors_too() -> None:
    subject = load(broken("loss_raises"))
    expected = r"loss_raises\.py: loss\(output, inputs\) raised AttributeError"
    with pytest.raises(ModelFileError, match=expected):
        probe(subject.config(), subject)


def test_a_factory_that_rejects_a_knob_value_names_it() -> None:
    subject = load(broken("factory_raises"))
    check_defaults(subject)
    with pytest.raises(UsageError) as exc:
        subject.build(subject.config(width=3))
    assert_one_line(exc, "factory_raises", "build(width=3) raised ValueError: width must be even, got 3")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as exc:
        load(str(tmp_path / "nope.py"))
    assert_one_line(exc, "nope.py", "no such file", "e.g.")


def test_not_a_python_file(tmp_path: Path) -> None:
    path = tmp_path / "model.txt"
    path.write_text("x = 1\n")
    with pytest.raises(UsageError) as exc:
        load(str(path))
    assert_one_line(exc, "model.txt", "not a .py file")


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "model.py"
    path.write_text("import torch\n\ndef build(depth=4:\n    pass\n")
    with pytest.raises(UsageError) as exc:
        load(str(path))
    assert_one_line(exc, "model.py", "model.py:3: syntax error")


def test_a_named_factory_that_does_not_exist() -> None:
    with pytest.raises(UsageError) as exc:
        load(f"{EXAMPLES / 'mlp.py'}:make")
    assert_one_line(exc, "mlp.py", "no top-level `make`", "['SPACE', 'MLP', 'build']")


def test_config_params_must_be_knobs_of_the_file() -> None:
    mlp = example("mlp")
    with pytest.raises(UsageError) as exc:
        mlp.build(Config.of(mlp.name, detph=3))
    assert_one_line(exc, "mlp.py", "'detph'", "knobs are ['depth', 'init_scale', 'width']")
    with pytest.raises(UsageError) as exc:
        mlp.build(Config.of(mlp.name, depth=2.5))
    assert_one_line(exc, "mlp.py", "depth=2.5 is not an int")


@pytest.mark.parametrize("factory", ["pairs", "generator"])
def test_declared_stability_blocks_are_the_blocks_probed(factory: str) -> None:
    """A generator of pairs too: probe_module(blocks=<generator>) took one, the model file's check
    refused it."""
    subject = load(f"{broken('blocks_declared')}:{factory}")
    check_defaults(subject)
    assert probe(subject.config(), subject).layer_names[-2:] == ("a", "b")


@pytest.mark.parametrize(
    ("factory", "says"),
    [
        ("bare", "stability_blocks() item 0 is a Linear, not a (name, module) pair"),
        ("module", "stability_blocks() returned a Linear; it must return a non-empty list of (name, module)"),
        ("empty", "stability_blocks() returned an empty list"),
        ("foreign", "stability_blocks() item 1 ('other') is not a submodule of the model"),
        ("attribute", "stability_blocks is a list, not a method; define it as one"),  # it was passed over
    ],
)
def test_a_stability_blocks_of_the_wrong_shape_says_what_it_must_return(factory: str, says: str) -> None:
    """It read 'running the model raised TypeError: cannot unpack non-iterable Linear object; check
    that batch() or example_input matches': the hook is named, and the shape it must have."""
    subject = load(f"{broken('blocks_declared')}:{factory}")
    with pytest.raises(UsageError) as exc:
        check_defaults(subject)
    assert_one_line(exc, "blocks_declared", says, "e.g. `return [(", kind=UsageError)
    assert "running the model" not in str(exc.value)


def test_a_module_declared_twice_is_said_of_stability_blocks() -> None:
    """Said as 'probe_module: blocks ...' to a user of the command line, who called no probe_module."""
    subject = load(f"{broken('blocks_declared')}:twice")
    with pytest.raises(UsageError) as exc:
        check_defaults(subject)
    assert_one_line(
        exc, "blocks_declared", "stability_blocks(): blocks 'a' and 'b' are the same module", kind=UsageError
    )
    assert "probe_module" not in str(exc.value)


def test_a_loss_of_the_wrong_dtype_is_said_so() -> None:
    """A 0-d int64 or complex loss read 'the loss must be a scalar float tensor, got ()': a scalar."""
    from stabilitycheck.losses import differentiable_loss

    for loss, says in ((torch.tensor(3), "dtype int64 and shape ()"), (torch.tensor(1j), "dtype complex64")):
        with pytest.raises(UsageError, match=re.escape(f"got a tensor of {says}")):
            differentiable_loss(loss)


def test_an_error_in_the_models_own_forward_names_its_line_and_blames_no_input() -> None:
    subject = load(f"{broken('blocks_declared')}:view")
    with pytest.raises(UsageError) as exc:
        check_defaults(subject)
    line = next(
        i for i, t in enumerate(Path(broken("blocks_declared")).read_text().splitlines(), 1) if ".view(" in t
    )
    assert_one_line(
        exc, "blocks_declared", f"blocks_declared.py:{line} in forward", "may not", kind=UsageError
    )
    assert "check that batch()" not in str(exc.value)


def test_a_file_loaded_under_another_path_keeps_the_path_as_typed() -> None:
    """Oracle: the spelling given. A file loaded first by its absolute path, then by a relative one,
    was labelled with the absolute path (the first spelling) in the row that should show it as typed;
    the module is still imported once."""
    from stabilitycheck.subjects import resolve

    relative = "examples/fixed_model.py"
    absolute = str(Path(relative).resolve())
    first, second = resolve(absolute), resolve(relative)
    assert second.space().label == relative and first.space().label == absolute
    assert second.name == first.name and second.module is first.module  # type: ignore[attr-defined]


def test_a_knob_named_like_a_run_setting_is_refused_and_renamed_reaches_the_factory(tmp_path: Path) -> None:
    """A factory's own `steps` (an unroll count) was read by Config.of as the probe's optimiser steps:
    build() always got its default and the probe ran that many SGD steps. Refused at load; renamed, the
    value reaches the factory (the cell is called that many times) and the probe runs no steps."""
    with pytest.raises(ModelFileError):
        load(broken("run_named_knob"))
    source = Path(broken("run_named_knob")).read_text()
    renamed = source.replace(
        "steps: int = 2) -> nn.Module:\n    return Unrolled(steps)",
        "unroll: int = 2) -> nn.Module:\n    return Unrolled(unroll)",
    )
    assert renamed != source
    path = tmp_path / "unrolled.py"
    path.write_text(renamed)
    subject = load(str(path))
    m = probe(subject.config(unroll=5), subject)
    assert m.steps_run == 0 and len(m.loss) == 1
    assert m.activation_names == ("(input)", *(f"cell[{t}]" for t in range(5)))


FIXED_DRAWN = """
import torch
from torch import nn

model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
example_input = torch.randn(4, 8)
"""


def test_a_module_level_model_is_drawn_again_under_each_seed(tmp_path: Path) -> None:
    """Each seed of a verdict is an initialisation: the file run under seed s makes seed s's model and
    input. One copy of the import's model gave every seed the same weights, the 'distribution' of its
    verdict being the loss's readouts alone (found in an audit). Oracle: the file run by runpy under
    stabilitycheck.rng.seed_all(s)."""
    import runpy

    from stabilitycheck.config import Config
    from stabilitycheck.rng import seed_all
    from stabilitycheck.subjects import resolve

    path = tmp_path / "fixed.py"
    path.write_text(FIXED_DRAWN)
    config = Config.of(str(path))
    subject = resolve(config.subject)
    built = [subject.build(config.with_run(seed=s)) for s in (0, 7)]
    for s, b in zip((0, 7), built, strict=True):
        seed_all(s)
        ns = runpy.run_path(str(path))
        assert torch.equal(b.model[0].weight, ns["model"][0].weight)
        assert torch.equal(b.inputs, ns["example_input"])
    assert not torch.equal(built[0].model[0].weight, built[1].model[0].weight)


def test_a_module_level_model_imported_from_a_sibling_module_is_read_at_every_seed(tmp_path: Path) -> None:
    """`from netdef import model, example_input`: the sibling module is imported once, so the file run
    again gives the same nn.Module object at each build, which the tool then changed in place ('Cannot
    copy out of meta tensor' at the second build; a review). Each build copies it. Oracle: the growth
    of two builds at two seeds, each the same model and input (the sibling's own)."""
    from stabilitycheck.config import Config
    from stabilitycheck.configprobe import probe

    (tmp_path / "netdef.py").write_text(
        "import torch\nfrom torch import nn\ntorch.manual_seed(123)\n"
        "model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16, bias=False), nn.Tanh())])\n"
        "example_input = torch.randn(8, 16)\n"
    )
    path = tmp_path / "viasib.py"
    path.write_text("from netdef import model, example_input\n")
    config = Config.of(str(path), init_scale=2.0)  # the weights scaled after the model's own init
    grown = [probe(config.with_run(seed=s)).growth for s in (0, 1, 0)]
    assert all(math.isfinite(g) and g > 0 for g in grown) and grown[0] == grown[2]


def test_a_module_level_model_is_not_run_again_for_a_memory_estimate_on_meta(tmp_path: Path) -> None:
    """The memory estimate builds on the meta device: running the file there printed torch's meta
    warnings and lost module-level `.item()` values (a second review); it takes the import's model.
    Oracle: the file writes a line each time it runs."""
    from stabilitycheck.config import Config
    from stabilitycheck.subjects import resolve

    log = tmp_path / "ran.txt"
    path = tmp_path / "fixed.py"
    path.write_text(
        f"import torch\nfrom torch import nn\nwith open({str(log)!r}, 'a') as f:\n    f.write('ran\\n')\n"
        "model = nn.Sequential(nn.Linear(8, 8), nn.Tanh())\nexample_input = torch.randn(4, 8)\n"
    )
    config = Config.of(str(path))
    subject = resolve(config.subject)
    ran = log.read_text().count("ran")
    with torch.device("meta"):
        subject.source.make_model(subject, {})  # type: ignore[attr-defined]
    assert log.read_text().count("ran") == ran
    subject.build(config)
    assert log.read_text().count("ran") == ran + 1  # a build runs it again, under its seed


def test_a_memory_estimate_runs_the_model_once_and_finds_no_blocks(tmp_path: Path) -> None:
    """The estimate needs the model's outputs on the meta device, not its blocks: finding them ran a
    forward on a copy to look for loops (an embedding, an nn.LSTM and a head are leaf blocks), which on
    meta costs an nn.LSTM ~1 s at 128 steps, at every point of a search (a new user's LSTM language
    model: 29 s, 5 s without). Oracle: the file's forward counts its calls; the estimate equals the rule
    spelt out (parameters x 4, every module output x 2, the model's own too) on its shapes."""
    from stabilitycheck.config import Config
    from stabilitycheck.subjects import resolve

    path = tmp_path / "lm.py"
    path.write_text(
        "import torch\nfrom torch import nn\nCALLS = []\n"
        "class LM(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb, self.out = nn.Embedding(20, 8), nn.Linear(8, 20)\n"
        "        self.lstm = nn.LSTM(8, 8, batch_first=True)\n"
        "    def forward(self, ids):\n"
        "        CALLS.append(ids.device.type)\n"
        "        return self.out(self.lstm(self.emb(ids))[0])\n"
        "def build():\n    return LM()\n"
        "def batch(model, seq_len=12, batch_size=3):\n"
        "    return torch.randint(0, 20, (batch_size, seq_len))\n"
    )
    config = Config.of(str(path))
    subject = resolve(config.subject)
    module = sys.modules[next(k for k, m in sys.modules.items() if getattr(m, "__file__", None) == str(path))]
    module.CALLS.clear()
    need = subject.memory_estimate(config)
    assert module.CALLS == ["meta"]
    b, t, w, v = 3, 12, 8, 20
    params = 20 * 8 + 4 * 8 * (8 + 8) + 2 * 4 * 8 + 8 * 20 + 20
    outputs = b * t * w + (b * t * w + 2 * 1 * b * w) + 2 * b * t * v  # emb; lstm's (y, (h, c)); head, model
    assert need == 4 * (4 * params) + 2 * 4 * outputs


def test_a_model_whose_forward_reads_data_is_estimated_by_its_parameters(tmp_path: Path) -> None:
    """A forward reading tensor data (.item()) cannot run on the meta device, and the estimate was then
    None: no size check at all, the model built at whatever size (hf:t5gemma, 5.6e9 parameters: the
    process was killed, a third-party audit). The parameters' bytes (x 4: weight, gradient, two Adam
    moments) are the lower bound it checks. Oracle: the count by hand."""
    from stabilitycheck.config import Config
    from stabilitycheck.subjects import resolve

    path = tmp_path / "reads.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "class Reads(nn.Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__()\n"
        "        self.layer = nn.Linear(width, width)\n"
        "    def forward(self, x):\n"
        "        return self.layer(x) * float(x.abs().max().item() > 0)\n"
        "def build(width=300):\n    torch.manual_seed(7)\n    return Reads(width)\n"
        "def batch(model, batch_size=2):\n    return torch.randn(batch_size, 300)\n"
    )
    config = Config.of(str(path))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert resolve(config.subject).memory_estimate(config) == 4 * 4 * (300 * 300 + 300)
    assert torch.equal(torch.get_rng_state(), state)  # the factory seeds torch; the caller's state is kept


EMPTY_AT_ZERO = """
from torch import nn
def build(depth=2):
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(depth)])
"""


def test_a_model_built_empty_is_said_to_be_empty(tmp_path: Path) -> None:
    """At depth 0 the model has no layer: the reason read 'its first layer is not nn.Linear or
    nn.Embedding, so the inputs cannot be inferred' (a user's trial, --knob depth=-3:5)."""
    path = tmp_path / "empty.py"
    path.write_text(EMPTY_AT_ZERO)
    subject = load(str(path))
    subject.build(subject.config(depth=1))  # inputs inferred from its first Linear
    with pytest.raises(ModelFileError, match=r"the model it built has no parameters, .*depth at 0 or below"):
        subject.build(subject.config(depth=0))


CONV_FIRST = """
from torch import nn
def build(depth=2):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(4))
"""


def test_inputs_that_cannot_be_inferred_are_asked_for_in_the_first_layers_shape(tmp_path: Path) -> None:
    """A model file whose first layer is a Conv2d and has no batch(): the hint gave a Linear's input,
    torch.randn(batch_size, 16), the wrong shape for it. Oracle: the Conv2d's own in_channels and
    kernel dimensions (channels first, two spatial sizes); a norm first, its own features (a review:
    a BatchNorm2d first was given the Linear's hint)."""
    path = tmp_path / "conv.py"
    path.write_text(CONV_FIRST)
    subject = load(str(path))
    hint = r"first layer \(Conv2d\) is not nn.Linear.*return torch.randn\(batch_size, 3, 32, 32\)`"
    with pytest.raises(ModelFileError, match=hint):
        subject.build(subject.config())
    for first, shape in (("nn.LazyConv2d(8, 3)", "3, 32, 32"), ("nn.Conv1d(4, 8, 64)", "4, 64")):
        path.write_text(CONV_FIRST.replace("nn.Conv2d(3, 8, 3)", first))
        subject = load(str(path))
        with pytest.raises(ModelFileError, match=rf"return torch.randn\(batch_size, {shape}\)`"):
            subject.build(subject.config())  # a lazy conv's 0 channels, a kernel longer than 32
    norms = (
        ("nn.BatchNorm2d(3)", "3, 32, 32"),
        ("nn.LazyBatchNorm2d()", "3, 32, 32"),
        ("nn.BatchNorm1d(5)", "5"),
        ("nn.LayerNorm([4, 6])", "4, 6"),
        ("nn.GroupNorm(2, 6)", "6, 32, 32"),
    )
    for first, shape in norms:  # a norm first: its features (and the spatial sizes of its kind)
        path.write_text(CONV_FIRST.replace("nn.Conv2d(3, 8, 3)", first))
        subject = load(str(path))
        with pytest.raises(ModelFileError, match=rf"return torch.randn\(batch_size, {shape}\)`"):
            subject.build(subject.config())
