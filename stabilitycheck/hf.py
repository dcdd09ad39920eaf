"""A Hugging Face `transformers` model type as a Subject: `hf:gpt2`, `hf:llama`, `hf:bert`, `hf:t5`...

The model is built at random init from its config class, offline (no hub, no tokenizer: its inputs
are random token ids), with the config's int/float fields as knobs, at SMALL sizes for a CPU probe,
plus `batch_size` and `seq_len`. The loss is the default one on the logits, never the model's own LM
loss. `transformers` is the optional extra `hf`, imported only when an HF subject is asked for.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import torch
from torch import nn

from stabilitycheck._validation import describe, knob_refusal, knob_value
from stabilitycheck.blocks import LEAVES_NOTE, find_blocks
from stabilitycheck.config import RUN_FIELDS, Config
from stabilitycheck.errors import UsageError, UserCodeError, did_you_mean
from stabilitycheck.families import Knob, Scalar
from stabilitycheck.losses import DefaultLoss, OutputLoss
from stabilitycheck.memory import meta_bytes, parameter_bytes
from stabilitycheck.rng import SALT_BATCH, SALT_LOSS, derived
from stabilitycheck.space import Axis, Space
from stabilitycheck.subject import Built, torch_dtype
from stabilitycheck.tokens import token_ids

SMALL: dict[str, Knob] = {
    **dict.fromkeys(("n_layer", "num_hidden_layers", "num_layers", "n_layers"), 2),
    **dict.fromkeys(("encoder_layers", "decoder_layers", "num_encoder_layers", "num_decoder_layers"), 2),
    **dict.fromkeys(("n_embd", "hidden_size", "d_model", "dim", "emb_dim"), 64),
    **dict.fromkeys(("n_head", "num_attention_heads", "num_heads", "n_heads"), 2),
    **dict.fromkeys(("encoder_attention_heads", "decoder_attention_heads", "num_key_value_heads"), 2),
    **dict.fromkeys(("intermediate_size", "d_ff", "hidden_dim", "ffn_dim", "d_inner", "dff"), 128),
    **dict.fromkeys(("encoder_ffn_dim", "decoder_ffn_dim"), 128),
    "word_embed_proj_dim": 64,
    **dict.fromkeys(("d_kv", "head_dim"), 32),
    "rotary_dim": 16,
    "vocab_size": 256,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    "num_experts_per_tok": 2,
    **dict.fromkeys(("n_group", "topk_group"), 1),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size"), 128),
    **dict.fromkeys(("num_sparse_encoder_layers", "num_sparse_decoder_layers"), 2),
    "d_latents": 64,
    "num_latents": 16,
    "entity_vocab_size": 256,
    **dict.fromkeys(("mamba_n_heads", "mamba_d_state", "mamba_chunk_size"), 16),
    "first_k_dense_replace": 0,
}
"""Defaults that replace the config class's own, by field name: 2 layers, width 64, 2 heads of 32
(rotary embeddings on 16 of their dimensions: GPT-J's default 64 is wider than the head), feed-forward
128 (xlnet's and funnel's d_inner, ctrl's dff too), 256 tokens, at most 4 experts of which 2 per
token, in 1 group (qwen3_next's 512 made 103M parameters), every layer with experts
(switch_transformers' 3 sparse layers of 2 made a step of 2 // 3 = 0: a dense T5, no experts; and
deepseek_v3's first 3 layers dense made every model of up to 3 layers a dense one);
16 latents of width 64 and 256 entities (perceiver's 256 latents of 1280 and luke's 500,000 entities
made 260M and 129M parameters: 20 s and 6 GB a probe), Mamba mixers of 16 heads, a state of 16 and
chunks of 16 (bamba's, falcon_h1's and granitemoehybrid's 128 heads, state and chunks of 256: bamba
took 2.8 GB at 2 layers).
Dropout fields default to 0.0 (the probe measures the network, not a mask). Every other int/float
field keeps its config class's default."""
AT_MOST = (
    "first_k_dense_replace",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
)
"""SMALL fields that only lower the class's default: top-1 routing stays top-1 (zaya allows no
other), groups of experts stay within the 4 experts (axk1's 8 groups of 0 failed)."""


SMALL_BY_TYPE: dict[str, dict[str, Knob]] = {
    "mamba2": {"num_heads": 4, "n_groups": 1, "state_size": 16, "chunk_size": 16},
}
"""Per model type, SMALL defaults of its own, where a field of a shared name means another thing:
Mamba2's num_heads are its state-space heads, which must fill hidden_size x expand (128 at SMALL's
width) with heads of head_dim 32, in groups dividing them (SMALL's 2 heads and its 8 groups: no
default point built)."""


NO_LAYERS = ", no chain of blocks to measure (its leaf modules run side by side); give it 1 or more"
SMALL_HINT = (  # where a model type's own constraints do not hold at SMALL's values
    "; stabilitycheck's small defaults (2 layers, width 64, 2 heads of 32, feed-forward 128) may not fit "
    "this model type: set the fields the error names with --knob NAME=VALUE (numbers and flags; a field "
    "holding a tuple or a list, as Reformer's axial_pos_embds, is no knob: such a type cannot be searched)"
)


def _gpt_neo(values: dict[str, Knob]) -> dict[str, Any]:
    """GPT-Neo's alternating global and local attention layers, as many as num_layers (its config
    requires their count to equal it; the default pattern is for 24)."""
    n = int(values["num_layers"])
    return {"attention_types": [[["global", "local"], n // 2]] + ([[["global"], 1]] if n % 2 else [])}


def _switch(values: dict[str, Knob]) -> dict[str, Any]:
    """Switch Transformers' sparse layers, at most as many as there are layers: its config makes every
    (layers // sparse)-th layer sparse, and 2 sparse layers of 1 made a step of 0, a dense T5 with no
    experts (where a search's smallest point lands)."""
    encoder, decoder = int(values["num_layers"]), int(values["num_decoder_layers"])
    return {
        "num_sparse_encoder_layers": min(int(values["num_sparse_encoder_layers"]), encoder),
        "num_sparse_decoder_layers": min(int(values["num_sparse_decoder_layers"]), decoder),
    }


DERIVED = {"gpt_neo": _gpt_neo, "switch_transformers": _switch}
"""Per model type, config fields that follow the knobs (not knobs themselves)."""


def _fill_unset(made: Any) -> None:
    """Fields a config class leaves None that its model reads as numbers (ministral's and hunyuan's
    head_dim, nemotron's num_key_value_heads, deepseek_v2's num_experts_per_tok: none of them built),
    set to what a model deriving them takes (hidden width / heads, the head count; SMALL's experts a
    token), so they follow the knobs; mixtral, which derives its head_dim so, builds the same model.
    A field the config reads per layer (gemma4's head_dim raises read whole) is left as it is."""
    heads, width = getattr(made, "num_attention_heads", None), getattr(made, "hidden_size", None)
    derived: dict[str, Any] = {
        "head_dim": width // heads if isinstance(width, int) and isinstance(heads, int) and heads else None,
        "num_key_value_heads": heads,
        "num_experts_per_tok": SMALL["num_experts_per_tok"],
    }
    for name, value in derived.items():
        try:
            unset = name in vars(made) and getattr(made, name) is None
        except Exception:  # a per-layer field: read it per layer, as the model does
            continue
        if unset and value is not None:
            setattr(made, name, value)


INPUTS: dict[str, Knob] = {"batch_size": 4, "seq_len": 16}
"""Knobs of the random token ids fed to the model (not config fields)."""

LAYER_FIELDS = (
    "n_layer",
    "num_hidden_layers",
    "num_layers",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "num_encoder_layers",
    "num_decoder_layers",
)
INIT_FIELDS = ("initializer_range", "initializer_factor", "init_std")
POSITION_FIELDS = ("n_positions", "max_position_embeddings")
NON_TEXT_INPUTS = ("pixel_values", "input_values", "input_features")  # what image and audio models take
MAX_LAYERS = 24
INIT_STEPS = 50
"""The default init axis: its default x1, x2, ..., x50 (initializer_range: 0.02, 0.04, ..., 1.0)."""


def _pads(model: nn.Module) -> set[object]:
    """The pad token ids of `model`: its config's and its input embedding's padding_idx (token_ids
    leaves them out)."""
    try:
        embedding = model.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        embedding = None
    config = getattr(model, "config", None)
    return {getattr(config, "pad_token_id", None), getattr(embedding, "padding_idx", None)}


def _import(model_type: str) -> ModuleType:
    """transformers, or the one-line UsageError naming the extra that installs it."""
    try:
        import transformers as module
    except ImportError:
        raise UsageError(
            f"hf:{model_type} needs the optional extra: pip install 'stabilitycheck[hf]'"
        ) from None
    found: ModuleType = module
    return found


def _is_dropout(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop") or name.endswith("layerdrop")


def _fields(config_class: type, base_class: type) -> dict[str, Any]:
    """The parameters of the config class's __init__ with their defaults, less the base class's."""
    base = set(inspect.signature(base_class).parameters)
    own = inspect.signature(config_class).parameters.items()
    return {n: p.default for n, p in own if n not in base and p.default is not inspect.Parameter.empty}


def _is_knob(name: str, default: object) -> bool:
    """An int/float field (not a bool, a token id, a run setting or one derived from others: None)."""
    number = isinstance(default, int | float) and not isinstance(default, bool)
    return number and not name.endswith("_token_id") and name not in RUN_FIELDS and name not in INPUTS


def _auto_class(transformers: ModuleType, model_type: str, encoder_decoder: bool, config_class: type) -> Any:
    """Seq2Seq LM for encoder-decoders, else masked LM (encoders), else causal LM, else the bare model:
    AutoModel's, or where AutoModel has none, the model class named after the config class
    (SiglipTextConfig: SiglipTextModel), as a vision-language model's text tower is (hf:siglip_text_model,
    which hf:siglip's refusal points to, was refused in turn: AutoModel has no class for it)."""
    names = transformers.models.auto.modeling_auto
    order = (
        [("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM")] if encoder_decoder else []
    )
    order += [
        ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
        ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ]
    for mapping, auto in order:
        if model_type in getattr(names, mapping, {}):
            return getattr(transformers, auto)
    named = getattr(transformers, config_class.__name__.removesuffix("Config") + "Model", None)
    if model_type in getattr(names, "MODEL_MAPPING_NAMES", {}) or not _builds_from(named, config_class):
        return transformers.AutoModel
    return named


def _builds_from(model_class: Any, config_class: type) -> bool:
    """Whether `model_class` is a transformers model class built from `config_class`."""
    return isinstance(model_class, type) and getattr(model_class, "config_class", None) is config_class


class HFModel:
    """A `transformers` model type at random init. Its init knob is `initializer_range` (or
    `initializer_factor` / `init_std`, whichever the config has); the critical init is that field's
    default in the config class (the init the model was designed with, e.g. 0.02 for GPT-2, 1.0 for
    T5's factor). Knobs derived from others (default None: llama's num_key_value_heads, T5's
    num_decoder_layers) follow them and are not knobs."""

    def __init__(self, model_type: str) -> None:
        transformers = _import(model_type)
        mapping = transformers.CONFIG_MAPPING
        if model_type not in mapping:
            hint = did_you_mean(model_type, list(mapping.keys()), "hf:")
            raise UsageError(
                f"hf:{model_type} is not a transformers model type{hint}; expected a key of "
                "transformers' CONFIG_MAPPING, e.g. hf:gpt2, hf:llama, hf:bert, hf:t5"
            )
        self.model_type = model_type
        self.name = f"hf:{model_type}"
        self.config_class: type = mapping[model_type]
        fields = _fields(self.config_class, transformers.PretrainedConfig)
        text = f"{model_type}_text_model"  # a vision-language model's text tower (hf:clip_text_model)
        self.pick = f"hf:{text}, its text part" if text in mapping else "a text model type, e.g. hf:gpt2"
        if not isinstance(fields.get("vocab_size"), int):
            unset = "leaves vocab_size unset (None)" if "vocab_size" in fields else "has no vocab_size"
            raise UsageError(  # hf:esm, a token model, leaves it unset: not 'a model of images or sound'
                f"{self.name} {unset} in its config, and stabilitycheck feeds HF models random "
                f"token ids drawn below it (a model of images or sound has none; a translation model's "
                f"two vocabularies, a character model's code points are not drawn); pick {self.pick}, "
                "or probe the model in a model file (stabilitycheck model.py) with inputs of its own"
            )
        own = SMALL_BY_TYPE.get(model_type, {})
        knobs = {n: own.get(n, _small(n, d)) for n, d in fields.items() if _is_knob(n, d)}
        self.knobs: dict[str, Knob] = {**knobs, **INPUTS}
        self.token_ids = {n: d for n, d in fields.items() if n.endswith("_token_id") and isinstance(d, int)}
        self.encoder_decoder = bool(self.config_class().is_encoder_decoder)
        self.auto = _auto_class(transformers, model_type, self.encoder_decoder, self.config_class)
        inits = [n for n in INIT_FIELDS if n in knobs]
        # where there are several (CLIP's text model: range and factor), the one its init reads
        self.init_knob: str | None = next((n for n in inits if len(inits) == 1 or self._inits(n)), None)
        self.critical: Knob | None = fields[self.init_knob] if self.init_knob else None
        self.critical_note = "the config's default, which critical-init takes as critical"
        self.layers_knob = next((n for n in LAYER_FIELDS if n in knobs and self._moves(n)), None)

    def _moves(self, knob: str) -> bool:
        """Whether the layer count `knob` changes the model built (parameters counted on the meta
        device, else the memory of a meta forward): WhisperForCausalLM, its decoder alone, ignores
        encoder_layers. True where that cannot be told (a model that does not build on meta)."""
        counts = []
        for n in (1, 2):
            try:
                with torch.device("meta"):
                    model = self._model(self.hf_config({**self.values(self.config()), knob: n}))
            except Exception:
                return True
            counts.append(sum(p.numel() for p in model.parameters()))
        if counts[0] != counts[1]:
            return True
        # the same weights: shared across layers (ALBERT) the layers still run, so their activations
        # take memory; an ignored knob (Whisper's encoder_layers above) changes neither
        memory = [self._forward_bytes(self.config(**{knob: n})) for n in (1, 2)]
        return None in memory or memory[0] != memory[1]

    def _inits(self, knob: str) -> bool:
        """Whether the weights drawn depend on the init field `knob` (its default against twice it, at
        one seed): clip_text_model has initializer_range, which its init does not read, and
        initializer_factor, which it does. True where the model does not build at those values."""
        weights = []
        for scale in (1, 2):
            values = self.values(self.config())
            values[knob] = values[knob] * scale
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                try:
                    model = self._model(self.hf_config(values))
                except Exception:
                    return True
            weights.append([p.detach() for p in model.parameters()])
        return not all(torch.equal(a, b) for a, b in zip(*weights, strict=True))

    def __repr__(self) -> str:
        return f"HFModel({self.model_type!r}, auto={self.auto.__name__}, knobs={self.knobs!r})"

    def config(self, **values: Scalar) -> Config:
        """A Config of this model type: every knob at its default unless given (run settings by name)."""
        return Config.of(self.name, **self.knobs).with_knobs(**values)

    def space(self) -> Space:
        """The number of layers 1..24, then the init knob from its default to x50 its default in steps
        of the default (initializer_range 0.02..1.0 step 0.02)."""
        axes = [Axis.range(self.layers_knob, 1, MAX_LAYERS)] if self.layers_knob else []
        if self.init_knob and isinstance(self.critical, int | float) and self.critical > 0:
            d = float(self.critical)
            axes.append(Axis.range(self.init_knob, d, INIT_STEPS * d, d))
        return Space(self.name, self.config(), tuple(axes))

    def values(self, config: Config) -> dict[str, Knob]:
        """The knobs of `config`, each as its default's type, or a one-line UsageError."""
        unknown = sorted(set(config.values) - set(self.knobs))
        if config.subject != self.name or unknown:
            what = f"knob {unknown[0]!r}" if unknown else f"subject {config.subject!r}"
            raise UsageError(f"{self.name} has no {what}; its knobs are {sorted(self.knobs)}")
        given = config.values
        values = {n: _coerce(self.name, n, given.get(n, d), d) for n, d in self.knobs.items()}
        for name in (*INPUTS, "vocab_size"):  # a tensor of -3 tokens, ids modulo 0: no model's error
            if name in values and values[name] < 1:
                raise UsageError(
                    f"{self.name} knob {name}={values[name]} must be >= 1 (the inputs are batch_size x "
                    "seq_len token ids below vocab_size)"
                )
        return values

    def hf_config(self, values: dict[str, Knob]) -> Any:
        """The transformers config of these knob values (no cache; special token ids past the vocab
        wrapped into it, a pad id past it None)."""
        transformers = _import(self.model_type)
        fields: dict[str, Knob | None] = {n: v for n, v in values.items() if n not in INPUTS}
        vocab = int(values["vocab_size"])
        # special token ids past the small vocab: wrapped into it (None failed models that need an int)
        fields.update({n: d % vocab for n, d in self.token_ids.items() if d >= vocab and n != "pad_token_id"})
        if self.token_ids.get("pad_token_id", 0) >= vocab:
            fields["pad_token_id"] = None
        layers = {n: values[n] for n in LAYER_FIELDS if n in values}
        decoders = [n for n in ("decoder_layers", "num_decoder_layers") if n in layers and int(layers[n]) < 1]
        if decoders and self.encoder_decoder:  # the encoder's output then reaches no loss
            raise UserCodeError(
                f"{self.name}: {decoders[0]}=0 builds no decoder layers, so its encoder's output reaches no "
                "loss; give it 1 or more"
            )
        if layers and all(int(v) < 1 for v in layers.values()):
            raise UserCodeError(
                f"{self.name}: {', '.join(f'{n}={v}' for n, v in layers.items())} builds no layers{NO_LAYERS}"
            )
        limit = min((int(values[n]) for n in POSITION_FIELDS if n in values), default=None)
        if limit is not None and values["seq_len"] > limit:
            raise UserCodeError(
                f"{self.name}: seq_len={values['seq_len']} exceeds the model's {limit} positions; keep it "
                f"within them, e.g. --knob seq_len=1:{limit}"
            )
        fields.update(DERIVED[self.model_type](values) if self.model_type in DERIVED else {})
        try:
            made = transformers.AutoConfig.for_model(self.model_type, **fields)
        except Exception as exc:  # at one point of a search: that point is skipped, with the reason
            raise UserCodeError(f"{self.name} rejects these knobs: {describe(exc)}{SMALL_HINT}") from None
        if hasattr(made, "use_cache"):
            made.use_cache = False  # the probe wants the logits, not a key/value cache
        _fill_unset(made)
        return made

    def _model(self, hf_config: Any, **options: Any) -> nn.Module:
        try:
            # an Auto class's from_config, or the model class's own _from_config, which it calls
            make = getattr(self.auto, "from_config", None) or self.auto._from_config
            model: nn.Module = make(hf_config, **options)
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            if "Unrecognized configuration class" in str(exc):  # no knob helps
                raise UserCodeError(
                    f"{self.name}: transformers' {self.auto.__name__} has no model class for "
                    f"{type(hf_config).__name__}, so it cannot be built from its config; probe the model "
                    "class in a model file (stabilitycheck model.py) instead"
                ) from None
            raise UserCodeError(
                f"{self.name} cannot be built from these knobs: {describe(exc)}{SMALL_HINT}"
            ) from None
        return model

    def inputs(
        self, model: nn.Module, values: dict[str, Knob], seed: int, device: torch.device, masks: bool = False
    ) -> dict[str, torch.Tensor]:
        """Random token ids (batch_size, seq_len) drawn on the CPU from the seed, then moved to `device`
        (decoder_input_ids too where the forward takes them: an encoder-decoder); with `masks`,
        all-ones attention masks where the model's forward takes them."""
        params = inspect.signature(model.forward).parameters
        if "input_ids" not in params:
            other = next((n for n in NON_TEXT_INPUTS if n in params), "no input_ids")
            raise UsageError(
                f"{self.name} is not a text model: its {type(model).__name__}.forward takes {other}, and "
                f"stabilitycheck feeds HF models random token ids; pick {self.pick}"
            )
        gen = torch.Generator().manual_seed(derived(seed, SALT_BATCH))
        shape = (int(values["batch_size"]), int(values["seq_len"]))
        takes = params if masks else {}
        vocab = int(values["vocab_size"])
        pads = _pads(model)
        drawn: dict[str, torch.Tensor] = {}
        for prefix in ("", "decoder_") if "decoder_input_ids" in params else ("",):
            drawn[f"{prefix}input_ids"] = token_ids(vocab, pads, shape, gen)
            if f"{prefix}attention_mask" in takes:
                drawn[f"{prefix}attention_mask"] = torch.ones(shape, dtype=torch.long)
        return {n: t.to(device) for n, t in drawn.items()}

    def build(self, config: Config) -> Built:
        """The model (seeded from config.run.seed) on the run's device and dtype, its token ids, the
        default loss on its logits and its blocks."""
        values, seed = self.values(config), config.run.seed
        hf_config = self.hf_config(values)
        device = torch.device(config.run.device)
        cuda = [device] if device.type == "cuda" else []
        # transformers' grouped_mm experts take no float64 (mixtral, qwen2_moe, olmoe and jamba refused
        # every point): their eager loop computes the same experts in any dtype
        wide = config.run.dtype == "float64" and hasattr(hf_config, "_experts_implementation")
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            model = self._model(hf_config, **({"experts_implementation": "eager"} if wide else {}))
        blocks, note = find_blocks(model)
        empty = [f"{n}={values[n]}" for n in LAYER_FIELDS if n in values and int(values[n]) < 1]
        if empty and note.startswith(LEAVES_NOTE):  # the stack it runs is the empty one (Whisper's decoder)
            raise UserCodeError(f"{self.name}: {', '.join(empty)} builds no layers it runs{NO_LAYERS}")
        model.to(device=device, dtype=torch_dtype(config.run.dtype))
        loss = OutputLoss(DefaultLoss(derived(seed, SALT_LOSS)), self.name)
        return Built(model, self.inputs(model, values, seed, device), loss, blocks, note)

    def memory_estimate(self, config: Config) -> int | None:
        """Bytes from a build and forward on the meta device (`_forward_bytes`); where the model cannot
        run there, its parameters' alone (memory.parameter_bytes); None where it cannot even be built
        there."""
        found = self._forward_bytes(config)
        if found is not None:
            return found
        try:
            return parameter_bytes(lambda: self._eager(config))
        except UsageError:
            raise
        except Exception:  # a build that reads tensor data
            return None

    def _eager(self, config: Config) -> nn.Module:
        """The model of `config` with eager attention (its attention weights are a module output, so
        counted), in the config's dtype."""
        model = self._model(self.hf_config(self.values(config)), attn_implementation="eager")
        return model.to(dtype=torch_dtype(config.run.dtype))

    def _forward_bytes(self, config: Config) -> int | None:
        """Bytes from a build and forward on the meta device, None where the model cannot run there:
        token ids with, then without, all-ones masks (transformers' mask code reads tensors on the host,
        `.all()`, for bidirectional masks given, and for causal masks not given, which meta tensors
        cannot do)."""
        values, seed = self.values(config), config.run.seed
        for masks in (False, True):

            def make(masks: bool = masks) -> tuple[nn.Module, dict[str, torch.Tensor]]:
                built = self._eager(config)
                return built, self.inputs(built, values, seed, torch.device("meta"), masks)

            try:
                return meta_bytes(make, _call)
            except UsageError:
                raise
            except Exception:  # host reads of tensor data, or an op without a meta kernel
                continue
        return None

    def critical_init(self, config: Config) -> Scalar | None:
        return self.critical

    def variants(self, config: Config) -> dict[str, Config | None]:
        return {}

    def last_step(self, config: Config) -> Built | None:
        return None


def _call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    return model(**inputs)


def _small(name: str, default: Knob) -> Knob:
    """The SMALL default of a field (dropout: 0.0), as the type of the config class's default."""
    value = 0.0 if _is_dropout(name) and isinstance(default, float) else SMALL.get(name, default)
    value = min(value, default) if name in AT_MOST else value
    return float(value) if isinstance(default, float) else int(value)


def _coerce(subject: str, name: str, value: object, default: Knob) -> Knob:
    """`value` as the type of the knob's default, or a one-line UsageError (_validation.knob_value)."""
    got = knob_value(name, value, default)
    if got is None:
        raise UsageError(f"{subject} {knob_refusal(name, value, default)}")
    return got
