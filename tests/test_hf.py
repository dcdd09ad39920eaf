"""The Hugging Face subject: knobs from a transformers config class, blocks, loss, memory, growth."""

from __future__ import annotations

import math
import os

import pytest
import torch

from stabilitycheck.cli import main
from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.errors import UsageError
from stabilitycheck.hf import HFModel
from stabilitycheck.losses import NUM_CLASSES, call_model
from stabilitycheck.probing import probe_module
from stabilitycheck.subject import Built
from stabilitycheck.subjects import resolve

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing below may reach the hub
transformers = pytest.importorskip("transformers")


def built(model_type: str, **values: float) -> Built:
    subject = HFModel(model_type)
    return subject.build(subject.config(**values))


def test_gpt2_knobs_are_its_config_numbers_at_small_sizes() -> None:
    subject = resolve("hf:gpt2")
    assert isinstance(subject, HFModel) and subject.name == "hf:gpt2"
    knobs = subject.knobs
    defaults = transformers.GPT2Config()
    for name in ("n_layer", "n_embd", "n_head", "vocab_size", "initializer_range", "layer_norm_epsilon"):
        assert name in knobs
    assert (knobs["n_layer"], knobs["n_embd"], knobs["n_head"], knobs["vocab_size"]) == (2, 64, 2, 256)
    assert (knobs["batch_size"], knobs["seq_len"]) == (4, 16)
    assert knobs["n_positions"] == defaults.n_positions  # not in the small table: the class default
    assert knobs["resid_pdrop"] == 0.0  # dropout off by default
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in knobs.values())
    assert not [k for k in knobs if k.endswith("_token_id")]
    assert subject.init_knob == "initializer_range"
    assert subject.critical_init(subject.config()) == defaults.initializer_range == 0.02
    assert subject.config(n_layer=5).knob("n_layer") == 5
    assert subject.variants(subject.config()) == {} and subject.last_step(subject.config()) is None


def test_t5_init_knob_is_its_factor() -> None:
    subject = HFModel("t5")
    assert subject.init_knob == "initializer_factor"
    assert subject.critical_init(subject.config()) == transformers.T5Config().initializer_factor == 1.0
    axes = {a.name: list(a.values) for a in subject.space().axes}
    assert axes["num_layers"] == list(range(1, 25))
    assert axes["initializer_factor"] == [float(k) for k in range(1, 51)]


def test_gpt2_space_is_layers_then_initializer_range() -> None:
    space = HFModel("gpt2").space()
    assert [a.name for a in space.axes] == ["n_layer", "initializer_range"]
    assert list(space.axes[0].values) == list(range(1, 25))
    assert list(space.axes[1].values) == [round(0.02 * k, 12) for k in range(1, 51)]
    assert space.config(space.top()).values["initializer_range"] == 1.0


BLOCKS = {
    "gpt2": ["transformer.h.{i}"],
    "llama": ["model.layers.{i}"],
    "bert": ["bert.encoder.layer.{i}"],
    "t5": ["encoder.block.{i}", "decoder.block.{i}"],
}
LAYERS = {"gpt2": "n_layer", "llama": "num_hidden_layers", "bert": "num_hidden_layers", "t5": "num_layers"}


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("model_type", sorted(BLOCKS))
def test_blocks_are_the_layer_stacks(model_type: str, layers: int) -> None:
    b = built(model_type, **{LAYERS[model_type]: layers})
    want = [p.format(i=i) for p in BLOCKS[model_type] for i in range(layers)]
    assert [name for name, _ in b.blocks] == want
    modules = dict(b.model.named_modules())
    assert all(modules[name] is module for name, module in b.blocks)


def test_t5_gets_decoder_inputs_and_probes() -> None:
    b = built("t5", num_layers=1)
    assert sorted(b.inputs) == ["decoder_input_ids", "input_ids"]
    m = probe_module(b.model, b.inputs, b.loss_fn, blocks=b.blocks)
    assert m.layer_names == ("encoder.block.0", "decoder.block.0")
    assert math.isfinite(m.loss[0]) and m.first_nonfinite is None


def test_probe_gpt2_uses_the_default_loss_on_logits() -> None:
    """The default loss is cross-entropy of a fixed random readout of the logits (NUM_CLASSES classes)
    against labels drawn independently of them: ~ln(NUM_CLASSES) at initializer_range 0.02, where the
    logits, and so the readout's, are near 0. The model's own LM loss (labels = the input ids) is
    ~ln(vocab), so the check can fail: a default that took the model's loss, or cross-entropy on the
    logits themselves, is out of the bound."""
    subject = HFModel("gpt2")
    ln_c, ln_v = math.log(NUM_CLASSES), math.log(subject.knobs["vocab_size"])
    for seed in range(3):
        b = subject.build(subject.config(seed=seed))
        assert set(b.inputs) == {"input_ids"}
        m = probe_module(b.model, b.inputs, b.loss_fn, blocks=b.blocks)
        assert m.layer_names == ("transformer.h.0", "transformer.h.1")
        assert ln_c - 0.1 < m.loss[0] < ln_c + 0.1, (seed, m.loss[0], ln_c)
        own = b.model(**b.inputs, labels=b.inputs["input_ids"]).loss  # the model's own LM loss
        assert abs(own.item() - ln_v) < 0.3 and abs(own.item() - ln_c) > 1.0


def test_same_seed_same_model_and_inputs() -> None:
    subject = HFModel("llama")
    first, again, other = (subject.build(subject.config(seed=s)) for s in (7, 7, 8))
    for a, b in zip(first.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first.inputs["input_ids"], again.inputs["input_ids"])
    assert not torch.equal(first.inputs["input_ids"], other.inputs["input_ids"])
    p1, p2 = next(iter(first.model.parameters())), next(iter(other.model.parameters()))
    assert not torch.equal(p1, p2)
    probe = [probe_module(b.model, b.inputs, b.loss_fn, blocks=b.blocks).grad_norm for b in (first, again)]
    assert probe[0] == probe[1]


def test_build_honours_run_dtype_and_a_json_round_trip() -> None:
    subject = HFModel("gpt2")
    config = Config.from_json(subject.config(n_layer=1, dtype="float64").to_json())
    b = subject.build(config)
    assert {p.dtype for p in b.model.parameters()} == {torch.float64}
    assert [name for name, _ in b.blocks] == ["transformer.h.0"]


@pytest.mark.parametrize("model_type", ["gpt2", "bert", "t5"])
def test_memory_estimate_grows_and_bounds_the_real_model(model_type: str) -> None:
    """Lower bound (the estimate's own rule, from the real model): 4 x the parameter bytes plus 2 x the
    logits' bytes (the top module's output). It grows with depth and width."""
    subject = HFModel(model_type)
    layers = subject.layers_knob
    width = {"gpt2": "n_embd", "bert": "hidden_size", "t5": "d_model"}[model_type]
    assert layers is not None
    estimate = {}
    for n, w in [(2, 64), (4, 64), (2, 128)]:
        config = subject.config(**{layers: n, width: w})
        estimate[n, w] = subject.memory_estimate(config)
        b = subject.build(config)
        params = sum(p.numel() * p.element_size() for p in b.model.parameters())
        logits = b.model(**b.inputs).logits
        got = estimate[n, w]
        assert got is not None and got >= 4 * params + 2 * logits.numel() * logits.element_size()
    assert estimate[4, 64] > estimate[2, 64] and estimate[2, 128] > estimate[2, 64]  # type: ignore[operator]


def test_a_model_that_cannot_run_on_meta_is_estimated_by_its_parameters() -> None:
    """hf:t5gemma's sizes are in sub-configs the small defaults do not reach, and its forward reads
    tensor data, so the meta estimate was None: no size check, 5.6e9 parameters built, the process
    killed (a third-party audit). Its parameters' bytes x 4 are checked instead: too large, skipped.
    Oracle: transformers' own model built on the meta device, its parameters counted."""
    if "t5gemma" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no t5gemma")
    subject = HFModel("t5gemma")
    config = subject.config()
    with torch.device("meta"):
        model = subject.auto.from_config(subject.hf_config(subject.values(config)))
    assert subject.memory_estimate(config) == 4 * sum(
        p.numel() * p.element_size() for p in model.parameters()
    )


def test_a_shared_layer_knob_is_kept_where_the_forward_cannot_run_on_meta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ALBERT shares one layer's weights across its layers: 1 and 2 layers count the same parameters,
    and whether the layer knob moves the model is read on the meta forward's memory; where that forward
    cannot run, that cannot be told, and the knob is kept. The parameters-alone estimate (equal at 1
    and 2) read as 'it does not move' and dropped it (a review). Oracle: the forward made to fail."""
    from stabilitycheck import hf

    def fails(*_: object, **__: object) -> None:
        raise RuntimeError("reads tensor data")

    monkeypatch.setattr(hf, "_call", fails)
    subject = HFModel("albert")
    assert subject._moves("num_hidden_layers")


def test_unknown_model_type_says_did_you_mean() -> None:
    with pytest.raises(UsageError) as err:
        resolve("hf:gtp2")
    message = str(err.value)
    assert "\n" not in message and "hf:gtp2 is not a transformers model type" in message
    assert "did you mean 'hf:gpt2'" in message


def test_non_text_model_type_is_refused_naming_its_text_part_where_it_has_one() -> None:
    """A type with no vocab_size is refused for what it lacks, not called no text model: a translation
    model (fsmt: two vocabularies) was told it is not a text model (found in an audit)."""
    with pytest.raises(UsageError, match=r"no vocab_size.*pick a text model type, e\.g\. hf:gpt2, or probe"):
        HFModel("vit")
    with pytest.raises(UsageError, match=r"no vocab_size.*pick hf:clip_text_model, its text part, or probe"):
        HFModel("clip")
    with pytest.raises(UsageError, match=r"^hf:fsmt has no vocab_size in its config") as err:
        HFModel("fsmt")
    assert "not a text model" not in str(err.value)
    assert HFModel("clip_text_model").model_type == "clip_text_model"  # what it names is a text model
    # a token model whose config class leaves vocab_size None is told so, not that it has none (an audit)
    with pytest.raises(UsageError, match=r"^hf:esm leaves vocab_size unset \(None\) in its config"):
        HFModel("esm")


def test_bad_knob_values_are_one_line_usage_errors() -> None:
    subject = HFModel("gpt2")
    with pytest.raises(UsageError, match=r"n_layer=2\.5 is not an int"):
        subject.build(Config("hf:gpt2", (("n_layer", 2.5),)))
    with pytest.raises(UsageError, match="has no knob 'depth'"):
        subject.build(Config("hf:gpt2", (("depth", 2),)))
    with pytest.raises(UsageError, match="seq_len=2000 exceeds the model's 1024 positions"):
        subject.build(subject.config(seq_len=2000))
    with pytest.raises(UsageError) as err:
        subject.build(subject.config(n_embd=65))  # 65 is not divisible by 2 heads
    assert "\n" not in str(err.value) and "cannot be built from these knobs" in str(err.value)


@pytest.mark.parametrize("knob", ["seq_len=-3", "batch_size=-1", "vocab_size=0", "seq_len=0"])
def test_input_sizes_below_1_are_one_line_usage_errors_of_the_command(
    knob: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """seq_len=-3 and batch_size=-1 made torch raise on a tensor of negative size, vocab_size=0 a
    ZeroDivisionError wrapping token ids: 'internal error', exit 3 (found by an audit); 0 tokens
    failed in the model's own reshape."""
    code = main(["hf:gpt2", "--knob", knob, "--quiet", "--max-examples", "2", "--database", "none"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"knob {knob} must be >= 1" in err


@pytest.mark.slow
def test_gpt2_grows_more_at_a_larger_initializer_range() -> None:
    """Growth (input-side over output-side gradient norm) across 4 blocks, 4 seeds each: every seed at
    initializer_range 0.5 grows more than any seed at the designed 0.02."""
    subject = HFModel("gpt2")

    def growth(init: float) -> list[float]:
        out = []
        for seed in range(4):
            b = subject.build(subject.config(n_layer=4, initializer_range=init, seed=seed))
            out.append(probe_module(b.model, b.inputs, b.loss_fn, blocks=b.blocks).growth)
        return out

    small, large = growth(0.02), growth(0.5)
    assert min(large) > 2 * max(small), (small, large)


def test_a_model_type_whose_forward_takes_no_token_ids_is_refused_in_one_line() -> None:
    """beit (pixel_values) and hubert (input_values) have a vocab_size in their config but take no
    input_ids: they failed with 'missing pixel_values' and advice about batch()."""
    for model_type, takes in (("beit", "pixel_values"), ("hubert", "input_values")):
        subject = resolve(f"hf:{model_type}")
        with pytest.raises(UsageError, match=f"not a text model: .* takes {takes}"):
            subject.build(subject.config())


def test_special_token_ids_past_the_small_vocab_are_wrapped_into_it() -> None:
    """whisper's decoder_start_token_id (50257) is past the 256-token vocab: set to None it failed
    ('expected int, got NoneType'); wrapped into the vocab, the model builds and probes."""
    subject = resolve("hf:whisper")
    m = probe(subject.config(seeds=1), subject)
    assert math.isfinite(m.growth) and m.first_nonfinite is None


def test_the_layers_knob_is_one_that_changes_the_model() -> None:
    """Oracle: the parameter count of the model built (on the CPU, as probed). Whisper's text model is
    its decoder alone (WhisperForCausalLM): encoder_layers, its config's first layer field, built the
    same model at any value, and a search over it claimed a 1-minimal point on a knob that does
    nothing; decoder_layers changes it."""
    whisper = HFModel("whisper")

    def count(**values: float) -> int:
        return sum(p.numel() for p in whisper.build(whisper.config(**values)).model.parameters())

    assert count(encoder_layers=1) == count(encoder_layers=3)
    assert count(decoder_layers=1) != count(decoder_layers=3)
    assert whisper.space().axes[0].name == "decoder_layers"
    assert HFModel("gpt2").space().axes[0].name == "n_layer"


def test_a_layer_count_over_shared_weights_is_searched() -> None:
    """ALBERT shares one layer's weights across its layers: the parameter count is the same at any
    depth, so its default search had no layer axis, though the layers run. Oracle: the block calls
    the probe records at 2 and 4 layers."""
    albert = HFModel("albert")
    assert albert.space().axes[0].name == "num_hidden_layers"
    calls = [len(probe(albert.config(num_hidden_layers=n)).activation_names) for n in (2, 4)]
    assert calls[1] - calls[0] == 2


@pytest.mark.parametrize(("model_type", "knob"), [("gptj", "n_layer"), ("gpt_neo", "num_layers")])
def test_model_types_with_derived_fields_build_at_any_depth(model_type: str, knob: str) -> None:
    """GPT-J's rotary dimensions (64 by default) must fit its head (32 at SMALL sizes); GPT-Neo's
    attention pattern must have num_layers entries (its default is for 24). Both failed at every
    point of the default space. Oracle: the probe's growth is finite at 1, 2 and 3 layers."""
    subject = HFModel(model_type)
    for layers in (1, 2, 3):
        assert math.isfinite(probe(subject.config(**{knob: layers})).growth)


def test_knobs_a_model_type_rejects_at_some_points_are_skipped_there() -> None:
    """A search over n_head in {2, 3}: width 64 is not divisible by 3 heads, so that point cannot be
    built. It is skipped with the reason, as a model file raising at a point is; it aborted the search."""
    from stabilitycheck.searching import search
    from stabilitycheck.space import Axis, Space
    from stabilitycheck.verdicts import Limits

    subject = HFModel("gpt2")
    space = Space("hf:gpt2", subject.config(n_layer=1).with_run(seeds=1), (Axis("n_head", (2, 3)),))
    result = search(space, subject=subject, limits=Limits(growth=1e9), max_examples=5, database=None)
    assert [c.values["n_head"] for c, _ in result.skipped] == [3]
    assert "cannot be built from these knobs" in result.skipped[0][1]


def test_zero_layers_are_refused_in_one_line_and_skipped_by_a_search() -> None:
    """hf:gpt2 at n_layer=0 has no stack, so its blocks fell back to its leaf modules, of which wte and
    wpe run side by side: the chain read wpe's gradient as following wte's and reported growth 4.07 for
    a model with no layers. Zero layers are now refused, and skipped in a search over the layer count."""
    from stabilitycheck.searching import search
    from stabilitycheck.space import Axis, Space
    from stabilitycheck.verdicts import Limits

    subject = HFModel("gpt2")
    with pytest.raises(UsageError, match="n_layer=0 builds no layers") as caught:
        subject.build(subject.config(n_layer=0))
    assert "\n" not in str(caught.value)
    space = Space("hf:gpt2", subject.config().with_run(seeds=1), (Axis.range("n_layer", 0, 2),))
    result = search(space, subject=subject, limits=Limits(growth=1e9), max_examples=5, database=None)
    assert [c.values["n_layer"] for c, _ in result.skipped] == [0]
    bart = HFModel("bart")  # one stack of two empty still has layers to measure
    assert len(bart.build(bart.config(encoder_layers=0, decoder_layers=1)).blocks) >= 1
    with pytest.raises(UsageError, match="decoder_layers=0 builds no decoder layers"):
        bart.build(bart.config(decoder_layers=0))  # its encoder's output reached no loss: growth read 1
    whisper = HFModel("whisper")  # its text model runs the decoder alone: encoder_layers=2 is not its
    with pytest.raises(UsageError, match="decoder_layers=0 builds no"):
        whisper.build(whisper.config(decoder_layers=0))


def test_the_init_knob_is_the_field_the_init_reads() -> None:
    """clip_text_model has initializer_range and initializer_factor; its init reads the factor, so the
    default search over the range changed no weight and reported 'stable' (found by a trial). Oracle:
    the weights drawn at one seed, the field at its default and twice it."""

    def weights(subject: HFModel, **values: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        return [p.detach() for p in subject.build(subject.config(**values)).model.parameters()]

    clip = HFModel("clip_text_model")
    assert clip.init_knob == "initializer_factor"
    base = weights(clip)
    assert all(torch.equal(a, b) for a, b in zip(base, weights(clip, initializer_range=0.04), strict=True))
    assert not all(
        torch.equal(a, b) for a, b in zip(base, weights(clip, initializer_factor=2.0), strict=True)
    )
    assert HFModel("gpt2").init_knob == "initializer_range"  # one field: taken as it is


def test_experts_and_the_other_stack_are_small_by_default() -> None:
    """The README promises small defaults: qwen3_next kept its 512 experts (103M parameters), xlm its
    emb_dim 2048, switch_transformers 12 decoder layers, and prophetnet's layer counts were neither
    small nor searched (found by a trial); xlnet, funnel and ctrl kept their feed-forward widths
    (d_inner 4096 and 3072, dff 8192: 1.1M, 6.2M and 2.2M parameters, found by a review)."""
    for model_type, most in (
        ("qwen3_next", 5e6),
        ("olmoe", 1e6),
        ("xlm", 1e6),
        ("switch_transformers", 1e6),
        ("xlnet", 2e5),
        ("funnel", 1e6),
        ("ctrl", 2e5),
    ):
        model = built(model_type).model
        assert sum(p.numel() for p in model.parameters()) < most, model_type
    assert len(built("switch_transformers").blocks) == 4  # 2 encoder and 2 decoder layers
    for model_type in ("zaya", "axk1", "llama4_text"):  # top-1 routing and groups of experts kept valid
        subject = HFModel(model_type)
        default = transformers.AutoConfig.for_model(model_type)
        assert subject.knobs["num_experts_per_tok"] <= default.num_experts_per_tok
        assert built(model_type).blocks
    prophetnet = HFModel("prophetnet")
    assert prophetnet.layers_knob == "num_encoder_layers"
    assert prophetnet.space().axes[0].name == "num_encoder_layers"


def test_a_model_type_no_knob_can_build_and_one_whose_constraints_the_defaults_miss_say_so() -> None:
    """kosmos_2_text_model has no AutoModel class, nor one named after its config class: 'cannot be
    built from these knobs' sent users looking for a knob; zamba's layer types must number its
    layers, which the small defaults miss: the error named values the user never set (found by a
    trial). Both stay one line."""
    with pytest.raises(UsageError, match="has no model class for Kosmos2TextConfig") as caught:
        built("kosmos_2_text_model")
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match=r"small defaults .* may not fit this model type") as caught:
        built("zamba")
    assert "\n" not in str(caught.value)


def test_mamba2_builds_at_its_own_small_defaults() -> None:
    """Mamba2's num_heads are its state-space heads, which must fill hidden_size x expand with heads
    of head_dim, in groups dividing them: SMALL's 2 attention heads and its config's 8 groups built
    no default point (found by an audit). Oracle: transformers' own check, passed, and the mixer's
    sizes read off the built model."""
    model = built("mamba2").model
    mixer = model.backbone.layers[0].mixer
    assert (mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size) == (4, 32, 1, 16)
    assert mixer.num_heads * mixer.head_dim == model.config.expand * model.config.hidden_size


def test_a_mixture_of_experts_type_probes_in_float64_as_in_float32() -> None:
    """transformers' grouped_mm experts take no float64: hf:mixtral (and qwen2_moe, olmoe, jamba)
    raised at every float64 point (found by an audit). Built with the eager experts loop there, the
    same weights give the same growth. Oracle: the float32 probe of the same seed, whose float32
    rounding bounds the difference."""
    if not hasattr(transformers.PretrainedConfig(), "_experts_implementation"):
        pytest.skip("this transformers has one experts implementation")
    wide, narrow = (probe(Config.of("hf:mixtral", dtype=d)) for d in ("float64", "float32"))
    assert wide.activation_grad_norms == pytest.approx(narrow.activation_grad_norms, rel=1e-5)
    assert wide.growth == pytest.approx(narrow.growth, rel=1e-5)


@pytest.mark.parametrize("model_type", ["recurrent_gemma", "olmoe"])
def test_random_token_ids_leave_out_the_pad_tokens(model_type: str) -> None:
    """A pad is no token: its embedding row is zero, and a pre-norm block 0 normalising it has gain
    1/sqrt(eps). Drawn among the ids, it read growth 40-4e4 on the seeds whose ids held one, and at
    seq_len 256, where one is near certain, every seed exploded (found in an audit). Oracle: the ids
    drawn hold every id of the vocab but the model's pad ids (its config's and its embedding's
    padding_idx), and the growth is flat on every seed, as that of pad-free ids."""
    subject = HFModel(model_type)
    built = subject.build(subject.config())
    config = getattr(built.model, "config", None)
    pads = {getattr(config, "pad_token_id", None), built.model.get_input_embeddings().padding_idx}
    pads.discard(None)
    values = subject.values(subject.config(batch_size=64, seq_len=64))
    ids = subject.inputs(built.model, values, 0, torch.device("cpu"))["input_ids"]
    assert pads and set(ids.unique().tolist()) == set(range(int(values["vocab_size"]))) - pads
    growths = [probe(subject.config(seed=s), subject).growth for s in range(6)]
    assert all(0.5 < g < 2.0 for g in growths), growths


@pytest.mark.parametrize(
    ("model_type", "values", "sparse"),
    [
        ("switch_transformers", {"num_layers": 1, "num_decoder_layers": 1}, 2),
        ("switch_transformers", {"num_layers": 1}, 3),
        ("deepseek_v3", {}, 2),
        ("deepseek_v3", {"num_hidden_layers": 1}, 1),
        ("deepseek_v2", {}, 2),
    ],
)
def test_a_mixture_of_experts_type_has_experts_in_every_layer_at_any_depth(
    model_type: str, values: dict[str, float], sparse: int
) -> None:
    """deepseek_v3 keeps its config's first 3 layers dense: up to 3 layers, no expert at all; and
    switch_transformers' 2 sparse layers of 1 made a step of 1 // 2 = 0, a dense T5 where a search's
    smallest point lands (found by an audit). Oracle: transformers' own modules, an expert list (or
    sparse MLP) in every layer."""
    model = built(model_type, **values).model
    kinds = ("SwitchTransformersSparseMLP", "DeepseekV3MoE", "DeepseekV2Moe", "DeepseekV2MoE")
    found = [n for n, m in model.named_modules() if type(m).__name__ in kinds]
    assert len(found) == sparse, found


def test_switch_transformers_has_its_experts_at_the_small_defaults() -> None:
    """Its 3 sparse layers of the 2 made a sparse step of 2 // 3 = 0: no experts, a dense T5 whose
    numbers were hf:t5's to 7 digits (found in an audit). Oracle: transformers' own modules, a sparse
    MLP in every layer of both stacks."""
    subject = HFModel("switch_transformers")
    model = subject.build(subject.config()).model
    sparse = [n for n, m in model.named_modules() if type(m).__name__ == "SwitchTransformersSparseMLP"]
    assert len(sparse) == 4, sparse


def test_a_vocab_of_pad_ids_alone_draws_them() -> None:
    """vocab_size 1 with bert's pad id 0: no other id to draw; the pad is drawn, not an empty range
    (an internal error in review)."""
    subject = HFModel("bert")
    built = subject.build(subject.config(vocab_size=1))
    assert built.inputs["input_ids"].unique().tolist() == [0]


def test_wav2vec2_in_training_is_probed() -> None:
    """wav2vec2's feature encoder sets requires_grad on its raw input in training, which the probe's
    copy of the input (in a graph: not a leaf) made raise; the step runs on the input as given.
    Oracle: torch's gradients of each encoder layer's hidden states."""
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_feat_extract_layers=2,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(config).train()
    inputs = {"input_values": torch.randn(2, 400)}
    z = torch.randn(2, 39, 32)
    loss = lambda out, _: (out.last_hidden_state * z).sum()  # noqa: E731
    m = probe_module(model, inputs, loss)
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for layer in model.encoder.layers
    ]
    grads = torch.autograd.grad(loss(model(**inputs), inputs), outs)
    for hook in hooks:
        hook.remove()
    assert m.activation_names == ("(input)", "encoder.layers.0", "encoder.layers.1")
    assert m.activation_grad_norms[1:] == pytest.approx([g.norm().item() for g in grads], rel=1e-5)


def test_clip_towers_are_read_in_the_order_its_forward_runs_them() -> None:
    """CLIP declares its text tower first and runs its vision tower first: the found blocks are taken
    in call order, so the vision tower's input is read (`(input)`), and the numbers are those of the
    same blocks listed in that order (at 3x weights the growth read about 2 for about 10 before)."""
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 16,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(3, 64, (2, 8), generator=gen),
        "pixel_values": torch.randn(2, 3, 16, 16, generator=gen),
    }
    z = torch.randn(2, 2, generator=gen)
    loss = lambda out, _: (out.logits_per_image * z).sum()  # noqa: E731
    found = probe_module(model, inputs, loss)
    ordered = probe_module(
        model,
        inputs,
        loss,
        blocks=[
            (f"{tower}_model.encoder.layers.{i}", b)
            for tower in ("vision", "text")
            for i, b in enumerate(getattr(model, f"{tower}_model").encoder.layers)
        ],
    )
    assert found.activation_names == ordered.activation_names
    assert found.activation_names[:2] == ("(input)", "vision_model.encoder.layers.0")
    assert found.activation_grad_norms == pytest.approx(ordered.activation_grad_norms, rel=1e-6)
    assert found.growth == pytest.approx(ordered.growth, rel=1e-6)


@pytest.mark.parametrize("model_type", ["siglip_text_model", "align_text_model", "xclip_text_model"])
def test_a_text_tower_automodel_has_no_class_for_is_built_from_its_own_class(model_type: str) -> None:
    """hf:siglip's refusal points to hf:siglip_text_model, its text tower, which transformers'
    AutoModel has no class for: it was refused in turn. It is built from the model class named after
    its config class (SiglipTextConfig: SiglipTextModel). Oracle: torch's gradients of each layer's
    output under the same loss, on the same model and token ids."""
    b = built(model_type, num_hidden_layers=3)
    named = type(b.model.config).__name__.removesuffix("Config") + "Model"
    assert type(b.model) is getattr(transformers, named)
    assert len(b.blocks) == 3
    _agrees_with_torch(b)


def _agrees_with_torch(b: Built) -> None:
    """The probe's per-block output-gradient norms on `b` equal torch.autograd.grad's under its loss."""
    m = probe_module(b.model, b.inputs, b.loss_fn, blocks=b.blocks)
    outs: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for _, module in b.blocks
    ]
    grads = torch.autograd.grad(b.loss_fn(call_model(b.model, b.inputs), b.inputs), outs)
    for hook in hooks:
        hook.remove()
    assert m.layer_names == tuple(name for name, _ in b.blocks)
    assert m.activation_grad_norms[1:] == pytest.approx([g.norm().item() for g in grads], rel=1e-5)


@pytest.mark.parametrize(
    ("model_type", "small"),
    [
        ("perceiver", {"d_latents": 64, "num_latents": 16}),
        ("luke", {"entity_vocab_size": 256}),
        ("bamba", {"mamba_n_heads": 16, "mamba_d_state": 16, "mamba_chunk_size": 16}),
    ],
)
def test_latents_entities_and_mamba_mixers_are_small_by_default(
    model_type: str, small: dict[str, int]
) -> None:
    """perceiver's 256 latents of width 1280 and luke's 500,000 entities were built at full size
    (260M and 129M parameters, 20 s and 6 GB a probe), bamba's Mamba mixers at 128 heads with a state
    and chunks of 256 (2.8 GB at 2 layers). Built at the small defaults, and measured right there.
    Oracle: the fields as built, a parameter count, torch's gradients."""
    b = built(model_type)
    assert {k: getattr(b.model.config, k) for k in small} == small
    assert sum(p.numel() for p in b.model.parameters()) < 2_000_000
    _agrees_with_torch(b)


def test_an_hf_sequence_as_long_as_the_models_positions_is_valid() -> None:
    """seq_len may equal the model's position count (positions 0 .. n-1 are n tokens); one past it is
    a UserCodeError naming the limit."""
    pytest.importorskip("transformers")
    from stabilitycheck.errors import UserCodeError
    from stabilitycheck.hf import HFModel

    model = HFModel("gpt2")
    values = model.values(model.config(n_positions=16, seq_len=16))
    assert model.hf_config(values).n_positions == 16
    with pytest.raises(UserCodeError, match="seq_len=17 exceeds the model's 16 positions"):
        model.hf_config({**values, "seq_len": 17})


@pytest.mark.parametrize(
    ("model_type", "field", "value"),
    [
        ("ministral", "head_dim", 32),
        ("hunyuan_v1_dense", "head_dim", 32),
        ("nemotron", "num_key_value_heads", 2),
        ("deepseek_v2", "num_experts_per_tok", 2),
    ],
)
def test_a_field_the_config_leaves_unset_is_derived_as_its_model_would(
    model_type: str, field: str, value: int
) -> None:
    """ministral's and hunyuan's head_dim, nemotron's num_key_value_heads and deepseek_v2's
    num_experts_per_tok default to None, which their models read as numbers: none of them built
    (head_dim ** -0.5 on None, topk(k=None)). Each is set to what a model deriving it takes (width 64
    / 2 heads, the 2 heads, 2 experts a token). Oracle: torch's gradients on the model built."""
    b = built(model_type)
    assert getattr(b.model.config, field) == value
    _agrees_with_torch(b)


def test_a_model_deriving_the_unset_field_itself_is_built_as_before() -> None:
    """mixtral leaves head_dim None and derives it as width / heads: the field set changes nothing.
    Oracle: its own rule, 2 heads of 64 / 2 in the query projection, and the growth of a model built
    from a config with head_dim None again (the same seed: the same weights)."""
    b = built("mixtral")
    assert b.model.model.layers[0].self_attn.q_proj.weight.shape == (2 * (64 // 2), 64)
    config = b.model.config
    torch.manual_seed(0)
    own = type(b.model)(type(config)(**{**config.to_dict(), "head_dim": None}))
    torch.manual_seed(0)
    ours = type(b.model)(config)
    assert all(torch.equal(a, c) for a, c in zip(own.parameters(), ours.parameters(), strict=True))
